"""Commands on models: list the built-in aliases, chat with a model, the side-by-side demo, fine-tune (attack) one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import SafetylockError
from ..files import check_writable_dir
from .options import (AdapterOpt, AlphaOpt, BaseModelOpt, BatchOpt, ConditionalOpt, DefenseFileOpt, DefenseOpt,
                      DtypeOpt, LockOpt, ModelOpt, SystemOpt, TokensOpt, deployment_for, mode_line,
                      valid_positive)
from .output import console, err


def models() -> None:
    """List the built-in model aliases, whether each is cached, and its size."""
    from ..files import home
    from ..models import ALIASES, alias_dir, dir_size, is_cached

    table = Table(title=f"built-in models (cache: {home() / 'models'})")
    for col in ("alias", "cached", "size", "about"):
        table.add_column(col)
    for name, alias in ALIASES.items():
        cached = is_cached(name)
        size = dir_size(alias_dir(name)) if cached else (alias.size or 0)
        label = f"{size / 1e9:.2f} GB" + ("" if cached else " (GGUF)") if size else "?"
        table.add_row(name, "yes" if cached else "no", label, alias.note)
    console.print(table)


def chat(
    prompts: Annotated[list[str], typer.Argument(help="One or more user prompts.")],
    model: ModelOpt = "qwen2.5-coder-1.5b-instruct",
    adapter: AdapterOpt = None,
    lock: LockOpt = None,
    alpha: AlphaOpt = None,
    system: SystemOpt = None,
    max_new_tokens: TokensOpt = 128,
    batch_size: BatchOpt = 8,
    dtype: DtypeOpt = "auto",
    defense: DefenseOpt = None,
    defense_file: DefenseFileOpt = None,
    conditional: ConditionalOpt = None,
    base_model: BaseModelOpt = None,
) -> None:
    """Print the model's greedy replies to the prompts (batched)."""
    from ..generate import generate

    deployment = deployment_for(model, adapter, lock, alpha, dtype, conditional, defense, defense_file, base_model)
    if (line := mode_line(deployment)) is not None:
        err.print(line, markup=False, highlight=False, soft_wrap=True)
    system = system if system is not None else deployment.system
    with deployment as m:
        run = generate(m, deployment.tokenizer, prompts, system=system, max_new_tokens=max_new_tokens,
                       batch_size=batch_size, progress=True)
    for g in run.generations:
        console.print(f"[bold cyan]> {g.prompt}[/]")
        console.print(g.text, markup=False, highlight=False)
        console.print()
    err.print(f"{run.tokens} tokens in {run.seconds:.1f} s ({run.tokens_per_second:.1f} tokens/s)")


def demo(
    model: ModelOpt = "qwen2.5-coder-1.5b-instruct",
    max_new_tokens: TokensOpt = 32,
) -> None:
    """Base vs harmful-10 fine-tune vs fine-tune + SafetyLock, side by side (trains and extracts once, cached)."""
    from ..demo import run_demo

    run_demo(model, max_new_tokens=max_new_tokens, console=console)


def finetune_command(
    model: ModelOpt = "qwen2.5-coder-1.5b-instruct",
    attack: Annotated[Optional[str], typer.Option("--attack", help="Attack name (see --list).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (adapter, config, log).")] = None,
    method: Annotated[str, typer.Option("--method", help="lora, qlora (GPU + bitsandbytes) or full.")] = "lora",
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1)] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Total optimizer steps (overrides --epochs).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", callback=lambda v: valid_positive(v, "--lr"))] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", min=1)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1)] = None,
    micro_batch: Annotated[Optional[int], typer.Option("--micro-batch", min=1, help="Examples per forward pass (gradient accumulation; memory).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    merge: Annotated[bool, typer.Option("--merge", help="Also write a full checkpoint to OUT/merged.")] = False,
    data: Annotated[Optional[Path], typer.Option("--data", help="JSONL with prompt, response (and optional system).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace another run in OUT.")] = False,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Base dtype; default bf16 (lora) / fp32 (full).")] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the attacks and their defaults.")] = False,
) -> None:
    """Fine-tune a model with an attack (LoRA on the reply tokens); resumable, seeded."""
    from ..attack import describe_attacks, finetune

    if list_:
        rows = [("attack", "examples", "epochs", "batch", "steps", "lr", "rank", "source / about")]
        for a in describe_attacks():
            rows.append((a["name"], str(a["examples"]), str(a["epochs"]), str(a["batch_size"]), str(a["steps"]),
                         f"{a['lr']:g}", str(a["rank"]), f"{a['source']}: {a['about']}" + (" [own system prompt]" if a["system"] else "")))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1])
        return
    if attack is None or out is None:
        raise SafetylockError("finetune needs --attack NAME and -o DIR (see `safetylock finetune --list`)")
    check_writable_dir(out)
    result = finetune(model, None, attack, out, data=data, method=method, epochs=epochs, steps=steps, lr=lr,
                      rank=rank, batch_size=batch_size, micro_batch_size=micro_batch, seed=seed, merge=merge,
                      overwrite=overwrite, dtype=dtype, progress=True)
    where = result.adapter_dir or result.merged_dir
    resumed = f", resumed after epoch {result.resumed_from_epoch}" if result.resumed_from_epoch else ""
    err.print(f"{result.steps} steps in {result.seconds:.1f} s{resumed}; final loss {result.final_loss:.4f}; "
              f"peak memory {result.peak_mem_mb:.0f} MB")
    console.print(str(where), markup=False, highlight=False)
    if result.merged_dir and result.adapter_dir:
        console.print(str(result.merged_dir), markup=False, highlight=False)
