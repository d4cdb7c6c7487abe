"""Safety SFT: LoRA fine-tuning of the compromised model on refusals of extract-split prompts."""

from __future__ import annotations

import contextlib
import copy
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..arch import unwrap
from ..errors import SafetylockError
from ..files import sha256_file, write_json
from .defense import Defense

SFT_MARKER = "safety_sft.json"


def refusal_examples(prompts: Sequence[str], seed: int = 0) -> list[Any]:
    """Return fine-tuning examples pairing each prompt with a varied refusal (`data.refusal_response`)."""
    from ..attack import Example
    from ..data import refusal_response

    rng = random.Random(f"safety-sft-{seed}")
    return [Example(p, refusal_response(p, rng)) for p in prompts]


def merged_copy(model: Any) -> Any:
    """Return a deep copy of `model` with any LoRA adapter merged in (the original is untouched)."""
    clone = copy.deepcopy(model)
    if clone is not unwrap(clone) and hasattr(clone, "merge_and_unload"):
        clone = clone.merge_and_unload()
    clone.safetylock_spec = getattr(model, "safetylock_spec", None)
    clone.eval()
    return clone


def train_safety_sft(
    model: Any,
    tokenizer: Any,
    outdir: str | Path,
    prompts: Sequence[str],
    *,
    steps: int = 10,
    batch_size: int = 5,
    lr: float = 2e-4,
    rank: int = 8,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Return what LoRA fine-tuning the (compromised) model on refusals of `prompts` wrote into `outdir`.

    The model is merged into a copy first (an attack adapter stays in it); the new adapter sits on that
    merged model. `attack.finetune` does the training with its `harmful-10` hyperparameters (the data
    are ours: extract-split prompts and refusals, checked against the eval splits).
    """
    from ..attack import finetune

    if not prompts:
        raise SafetylockError("safety SFT needs at least one prompt")
    merged = merged_copy(model)
    examples = refusal_examples(prompts, seed)
    result = finetune(merged, tokenizer, "harmful-10", outdir, data=examples, steps=steps, batch_size=batch_size,
                      lr=lr, rank=rank, seed=seed, overwrite=overwrite, progress=progress, name="safety-sft")
    outdir = Path(outdir)
    info = {"defense": "safety-sft", "examples": len(examples), "steps": result.steps, "seconds": result.seconds,
            "final_loss": result.final_loss, "base": result.config.get("base"),
            "adapter_sha256": sha256_file(outdir / "adapter_model.safetensors")}
    write_json(outdir / SFT_MARKER, info)
    return info


class SafetySFT(Defense):
    """A LoRA adapter trained by `train_safety_sft`, on a merged copy of the compromised model."""

    name = "safety-sft"

    def __init__(self, adapter_dir: str | Path, force: bool = False) -> None:
        self.adapter_dir = Path(adapter_dir).expanduser()
        marker = self.adapter_dir / SFT_MARKER
        if not marker.is_file() or not (self.adapter_dir / "adapter_model.safetensors").is_file():
            raise SafetylockError(f"{self.adapter_dir} holds no safety-SFT adapter; train one with train_safety_sft")
        self.info = json.loads(marker.read_text(encoding="utf-8"))
        self.force = force

    @contextlib.contextmanager
    def applied(self, model: Any, alpha: float | None = None) -> Iterator[Any]:
        from ..attack import base_digest as _base_digest
        from ..models import attach_adapter

        merged = merged_copy(model)
        recorded = (self.info.get("base") or {}).get("digest")
        if recorded and recorded != _base_digest(merged) and not self.force:
            raise SafetylockError(f"the safety-SFT adapter in {self.adapter_dir} was trained on another model "
                                  "(weights digest differs); train it on this (compromised) model")
        wrapped = attach_adapter(merged, self.adapter_dir)
        wrapped.eval()
        try:
            yield wrapped
        finally:
            del wrapped, merged

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "adapter": str(self.adapter_dir), "steps": self.info.get("steps"),
                "examples": self.info.get("examples")}
