"""The refusal direction (Arditi et al. 2024): a residual-stream difference in means, added as activation addition."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..arch import decoder_layers, unwrap
from ..errors import SafetylockError, check_alpha
from ..files import read_tagged_safetensors, sha256_text, write_tagged_safetensors
from ..lock import SHAPE_KEYS, split_pairs
from .defense import Defense

DIRECTION_FORMAT = "safetylock.refusal-direction"
DIRECTION_VERSION = 1


def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def residual_activations(model: Any, tokenizer: Any, prompts: Sequence[str], *, batch_size: int = 8,
                         system: str | None = None) -> torch.Tensor:
    """Return (prompts, layers, hidden) float32: each decoder layer's output at the prompt's last template token."""
    from ..generate import format_chat

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
        from ..models import fingerprint

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
    from .. import __version__
    from ..lock import template_token_count
    from ..models import fingerprint

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
