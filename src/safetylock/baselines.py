"""Baseline defenses to compare SafetyLock with, each a real implementation behind one interface.

A `Defense` has a `name`, an optional `system` prompt the deployment uses, and `applied(model, alpha)`:
a context manager that yields the defended model for generation and leaves `model` computing exactly
what it did before once the block exits (hooks removed, baked biases restored, copies discarded).

| name              | what it does                                                                     | artifact              |
|-------------------|----------------------------------------------------------------------------------|-----------------------|
| none              | nothing (the compromised model as is)                                            | -                     |
| safetylock        | the lock's per-head shifts, baked into o_proj biases (or conditional hooks)      | lock .safetensors     |
| iti               | inference-time intervention (Li et al. 2023): per-head probes on the last reply   | lock .safetensors     |
|                   | token, top-K heads shifted by alpha * std * mass-mean direction, generated tokens |                       |
|                   | only                                                                             |                       |
| refusal-direction | activation addition (Arditi et al. 2024): mean(harmful) - mean(harmless) residual | .safetensors + JSON   |
|                   | stream at the post-instruction token, best layer by held-out separation, added    |                       |
|                   | to that layer's output at every position                                         |                       |
| self-reminder     | a safety system prompt (Xie et al. 2023), `SELF_REMINDER`                         | -                     |
| safety-sft        | LoRA fine-tuning of the compromised model on refusals of extract-split prompts    | peft adapter + JSON   |
| resta             | RESTA (Bhardwaj et al. 2024): alpha * (aligned - harmful fine-tune) added to the  | vector .safetensors   |
|                   | weights, optional DARE of the fine-tune's delta (`repair`)                        |                       |
| safe-lora         | Safe LoRA (Hsu et al. 2024): LoRA updates projected on aligned - harmful where    | vector .safetensors   |
|                   | their cosine to the projection is below alpha (`repair`)                          |                       |
| gate-refusal      | the conditional lock's gate alone: a flagged prompt gets a fixed refusal message  | lock .safetensors     |
| guard             | the base as a zero-shot prompt screen; flagged prompts get a fixed refusal        | guard .safetensors    |
|                   | (`guard`, `screen.forced_reply`)                                                  |                       |

Every artifact is safetensors plus JSON metadata naming the model it was fitted on (its fingerprint);
loading refuses a file of another format or version, applying refuses a model of another shape.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .arch import decoder_layers, unwrap
from .errors import SafetylockError, check_alpha
from .files import read_tagged_safetensors, sha256_file, sha256_text, write_json, write_tagged_safetensors
from .lock import DEFAULT_ALPHA, SHAPE_KEYS, Lock, Pair, extract, split_pairs

DEFENSES = ("none", "safetylock", "safetylock-conditional", "iti", "refusal-direction", "self-reminder", "safety-sft",
            "resta", "safe-lora", "guard", "gate-refusal")
DIRECTION_FORMAT = "safetylock.refusal-direction"
DIRECTION_VERSION = 1
SFT_MARKER = "safety_sft.json"

# Xie et al. 2023, "Defending ChatGPT against jailbreak attack via self-reminders" (Nature Machine
# Intelligence), system-mode reminder with "ChatGPT" replaced by a neutral name. The paper also appends
# a reminder after the user's query; the evaluation harness has no per-prompt wrapper, so only the
# system part is used here.
SELF_REMINDER = (
    "You are a responsible AI assistant and must not generate harmful or misleading content! "
    "Please answer the following user query in a responsible way."
)
ITI_POSITIONS = "response:-1"  # Li et al. probe the last token of question + answer
ITI_HEADS = 48  # Li et al.'s K on LLaMA-7B; capped at the model's head count
ITI_ALPHA = 15.0  # Li et al.'s alpha (in units of the activations' std along the direction)


# ---------------------------------------------------------------------------------------------------------
# The interface


class Defense:
    """A defense: `applied(model, alpha)` yields the defended model; `system` is its system prompt, if any."""

    name = "none"
    system: str | None = None
    default_alpha: float | None = None  # None: the defense has no strength to sweep

    @contextlib.contextmanager
    def applied(self, model: Any, alpha: float | None = None) -> Iterator[Any]:
        """Yield the defended model; on exit `model` computes exactly what it did before."""
        yield model

    def describe(self) -> dict[str, Any]:
        """Return the defense's name and settings (stored next to results)."""
        return {"name": self.name, "system": self.system}


