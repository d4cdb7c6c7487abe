"""Commands that serve a locked base and its adapters over OpenAI's API, and load-test a running server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..files import check_writable_file
from .options import AlphaOpt, DtypeOpt, ModelOpt, flag_mode
from .output import console, err


def serve_command(
    lock: Annotated[Path, typer.Option("--lock", help="Lock file, baked into the base once at start-up.")],
    model: ModelOpt = "qwen2.5-coder-1.5b-instruct",
    alpha: AlphaOpt = None,
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", help="NAME=DIR LoRA adapter; repeatable.")] = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    admin_token: Annotated[Optional[str], typer.Option("--admin-token", envvar="SAFETYLOCK_ADMIN_TOKEN",
                                                       help="Enables POST /admin/adapters and the lock's details on "
                                                       "/health (Bearer auth). Prefer the environment variable or "
                                                       "--admin-token-file: a command line is visible in `ps`.")] = None,
    admin_token_file: Annotated[Optional[Path], typer.Option("--admin-token-file",
                                                             help="Read the admin token from this file.")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1)] = 8,
    max_prompt_tokens: Annotated[Optional[int], typer.Option("--max-prompt-tokens", min=1)] = None,
    served_name: Annotated[Optional[str], typer.Option("--served-name", help="Model id of the base.")] = None,
    dtype: DtypeOpt = "auto",
    force: Annotated[bool, typer.Option("--force", help="Bake a lock into a model whose weights are far from the lock's base, or whose vocab or model_type differs (same shapes).")] = False,
    conditional: Annotated[Optional[bool], typer.Option(
        "--conditional/--baked", help="Apply the lock at run time, only to requests its harmfulness probe flags (the "
        "default for a lock with a probe), or bake it into the base for every request.")] = None,
    base_refusal: Annotated[Optional[bool], typer.Option(
        "--base-refusal/--no-base-refusal", help="Screen adapter requests: the served base (the adapter off) writes its "
        "first reply tokens, and where they refuse the request gets a fixed refusal (docs/serving.md). Default: on "
        "unless the lock is baked (a baked base would be asked).")] = None,
    base_refusal_tokens: Annotated[int, typer.Option("--base-refusal-tokens", min=1,
                                                     help="Base reply tokens the screen reads.")] = 12,
) -> None:
    """Serve the locked base and its adapters with OpenAI's chat-completions API."""
    from ..serve import Engine, parse_adapter_specs, read_admin_token, serve

    from ..deployment import resolve_mode
    from ..lock import Lock

    admin_token = read_admin_token(admin_token, admin_token_file)
    read = Lock.load(lock)  # once: it picks the defaults below and is what the engine applies
    if base_refusal is None:
        base_refusal = resolve_mode(read, flag_mode(conditional)) == "conditional"
    engine = Engine.from_spec(model, read, alpha=alpha, adapters=parse_adapter_specs(adapter or []), dtype=dtype,
                              name=served_name, max_batch=max_batch, max_prompt_tokens=max_prompt_tokens,
                              force=force, conditional=conditional,
                              base_refusal=base_refusal_tokens if base_refusal else None)
    how = "conditional, at run time" if engine.conditional else "baked"
    if base_refusal:
        how += f"; adapter requests screened by the base's first {base_refusal_tokens} reply tokens"
    err.print(f"serving {', '.join(engine.names)} at http://{host}:{port}/v1 (lock alpha {engine.alpha:g}, {how})")
    serve(engine, host=host, port=port, admin_token=admin_token)


def serve_bench_command(
    url: Annotated[str, typer.Option("--url")] = "http://127.0.0.1:8000",
    model: Annotated[str, typer.Option("--model", "-m", help="Served model id to ask.")] = "qwen2.5-coder-1.5b-instruct",
    requests: Annotated[int, typer.Option("--requests", min=1)] = 32,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1)] = 8,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1)] = 32,
    stream: Annotated[bool, typer.Option("--stream/--no-stream")] = True,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the figures as JSON here.")] = None,
) -> None:
    """Send a fixed number of chat completions to a running server; print throughput and latency."""
    import json

    from ..files import write_json
    from ..serve import BENCH_PROMPTS, load_test

    if out is not None:
        check_writable_file(out)
    result = load_test(url, model=model, prompts=BENCH_PROMPTS, requests=requests, concurrency=concurrency,
                       max_tokens=max_tokens, stream=stream)
    if out is not None:
        write_json(out, result)
    console.print_json(json.dumps(result))
