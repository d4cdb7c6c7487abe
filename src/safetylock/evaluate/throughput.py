"""Generation throughput: batched generation against a one-prompt-at-a-time loop (`safetylock bench-generate`)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import atomic_file, write_json


def benchmark_generation(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 48,
                         batch_size: int = 8) -> dict[str, Any]:
    """Return tokens/s of batched generation next to a one-prompt-at-a-time loop over the same prompts."""
    import torch

    from ..generate import generate

    generate(model, tokenizer, list(prompts[:1]), max_new_tokens=4, batch_size=1)  # warm-up
    batched = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    start = time.perf_counter()
    tokens = 0
    for p in prompts:
        tokens += generate(model, tokenizer, [p], max_new_tokens=max_new_tokens, batch_size=1).tokens
    loop_seconds = time.perf_counter() - start
    loop_tps = tokens / loop_seconds
    return {
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "batched": {"batch_size": batch_size, "tokens": batched.tokens, "seconds": round(batched.seconds, 2),
                    "tokens_per_second": round(batched.tokens_per_second, 2)},
        "loop": {"batch_size": 1, "tokens": tokens, "seconds": round(loop_seconds, 2),
                 "tokens_per_second": round(loop_tps, 2)},
        "speedup": round(batched.tokens_per_second / loop_tps, 2),
        "torch_threads": torch.get_num_threads(),
    }


def write_generation_bench(model: str, out: str | Path, *, n_prompts: int = 16, max_new_tokens: int = 48,
                           batch_size: int = 8, dtype: str = "auto") -> dict[str, Any]:
    """Return and write (`out/generation.json`, `.md`) the batched-vs-loop generation benchmark."""
    from ..data import harmless_prompts
    from ..models import load_model

    m, tok = load_model(model, dtype=dtype)
    prompts = [p.text for p in harmless_prompts("extract")[:n_prompts]]
    result = {"model": model, "dtype": dtype, **benchmark_generation(m, tok, prompts, max_new_tokens=max_new_tokens,
                                                                     batch_size=batch_size)}
    out = Path(out)
    write_json(out / "generation.json", result)
    b, loop = result["batched"], result["loop"]
    md = (f"# Batched vs one-at-a-time generation ({model}, {dtype}, {result['torch_threads']} threads)\n\n"
          f"{result['prompts']} overrefusal extract-split prompts, greedy, up to {max_new_tokens} new tokens each; "
          f"{platform.machine()} CPU, {os.cpu_count()} cores.\n\n"
          f"Command: `safetylock bench-generate -m {model} --prompts {n_prompts} --max-new-tokens {max_new_tokens} "
          f"--batch-size {batch_size} -o {out}`\n\n"
          "| mode | batch | tokens | seconds | tokens/s |\n|---|---|---|---|---|\n"
          f"| batched | {b['batch_size']} | {b['tokens']} | {b['seconds']} | {b['tokens_per_second']} |\n"
          f"| loop | 1 | {loop['tokens']} | {loop['seconds']} | {loop['tokens_per_second']} |\n\n"
          f"Speed-up: **{result['speedup']}x** tokens/s.\n")
    with atomic_file(out / "generation.md") as handle:
        handle.write(md)
    return result