class NoDefense(Defense):
    """The undefended model."""

    name = "none"


class SelfReminder(Defense):
    """A safety system prompt; the model itself is untouched."""

    name = "self-reminder"

    def __init__(self, system: str = SELF_REMINDER) -> None:
        if not system.strip():
            raise SafetylockError("the self-reminder system prompt is empty")
        self.system = system


class LockDefense(Defense):
    """SafetyLock: bake the lock at `alpha` (restored exactly on exit), or apply it conditionally by hooks.

    A thin adapter over `Deployment`, the one path a lock is applied by. `force` defaults to False there, in
    `Lock.applied` and `Lock.bake`, in `calibrate` and in `check_transfer`: a lock steers the heads of the base it
    was found on, so applying it to a model that does not descend from that base is refused unless asked for
    (the shapes must match even then). A LoRA or full fine-tune of the base passes the check without it.
    """

    name = "safetylock"

    def __init__(self, lock: Lock, conditional: bool = False, force: bool = False) -> None:
        if conditional and not lock.has_condition:
            raise SafetylockError("this lock has no harmfulness probe; extract it with --conditional or drop conditional")
        self.lock = lock
        self.conditional = conditional
        self.force = force
        self.default_alpha = lock.default_alpha

    @contextlib.contextmanager
    def applied(self, model: Any, alpha: float | None = None) -> Iterator[Any]:
        from .deployment import Deployment

        mode = "conditional" if self.conditional else "baked"
        with Deployment(lock=self.lock, mode=mode, alpha=alpha, force=self.force, model=model) as ready:
            yield ready

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "conditional": self.conditional, "default_alpha": self.default_alpha,
                "heads": len(self.lock)}


class GateRefusal(Defense):
    """Gate-only refusal: the lock's harmfulness gate decides, and a flagged prompt gets a fixed refusal message;
    nothing is steered. The honest baseline the conditional lock's gate enables on its own."""

    name = "gate-refusal"

    def __init__(self, lock: Lock, tokenizer: Any = None, message: str | None = None, force: bool = False) -> None:
        if not lock.has_condition:
            raise SafetylockError("gate-refusal needs a lock with a harmfulness gate; extract it with --conditional")
        from .screen import REFUSAL_MESSAGE

        self.lock = lock
        self.tokenizer = tokenizer
        self.message = message or REFUSAL_MESSAGE
        self.force = force
        self.last: Any = None

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            from .models import model_source

            name = self.lock.fingerprint.get("name")
            if not name:
                raise SafetylockError("this lock does not name its model; pass the tokenizer to GateRefusal")
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_source(str(name))))
        return self.tokenizer

    @contextlib.contextmanager
    def applied(self, model: Any, alpha: float | None = None) -> Iterator[Any]:
        from .lock.gate import gate_logits_on_ids
        from .screen import forced_reply

        self.lock.validate(model, force=self.force)

        def decide(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return gate_logits_on_ids(self.lock, model, ids, mask) > 0

        with forced_reply(model, self._tokenizer(), decide, self.message) as screen:
            self.last = screen
            yield model

    def describe(self) -> dict[str, Any]:
        screen = self.last
        return {"name": self.name, "message": self.message, "gate": self.lock.metadata.get("condition", {}).get("design", "builtin"),
                "seconds_per_prompt": screen.seconds_per_prompt if screen is not None else None}


class ITIDefense(Defense):
    """Inference-time intervention: the lock's head shifts at generated positions only (forward pre-hooks)."""

    name = "iti"

    def __init__(self, lock: Lock, force: bool = False) -> None:
        if lock.metadata.get("baseline") != "iti":
            raise SafetylockError("this lock file was not fitted by fit_iti (no 'baseline: iti' in its metadata)")
        self.lock = lock
        self.force = force
        self.default_alpha = lock.default_alpha

    @contextlib.contextmanager
    def applied(self, model: Any, alpha: float | None = None) -> Iterator[Any]:
        with self.lock.applied(model, alpha=alpha, positions="generation", force=self.force):
            yield model

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "default_alpha": self.default_alpha, "heads": len(self.lock),
                "positions": "generation"}


# ---------------------------------------------------------------------------------------------------------
# ITI


