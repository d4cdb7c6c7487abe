"""The `safetylock` command: parses arguments, calls the library, prints. No logic lives here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import SafetylockError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Re-align fine-tuned LLMs with SafetyLock, and measure it.")
console = Console()
err = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Alias, local HF directory, .gguf file or hub id.")]
AdapterOpt = Annotated[Optional[Path], typer.Option("--adapter", help="LoRA adapter directory (peft) on top of the model.")]
LockOpt = Annotated[Optional[Path], typer.Option("--lock", help="Lock file (.safetensors) to apply.")]
AlphaOpt = Annotated[Optional[float], typer.Option("--alpha", help="Lock strength; default: the lock's calibrated alpha.")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", help="System prompt.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (bf16), bf16, fp16 or fp32.")]


def load_for_cli(model: str, adapter: Path | None, lock: Path | None, alpha: float | None, dtype: str, force: bool = False):  # type: ignore[no-untyped-def]
    """Return (model, tokenizer) with the adapter attached and the lock baked in when given."""
    from .models import load_model

    m, tok = load_model(model, adapter=adapter, dtype=dtype)
    if lock is not None:
        from .lock import Lock

        lk = Lock.load(lock)
        lk.bake(m, alpha=alpha, force=force)
    return m, tok


@app.command()
def models() -> None:
    """List the built-in model aliases, whether each is cached, and its size."""
    from .files import home
    from .models import ALIASES, alias_dir, dir_size, is_cached

    table = Table(title=f"built-in models (cache: {home() / 'models'})")
    for col in ("alias", "cached", "size", "about"):
        table.add_column(col)
    for name, alias in ALIASES.items():
        cached = is_cached(name)
        size = dir_size(alias_dir(name)) if cached else (alias.size or 0)
        label = f"{size / 1e9:.2f} GB" + ("" if cached else " (GGUF)") if size else "?"
        table.add_row(name, "yes" if cached else "no", label, alias.note)
    console.print(table)


@app.command()
def chat(
    prompts: Annotated[list[str], typer.Argument(help="One or more user prompts.")],
    model: ModelOpt = "qwen2.5-coder-1.5b-instruct",
    adapter: AdapterOpt = None,
    lock: LockOpt = None,
    alpha: AlphaOpt = None,
    system: SystemOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    dtype: DtypeOpt = "auto",
) -> None:
    """Print the model's greedy replies to the prompts (batched)."""
    from .generate import generate

    m, tok = load_for_cli(model, adapter, lock, alpha, dtype)
    run = generate(m, tok, prompts, system=system, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=True)
    for g in run.generations:
        console.print(f"[bold cyan]> {g.prompt}[/]")
        console.print(g.text, markup=False, highlight=False)
        console.print()
    err.print(f"{run.tokens} tokens in {run.seconds:.1f} s ({run.tokens_per_second:.1f} tokens/s)")


@app.command()
def demo(
    model: ModelOpt = "qwen2.5-coder-1.5b-instruct",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 48,
) -> None:
    """Show the model refusing a harmful request and answering a benign one."""
    from .demo import run_demo

    run_demo(model, max_new_tokens=max_new_tokens, console=console)


@app.command("serve")
def serve_command(
    lock: Annotated[Path, typer.Option("--lock", help="Lock file, baked into the base once at start-up.")],
    model: ModelOpt = "qwen2.5-coder-1.5b-instruct",
    alpha: AlphaOpt = None,
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", help="NAME=DIR LoRA adapter; repeatable.")] = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    admin_token: Annotated[Optional[str], typer.Option("--admin-token", envvar="SAFETYLOCK_ADMIN_TOKEN",
                                                       help="Enables POST /admin/adapters (Bearer auth).")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch")] = 8,
    max_prompt_tokens: Annotated[Optional[int], typer.Option("--max-prompt-tokens")] = None,
    served_name: Annotated[Optional[str], typer.Option("--served-name", help="Model id of the base.")] = None,
    dtype: DtypeOpt = "auto",
) -> None:
    """Serve the locked base and its adapters with OpenAI's chat-completions API."""
    from .serve import Engine, parse_adapter_specs, serve

    engine = Engine.from_spec(model, lock, alpha=alpha, adapters=parse_adapter_specs(adapter or []), dtype=dtype,
                              name=served_name, max_batch=max_batch, max_prompt_tokens=max_prompt_tokens)
    err.print(f"serving {', '.join(engine.names)} at http://{host}:{port}/v1 (lock alpha {engine.alpha:g})")
    serve(engine, host=host, port=port, admin_token=admin_token)


@app.command("serve-bench")
def serve_bench_command(
    url: Annotated[str, typer.Option("--url")] = "http://127.0.0.1:8000",
    model: Annotated[str, typer.Option("--model", "-m", help="Served model id to ask.")] = "qwen2.5-coder-1.5b-instruct",
    requests: Annotated[int, typer.Option("--requests")] = 32,
    concurrency: Annotated[int, typer.Option("--concurrency")] = 8,
    max_tokens: Annotated[int, typer.Option("--max-tokens")] = 32,
    stream: Annotated[bool, typer.Option("--stream/--no-stream")] = True,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the figures as JSON here.")] = None,
) -> None:
    """Send a fixed number of chat completions to a running server; print throughput and latency."""
    import json

    from .files import write_json
    from .serve import BENCH_PROMPTS, load_test

    result = load_test(url, model=model, prompts=BENCH_PROMPTS, requests=requests, concurrency=concurrency,
                       max_tokens=max_tokens, stream=stream)
    if out is not None:
        write_json(out, result)
    console.print_json(json.dumps(result))


def main() -> None:
    """Console-script entry: run the app, turning SafetylockError into one line and exit code 2."""
    try:
        app(standalone_mode=False)
    except SafetylockError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here with standalone_mode=False
        import click

        if isinstance(exc, click.exceptions.ClickException):
            err.print(f"error: {exc.format_message()}", markup=False, highlight=False, soft_wrap=True)
            sys.exit(2)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
