"""`safetylock eval`: resolve the prompts and the judge, open the deployment, evaluate, add the KL to a reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..deployment import Deployment
from ..errors import SafetylockError
from ..files import write_json
from ..judges import DEFAULT_JUDGE
from .harness import SUMMARY, evaluate, extract_overlap
from .scoring import kl_divergence


def run_eval(*, deployment: Deployment, outdir: str | Path, benchmark: str | None = None,
             prompts_file: Path | None = None, column: str | None = None, kind: str = "harmful",
             split: str | None = "eval", judge: str = DEFAULT_JUDGE, limit: int | None = None,
             max_new_tokens: int | None = None, system: str | None = None, batch_size: int = 8,
             reference: str | None = None, overwrite: bool = False,
             prompt_attack: str | None = None) -> dict[str, Any]:
    """Return the summary of `safetylock eval`: resolve prompts and judge first (cheap checks), then open and run.

    `deployment` (not yet open) is what runs; it is opened for the run and closed after it. Everything that
    changes a reply is pinned in config.json, so a resumed run never mixes configurations: the deployment's
    `describe()` (the defense and the content hash of its file, the lock's hash with its stored default alpha,
    alpha, mode, dtype) and, in `evaluate`, the judge, system prompt and token budget.
    """
    from ..data import benchmark_kind, harmless_prompts, load_benchmark, load_prompts
    from ..judges import get_judge

    if (benchmark is None) == (prompts_file is None):
        raise SafetylockError("pass exactly one of --benchmark NAME or --prompts FILE")
    if limit is not None and limit < 1:
        raise SafetylockError(f"--limit must be at least 1, got {limit}")
    split = None if split in (None, "all") else split
    if benchmark is not None:
        kind = benchmark_kind(benchmark)
        prompts = load_benchmark(benchmark, split)
    else:
        if kind not in ("harmful", "benign"):
            raise SafetylockError(f"--kind must be harmful or benign for a prompt file, got '{kind}'")
        prompts = load_prompts(prompts_file, column)  # type: ignore[arg-type]
        split = None
    prompts = prompts[:limit]
    the_judge = get_judge(judge) if kind in ("harmful", "benign") else None
    from ..prompt_attacks import get_prompt_attack

    get_prompt_attack(prompt_attack)  # an unknown name is refused before the model loads
    described = deployment.describe()
    mode = described.pop("lock_mode", None)
    config = {**described, "benchmark": benchmark, "prompts_file": str(prompts_file) if prompts_file else None,
              "split": split, "extract_overlap": extract_overlap(prompts) if split == "eval" else None}
    if mode is not None:
        config["lock_mode"] = mode
    with deployment as m:
        tok = deployment.tokenizer
        summary = evaluate(m, tok, prompts, the_judge, outdir, kind=kind, config=config, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, system=system, overwrite=overwrite, progress=True,
                           prompt_attack=prompt_attack)
        if reference is not None:
            from ..models import load_model

            ref, _ = load_model(reference, dtype=deployment.dtype)
            benign = prompts if kind != "harmful" else harmless_prompts("eval")[: limit or 32]
            summary["kl_to_reference"] = kl_divergence(m, ref, tok, benign, batch_size=batch_size, system=system)
            summary["reference"] = reference
            write_json(Path(outdir) / SUMMARY, summary)
    return summary