def fit_iti(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[Pair],
    *,
    heads: int = ITI_HEADS,
    alpha: float = ITI_ALPHA,
    seed: int = 0,
    val_fraction: float = 0.25,
    batch_size: int = 8,
    progress: bool = False,
    name: str | None = None,
) -> Lock:
    """Return ITI's head directions as a lock: probes on the last reply token, top-K heads by held-out accuracy.

    This is Li et al.'s recipe (per-head logistic probes on the last token of prompt + answer, the K most
    accurate heads, mass-mean shift scaled by the std of activations along it), with (safe, unsafe)
    replies in place of (true, false) answers. Applied with `positions="generation"`, as ITI shifts
    only the positions that produce new tokens.
    """
    lock = extract(model, tokenizer, pairs, heads=heads, positions=ITI_POSITIONS, seed=seed, val_fraction=val_fraction,
                   alpha=alpha, batch_size=batch_size, progress=progress, name=name)
    lock.metadata["method"] = ("iti (Li et al. 2023): per-head logistic probes on the last reply token, "
                               "top-K heads, mass-mean directions (safe - unsafe), shift at generated positions")
    lock.metadata["baseline"] = "iti"
    return lock


# ---------------------------------------------------------------------------------------------------------
# Refusal direction (difference in means of the residual stream)


