"""Commands on the baseline defenses: fit one's artifact on the aligned base, for `eval --defense NAME --defense-file`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..files import check_writable_file
from .options import DtypeOpt, ModelOpt
from .output import console, err


def fit_defense_command(
    name: Annotated[str, typer.Argument(help="iti, refusal-direction, resta, safe-lora or guard.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact file to write (.safetensors).")],
    model: ModelOpt = "qwen2.5-coder-1.5b-instruct",
    unaligned: Annotated[Optional[Path], typer.Option("--unaligned", help="resta / safe-lora: the base's harmful "
                                                      "fine-tune (LoRA adapter dir), e.g. from `safetylock finetune "
                                                      "--attack harmful-100`.")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    dtype: DtypeOpt = "auto",
) -> None:
    """Fit a baseline defense's artifact on the aligned base; apply it with `eval --defense NAME --defense-file`."""
    import time

    from ..baselines.fitting import check_fittable, fit_defense_artifact
    from ..models import attach_adapter, load_model

    check_fittable(name, unaligned is not None)
    check_writable_file(out)
    base, tokenizer = load_model(model, dtype=dtype)
    harmful = attach_adapter(base, unaligned) if unaligned is not None else None
    start = time.perf_counter()
    artifact = fit_defense_artifact(name, base, tokenizer, spec=model, unaligned=harmful, seed=seed, dtype=dtype)
    artifact.metadata["fit_seconds"] = round(time.perf_counter() - start, 3)
    if unaligned is not None:
        artifact.metadata["unaligned"] = {"adapter": str(unaligned)}
    artifact.save(out)
    err.print(f"fitted {name} on {model} in {time.perf_counter() - start:.1f} s")
    console.print(str(out), markup=False, highlight=False)
