"""The `safetylock` command: parses arguments, calls the library, prints. No logic lives here.

Commands live by stage: `model_commands` (models, chat, demo, finetune), `serve_commands` (serve, serve-bench),
`eval_commands` (eval, judge, report), `bench_commands` (bench, ood, bench-generate) and `lock_commands`
(extract, inspect, gate, apply, check, calibrate) and `defense_commands` (fit-defense); `options` holds the options they share. They are registered
below in the order `safetylock --help` lists them.
"""

from __future__ import annotations

import sys

import typer

from ..errors import SafetylockError
from .bench_commands import bench_command, bench_generate_command, ood_command
from .defense_commands import fit_defense_command
from .eval_commands import eval_command, judge_command, report_command
from .lock_commands import (apply_command, calibrate_command, check_command, extract_command,
                            gate_command, inspect_command)
from .model_commands import chat, demo, finetune_command, models
from .options import deployment_for, lock_mode
from .output import console, err
from .serve_commands import serve_bench_command, serve_command

__all__ = ["app", "console", "deployment_for", "err", "lock_mode", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Re-align fine-tuned LLMs with SafetyLock, and measure it.")

app.command("models")(models)
app.command("chat")(chat)
app.command("demo")(demo)
app.command("serve")(serve_command)
app.command("serve-bench")(serve_bench_command)
app.command("eval")(eval_command)
app.command("bench")(bench_command)
app.command("ood")(ood_command)
app.command("judge")(judge_command)
app.command("report")(report_command)
app.command("bench-generate")(bench_generate_command)
app.command("finetune")(finetune_command)
app.command("extract")(extract_command)
app.command("inspect")(inspect_command)
app.command("gate")(gate_command)
app.command("apply")(apply_command)
app.command("check")(check_command)
app.command("calibrate")(calibrate_command)
app.command("fit-defense")(fit_defense_command)


def main() -> None:
    """Console-script entry: run the app; every user error is one line on stderr and exit code 2.

    typer >= 0.22 raises its own vendored click's exceptions, all subclasses of the public
    `typer.TyperException`, so that (not the click package's classes) is what is caught here. In
    non-standalone mode typer turns Ctrl-C into a returned 130, so the return value is checked too.
    """
    try:
        code = app(standalone_mode=False)
    except SafetylockError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.TyperException as exc:
        _usage_error(exc)
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    if code == 130:
        err.print("interrupted; what finished is saved: run the same command again to resume", markup=False)
        sys.exit(130)
    if isinstance(code, int) and code != 0:
        sys.exit(code)


def _usage_error(exc: typer.TyperException) -> None:
    """Print a usage error as one line naming the fix (or, for no arguments at all, the help) and exit 2."""
    message = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    if not message.strip() or "\n" in message:  # no arguments: typer has printed (or returns) the help
        if message.strip():
            err.print(message, markup=False, highlight=False)
    else:
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        err.print(f"error: {message}{hint}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(2)