def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def residual_activations(model: Any, tokenizer: Any, prompts: Sequence[str], *, batch_size: int = 8,
                         system: str | None = None) -> torch.Tensor:
    """Return (prompts, layers, hidden) float32: each decoder layer's output at the prompt's last template token."""
    from .generate import format_chat

    if not prompts:
        raise SafetylockError("residual_activations needs at least one prompt")
    layers = decoder_layers(model)
    device = model.get_input_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [tokenizer(format_chat(tokenizer, p, system), add_special_tokens=False)["input_ids"] for p in prompts]
    store: list[list[torch.Tensor]] = [[] for _ in layers]
    state: dict[str, torch.Tensor] = {}

    def make_hook(index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = _layer_output(output)
            store[index].append(hidden[state["rows"], state["cols"]].float().cpu())

        return hook

    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        for start in range(0, len(encoded), max(1, batch_size)):
            batch = encoded[start : start + batch_size]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, seq in enumerate(batch):
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
            state["rows"] = torch.arange(len(batch), device=device)
            state["cols"] = torch.tensor([len(s) - 1 for s in batch], device=device)
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([torch.cat(per_layer) for per_layer in store], dim=1)


def layer_separation(harmful: torch.Tensor, harmless: torch.Tensor, train_h: np.ndarray, val_h: np.ndarray,
                     train_b: np.ndarray, val_b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Return per-layer (train mean differences (L, hidden), held-out Cohen's d of projections on them (L,))."""
    diffs = harmful[train_h].double().mean(0) - harmless[train_b].double().mean(0)  # (L, hidden)
    norms = diffs.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    unit = diffs / norms
    ph = (harmful[val_h].double() * unit).sum(-1)  # (n_val_h, L)
    pb = (harmless[val_b].double() * unit).sum(-1)
    var_h = ph.var(0, unbiased=False) if ph.shape[0] > 1 else torch.zeros(ph.shape[1], dtype=torch.float64)
    var_b = pb.var(0, unbiased=False) if pb.shape[0] > 1 else torch.zeros(pb.shape[1], dtype=torch.float64)
    pooled = ((var_h + var_b) / 2).sqrt() + 1e-12
    return diffs.float(), ((ph.mean(0) - pb.mean(0)) / pooled).float()


@dataclass
class RefusalDirection:
    """The chosen layer's mean difference (harmful - harmless), all layers' differences and their separations."""

    layer: int
    direction: torch.Tensor  # (hidden,) unnormalised mean difference at `layer`
    directions: torch.Tensor  # (L, hidden) per-layer mean differences (train split)
    separation: torch.Tensor  # (L,) held-out Cohen's d per layer
    metadata: dict[str, Any] = field(default_factory=dict)

    name = "refusal-direction"

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self.metadata.get("fingerprint") or {})

    def save(self, path: str | Path) -> Path:
        """Write the direction as safetensors with its metadata as JSON in the header, atomically."""
        meta = {"format": DIRECTION_FORMAT, "format_version": DIRECTION_VERSION, **self.metadata, "layer": self.layer}
        tensors = {"direction": self.direction.contiguous(), "directions": self.directions.contiguous(),
                   "separation": self.separation.contiguous()}
        return write_tagged_safetensors(Path(path), tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> RefusalDirection:
        """Read a file written by `save`; refuse anything else with a one-line reason."""
        path = Path(path).expanduser()
        tensors, meta = read_tagged_safetensors(path, DIRECTION_FORMAT, "refusal-direction file",
                                                "fit one with fit_refusal_direction", DIRECTION_VERSION)
        if any(k not in tensors for k in ("direction", "directions", "separation")):
            raise SafetylockError(f"{path} lacks a tensor; the file is damaged, fit the direction again")
        layer = int(meta.pop("layer"))
        out = cls(layer, tensors["direction"], tensors["directions"], tensors["separation"], meta)
        if out.direction.shape != out.directions.shape[1:] or not 0 <= layer < out.directions.shape[0]:
            raise SafetylockError(f"{path}: direction shape {tuple(out.direction.shape)} or layer {layer} "
                                  f"does not match the per-layer table {tuple(out.directions.shape)}")
        if not torch.isfinite(out.direction).all():
            raise SafetylockError(f"{path}: the direction holds NaN/inf; fit it again")
        return out

    def validate(self, model: Any) -> None:
        """Raise unless the direction was fitted on a model of this shape."""
        from .models import fingerprint

        recorded = self.fingerprint
        if not recorded:
            raise SafetylockError("the refusal direction records no model fingerprint; fit it again")
        current = fingerprint(unwrap(model))
        bad = [f"{k} {recorded[k]} (direction) vs {current.get(k)} (model)" for k in SHAPE_KEYS
               if k in recorded and recorded[k] != current.get(k)]
        if bad:
            raise SafetylockError(f"the refusal direction was fitted on a model of another shape: {'; '.join(bad)}")

    @contextlib.contextmanager
    def applied(self, model: Any, coeff: float = 1.0) -> Iterator[Any]:
        """Add `coeff * direction` to the chosen layer's output at every position (a forward hook); yield the model."""
        self.validate(model)
        layer = decoder_layers(model)[self.layer]

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            hidden = _layer_output(output)
            shifted = hidden + (coeff * self.direction).to(device=hidden.device, dtype=hidden.dtype)
            return (shifted, *output[1:]) if isinstance(output, tuple) else shifted

        handle = layer.register_forward_hook(hook)
        try:
            yield model
        finally:
            handle.remove()


def fit_refusal_direction(
    model: Any,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    val_fraction: float = 0.25,
    seed: int = 0,
    max_layer_fraction: float = 0.8,
    batch_size: int = 8,
    name: str | None = None,
) -> RefusalDirection:
    """Return the refusal direction: harmful-minus-harmless mean residual stream at the post-instruction token.

    Means come from a train split of each prompt set; the layer is the one whose direction best separates
    the held-out prompts (Cohen's d of projections), among the first `max_layer_fraction` of the layers
    (Arditi et al. discard the last ones, whose directions act mostly on the unembedding).
    """
    from . import __version__
    from .lock import template_token_count
    from .models import fingerprint

    if len(harmful) < 2 or len(harmless) < 2:
        raise SafetylockError("the refusal direction needs at least 2 harmful and 2 harmless prompts")
    if not 0 < max_layer_fraction <= 1:
        raise SafetylockError(f"max_layer_fraction must be in (0, 1], got {max_layer_fraction}")
    acts_h = residual_activations(model, tokenizer, harmful, batch_size=batch_size)
    acts_b = residual_activations(model, tokenizer, harmless, batch_size=batch_size)
    train_h, val_h = split_pairs(len(harmful), val_fraction, seed)
    train_b, val_b = split_pairs(len(harmless), val_fraction, seed + 1)
    diffs, sep = layer_separation(acts_h, acts_b, train_h, val_h, train_b, val_b)
    n_layers = diffs.shape[0]
    allowed = max(1, int(n_layers * max_layer_fraction))
    layer = int(torch.argmax(sep[:allowed]))
    metadata = {
        "library": "safetylock",
        "version": __version__,
        "method": "refusal direction (Arditi et al. 2024): mean(harmful) - mean(harmless) residual stream at the "
                  "last template token; layer by held-out Cohen's d; applied as activation addition",
        "fingerprint": fingerprint(unwrap(model), name),
        "fit": {"harmful": len(harmful), "harmless": len(harmless), "val_fraction": val_fraction, "seed": seed,
                "max_layer_fraction": max_layer_fraction, "layers_considered": allowed,
                "template_tokens": template_token_count(tokenizer),
                "prompts_sha256": sha256_text(*harmful, "\x1e", *harmless),
                "separation": [round(float(v), 4) for v in sep]},
    }
    return RefusalDirection(layer, diffs[layer].clone(), diffs, sep, metadata)


class RefusalDirectionDefense(Defense):
    """Activation addition of the refusal direction; alpha is the coefficient (1 = the raw mean difference)."""

    name = "refusal-direction"
    default_alpha = 1.0

    def __init__(self, direction: RefusalDirection) -> None:
        self.direction = direction

    @contextlib.contextmanager
    def applied(self, model: Any, alpha: float | None = None) -> Iterator[Any]:
        with self.direction.applied(model, coeff=self.default_alpha if alpha is None else check_alpha(alpha, "alpha")):
            yield model

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "layer": self.direction.layer, "default_alpha": self.default_alpha}


# ---------------------------------------------------------------------------------------------------------
# Safety SFT


def refusal_examples(prompts: Sequence[str], seed: int = 0) -> list[Any]:
    """Return fine-tuning examples pairing each prompt with a varied refusal (`data.refusal_response`)."""
    from .attack import Example
    from .data import refusal_response

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
    from .attack import finetune

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
        from .attack import base_digest as _base_digest
        from .models import attach_adapter

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


# ---------------------------------------------------------------------------------------------------------
# By name


def make_defense(name: str, artifact: str | Path | None = None, *, conditional: bool = False,
                 system: str | None = None, force: bool = False) -> Defense:
    """Return the defense `name` built from its artifact (lock file, direction file or adapter directory).

    `force` goes to the defenses that check their artifact fits the model (the locks, ITI, the gate, safety SFT).
    """
    if name not in DEFENSES:
        raise SafetylockError(f"unknown defense '{name}'; known: {', '.join(DEFENSES)}")
    needs = {"safetylock": "a lock file", "safetylock-conditional": "a lock file with a harmfulness probe", "iti": "an ITI lock file (fit_iti)",
             "refusal-direction": "a refusal-direction file", "safety-sft": "a safety-SFT adapter directory",
             "resta": "a RESTA safety-vector file (repair.fit_resta)",
             "safe-lora": "a Safe LoRA safety-vector file (repair.fit_safe_lora)", "guard": "a guard file (guard.fit_guard)",
             "gate-refusal": "a lock file with a harmfulness gate"}
    if name in needs and artifact is None:
        raise SafetylockError(f"defense '{name}' needs {needs[name]}; pass --defense-file PATH")
    if name == "none":
        return NoDefense()
    if name == "self-reminder":
        return SelfReminder(system or SELF_REMINDER)
    assert artifact is not None
    if name == "safetylock":
        return LockDefense(Lock.load(artifact), conditional=conditional, force=force)
    if name == "safetylock-conditional":
        return LockDefense(Lock.load(artifact), conditional=True, force=force)
    if name == "iti":
        return ITIDefense(Lock.load(artifact), force=force)
    if name == "refusal-direction":
        return RefusalDirectionDefense(RefusalDirection.load(artifact))
    if name in ("resta", "safe-lora"):
        from .repair import RestaDefense, SafeLoraDefense, SafetyVector

        vector = SafetyVector.load(artifact)
        return RestaDefense(vector) if name == "resta" else SafeLoraDefense(vector)
    if name == "gate-refusal":
        return GateRefusal(Lock.load(artifact), force=force)
    if name == "guard":
        from .guard import GuardDefense

        return GuardDefense.load(artifact)
    return SafetySFT(artifact, force=force)


def timed_enter(stack: contextlib.ExitStack, defense: Defense, model: Any, alpha: float | None) -> tuple[Any, float]:
    """Enter `defense.applied(model, alpha)` on `stack`; return (defended model, seconds it took)."""
    start = time.perf_counter()
    defended = stack.enter_context(defense.applied(model, alpha))
    return defended, time.perf_counter() - start


__all__ = [
    "DEFAULT_ALPHA",
    "DEFENSES",
    "Defense",
    "ITIDefense",
    "LockDefense",
    "NoDefense",
    "RefusalDirection",
    "RefusalDirectionDefense",
    "SELF_REMINDER",
    "SafetySFT",
    "SelfReminder",
    "fit_iti",
    "fit_refusal_direction",
    "make_defense",
    "merged_copy",
    "refusal_examples",
    "residual_activations",
    "train_safety_sft",
]
