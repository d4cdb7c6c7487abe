"""The safety vector V = theta_aligned - theta_unaligned: its parts, its file, and fitting it from two models."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import unwrap
from ..errors import SafetylockError
from ..files import read_tagged_safetensors, write_tagged_safetensors
from .weights import base_weight, has_lora, linear_modules, lora_delta, lora_factors

VECTOR_FORMAT = "safetylock.safety-vector"
VECTOR_VERSION = 1
UNALIGNED_ATTACK = "harmful-100"  # the harmful fine-tune of the base whose update V reverses


@dataclass
class VectorPart:
    """One module's V: LoRA factors (V = -scale * B @ A) or a dense difference (V = delta)."""

    lora_b: torch.Tensor | None = None  # (out, r)
    lora_a: torch.Tensor | None = None  # (r, in)
    scale: float = 1.0
    delta: torch.Tensor | None = None  # (out, in)

    @property
    def shape(self) -> tuple[int, int]:
        if self.delta is not None:
            return int(self.delta.shape[0]), int(self.delta.shape[1])
        assert self.lora_b is not None and self.lora_a is not None
        return int(self.lora_b.shape[0]), int(self.lora_a.shape[1])

    def dense(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Return V as a float32 (out, in) matrix on `device`."""
        if self.delta is not None:
            return self.delta.to(device=device, dtype=torch.float32)
        assert self.lora_b is not None and self.lora_a is not None
        return -lora_delta(self.lora_b.to(device), self.lora_a.to(device), self.scale)


@dataclass
class SafetyVector:
    """V = theta_aligned - theta_unaligned per module, with the defense and settings it was fitted for."""

    parts: dict[str, VectorPart]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def defense(self) -> str:
        return str(self.metadata.get("defense", ""))

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.metadata.get("settings") or {})

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self.metadata.get("fingerprint") or {})

    def save(self, path: str | Path) -> Path:
        """Write the vector as safetensors (factors or dense parts) with its metadata as JSON in the header."""
        tensors: dict[str, torch.Tensor] = {}
        scales: dict[str, float] = {}
        for name, part in self.parts.items():
            if part.delta is not None:
                tensors[f"{name}.delta"] = part.delta.contiguous()
            else:
                assert part.lora_b is not None and part.lora_a is not None
                tensors[f"{name}.lora_B"] = part.lora_b.contiguous()
                tensors[f"{name}.lora_A"] = part.lora_a.contiguous()
                scales[name] = float(part.scale)
        meta = {"format": VECTOR_FORMAT, "format_version": VECTOR_VERSION, **self.metadata, "scales": scales}
        return write_tagged_safetensors(Path(path), tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> SafetyVector:
        """Read a file written by `save`; refuse anything else with a one-line reason."""
        path = Path(path).expanduser()
        tensors, meta = read_tagged_safetensors(path, VECTOR_FORMAT, "safety-vector file",
                                                "fit one with fit_resta or fit_safe_lora", VECTOR_VERSION)
        scales = meta.pop("scales", None) or {}
        names = sorted({key.rsplit(".", 1)[0] for key in tensors})
        parts: dict[str, VectorPart] = {}
        for name in names:
            if f"{name}.delta" in tensors:
                part = VectorPart(delta=tensors[f"{name}.delta"])
            elif f"{name}.lora_B" in tensors and f"{name}.lora_A" in tensors and name in scales:
                b, a = tensors[f"{name}.lora_B"], tensors[f"{name}.lora_A"]
                if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
                    raise SafetylockError(f"{path}: the factors of {name} do not multiply; the file is damaged")
                part = VectorPart(b, a, float(scales[name]))
            else:
                raise SafetylockError(f"{path} lacks a tensor or scale of {name}; the file is damaged, fit it again")
            if not all(torch.isfinite(t).all() for t in (part.delta, part.lora_b, part.lora_a) if t is not None):
                raise SafetylockError(f"{path}: the vector of {name} holds NaN/inf; fit it again")
            parts[name] = part
        if not parts:
            raise SafetylockError(f"{path} holds no module; fit the vector again")
        return cls(parts, meta)

    def validate(self, model: Any) -> dict[str, nn.Module]:
        """Return {module path: module} of `model` for the vector's parts; raise unless every shape fits."""
        from ..lock import SHAPE_KEYS
        from ..models import fingerprint

        recorded = self.fingerprint
        if not recorded:
            raise SafetylockError("the safety vector records no model fingerprint; fit it again")
        current = fingerprint(unwrap(model))
        bad = [f"{k} {recorded[k]} (vector) vs {current.get(k)} (model)" for k in SHAPE_KEYS
               if k in recorded and recorded[k] != current.get(k)]
        if bad:
            raise SafetylockError(f"the safety vector was fitted on a model of another shape: {'; '.join(bad)}")
        modules = linear_modules(model)
        for name, part in self.parts.items():
            if name not in modules:
                raise SafetylockError(f"the safety vector changes {name}, which this model does not have")
            have = tuple(base_weight(modules[name]).shape)
            if have != part.shape:
                raise SafetylockError(f"{name} is {have} in the model but {part.shape} in the safety vector; "
                                      "it was fitted on a model of another shape")
        return {name: modules[name] for name in self.parts}


def safety_vector_parts(unaligned: Any, aligned: Any | None = None) -> dict[str, VectorPart]:
    """Return V per module: minus the LoRA update of `unaligned` (a peft model on the aligned base), or, with
    `aligned`, the dense difference aligned - unaligned of every Linear that differs (a full fine-tune)."""
    if aligned is None:
        parts: dict[str, VectorPart] = {}
        for name, module in linear_modules(unaligned).items():
            factors = lora_factors(module)
            if len(factors) > 1:
                raise SafetylockError(f"{name} has {len(factors)} active adapters; the harmful fine-tune must be one")
            for _, b, a, scale in factors:
                parts[name] = VectorPart(b.detach().float().cpu().clone(), a.detach().float().cpu().clone(), scale)
        if not parts:
            raise SafetylockError("the unaligned model has no active LoRA adapter; pass the harmful LoRA fine-tune of "
                                  "the aligned base, or a full fine-tune with aligned=")
        return parts
    if has_lora(unaligned) or has_lora(aligned):
        raise SafetylockError("a dense safety vector compares two plain models; merge the adapters first")
    mine, theirs = linear_modules(aligned), linear_modules(unaligned)
    parts = {}
    with torch.no_grad():
        for name, module in mine.items():
            other = theirs.get(name)
            if other is None or base_weight(other).shape != base_weight(module).shape:
                raise SafetylockError(f"the unaligned model lacks {name} or has it in another shape; it must be a "
                                      "fine-tune of the aligned model")
            delta = base_weight(module).float().cpu() - base_weight(other).float().cpu()
            if bool(delta.any()):
                parts[name] = VectorPart(delta=delta)
    if not parts:
        raise SafetylockError("the aligned and unaligned models have the same weights; nothing to subtract")
    return parts


def fit_safety_vector(unaligned: Any, aligned: Any | None = None, *, defense: str, settings: dict[str, Any],
                      name: str | None = None) -> SafetyVector:
    """Return the safety vector (see `safety_vector_parts`) tagged for `defense` with its settings."""
    from .. import __version__
    from ..models import fingerprint

    start = time.perf_counter()
    parts = safety_vector_parts(unaligned, aligned)
    base = unwrap(unaligned) if aligned is None else unwrap(aligned)
    kind = "lora" if aligned is None else "dense"
    meta = {
        "library": "safetylock",
        "version": __version__,
        "method": {"resta": "RESTA (Bhardwaj et al. 2024): add coef * (aligned - unaligned) to the fine-tuned weights",
                   "safe-lora": "Safe LoRA (Hsu et al. 2024): project LoRA updates on V = aligned - unaligned where "
                                "their cosine to the projection is below the threshold"}[defense],
        "defense": defense,
        "settings": settings,
        "fingerprint": fingerprint(base, name),
        "source": {"kind": kind, "modules": len(parts),
                   "unaligned": getattr(unaligned, "safetylock_spec", None) or getattr(base, "safetylock_spec", None)},
        "extract_seconds": round(time.perf_counter() - start, 3),
    }
    return SafetyVector(parts, meta)
