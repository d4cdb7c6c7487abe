"""Safe LoRA (Hsu et al. 2024): LoRA updates projected on the safety vector's column space where they stray."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..baselines import Defense
from ..errors import SafetylockError, check_alpha
from .vector import SafetyVector, VectorPart, fit_safety_vector
from .weights import has_lora, linear_modules, lora_factors, restoring

SAFE_LORA_THRESHOLD = 0.5
PROJECTIONS = ("approx", "exact")
_FP32_EPS = float(torch.finfo(torch.float32).eps)


def projector(part: VectorPart, projection: str = "approx") -> tuple[torch.Tensor, torch.Tensor]:
    """Return (U, w), float64, with C = U diag(w) U^T: Safe LoRA's projection for one module's V.

    U is an orthonormal basis of V's column space (from thin QRs of the factors and an r x r SVD, or an SVD of a
    dense V). "approx" is the paper's C = V V^T / ||V||_F, so w = sigma^2 / ||sigma||; "exact" is the orthogonal
    projector onto the column space, w = 1 on the directions above float32 rounding.
    """
    if projection not in PROJECTIONS:
        raise SafetylockError(f"unknown Safe LoRA projection '{projection}'; use one of {', '.join(PROJECTIONS)}")
    if part.delta is not None:
        u, sigma, _ = torch.linalg.svd(part.delta.double(), full_matrices=False)
    else:
        assert part.lora_b is not None and part.lora_a is not None
        q1, t1 = torch.linalg.qr(-part.scale * part.lora_b.double())
        _, t2 = torch.linalg.qr(part.lora_a.double().T)  # V's row space is not needed
        p, sigma, _ = torch.linalg.svd(t1 @ t2.T)
        u = q1 @ p
    norm = float(sigma.norm())
    if norm == 0.0:
        return u[:, :0], sigma[:0]
    if projection == "approx":
        return u, sigma.square() / norm
    keep = sigma > sigma.max() * max(part.shape) * _FP32_EPS
    return u[:, keep], torch.ones(int(keep.sum()), dtype=torch.float64)


def project_lora(lora_b: torch.Tensor, lora_a: torch.Tensor, u: torch.Tensor,
                 w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Return (C B in B's dtype, cos(B A, C B A)) for C = U diag(w) U^T; the update C dW is (C B) @ A.

    The Frobenius cosine is read from r x r matrices: <X A, Y A> = tr(X^T Y A A^T). A zero update has
    nothing to project (cosine 1); an update that C annihilates has cosine 0.
    """
    b, a = lora_b.double().cpu(), lora_a.double().cpu()
    cb = u @ (w[:, None] * (u.T @ b))
    gram = a @ a.T

    def inner(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(((x.T @ y) * gram).sum())

    own = inner(b, b)
    if own <= 0.0:
        return lora_b.clone(), 1.0
    projected = inner(cb, cb)
    cosine = inner(b, cb) / math.sqrt(own * projected) if projected > 0.0 else 0.0
    return cb.to(device=lora_b.device, dtype=lora_b.dtype), cosine


def _safe_lora_settings(threshold: float, projection: str) -> dict[str, Any]:
    if projection not in PROJECTIONS:
        raise SafetylockError(f"unknown Safe LoRA projection '{projection}'; use one of {', '.join(PROJECTIONS)}")
    return {"threshold": check_threshold(threshold), "projection": projection}


def check_threshold(value: object) -> float:
    """Return Safe LoRA's cosine threshold as a float in (0, 1]; raise otherwise."""
    number = check_alpha(value, "the Safe LoRA threshold")
    if number > 1:
        raise SafetylockError(f"the Safe LoRA threshold is a cosine similarity in (0, 1], got {number!r}")
    return number


def fit_safe_lora(unaligned: Any, aligned: Any | None = None, *, threshold: float = SAFE_LORA_THRESHOLD,
                  projection: str = "approx", name: str | None = None) -> SafetyVector:
    """Return Safe LoRA's alignment matrices V from the harmful fine-tune of the aligned base.

    `threshold` (the default strength) is the cosine below which a module's update is projected; `projection`
    is "approx" (the paper's V V^T / ||V||_F) or "exact" (orthogonal projector on V's columns).
    """
    return fit_safety_vector(unaligned, aligned, defense="safe-lora",
                             settings=_safe_lora_settings(threshold, projection), name=name)


@dataclass
class Projection:
    """What one Safe LoRA application did: per (module, adapter) its cosine and whether it was projected."""

    similarity: dict[str, float] = field(default_factory=dict)
    projected: list[str] = field(default_factory=list)


@contextlib.contextmanager
def safe_lora_applied(model: Any, vector: SafetyVector, threshold: float = SAFE_LORA_THRESHOLD,
                      projection: str = "approx") -> Iterator[Projection]:
    """Project the model's LoRA updates where cos(dW, C dW) < threshold, inside the block; yield what was done."""
    threshold = check_threshold(threshold)
    vector.validate(model)
    modules = linear_modules(model)
    if not has_lora(model):
        raise SafetylockError("Safe LoRA projects a LoRA adapter's update and this model has no active LoRA adapter "
                              "(a plain or fully fine-tuned model); use resta for those")
    report = Projection()
    factors = {name: lora_factors(modules[name]) for name in vector.parts}
    if not any(factors.values()):
        raise SafetylockError("the model's LoRA adapter touches none of the modules the safety vector covers")
    weights: dict[str, torch.Tensor] = {}
    with restoring(weights) as saved:
        with torch.no_grad():
            for name, found in factors.items():
                if not found:
                    continue
                u, w = projector(vector.parts[name], projection)
                for adapter, b, a, _ in found:
                    key = f"{name}:{adapter}"
                    projected, cosine = project_lora(b.detach(), a.detach(), u, w)
                    report.similarity[key] = cosine
                    if cosine < threshold:
                        weights[key] = b
                        saved[key] = b.detach().clone()
                        b.copy_(projected)
                        report.projected.append(key)
        yield report


class SafeLoraDefense(Defense):
    """Safe LoRA: LoRA updates projected on the alignment subspace where they stray; alpha is the cosine threshold."""

    name = "safe-lora"

    def __init__(self, vector: SafetyVector, projection: str | None = None) -> None:
        if vector.defense != "safe-lora":
            raise SafetylockError(f"this safety vector was fitted for '{vector.defense}', not safe-lora; fit one with "
                                  "fit_safe_lora")
        settings = vector.settings
        self.vector = vector
        self.projection = str(projection or settings.get("projection", "approx"))
        self.threshold: float = _safe_lora_settings(settings.get("threshold", SAFE_LORA_THRESHOLD),
                                                    self.projection)["threshold"]
        self.default_alpha = self.threshold
        self.last: Projection | None = None

    @contextlib.contextmanager
    def applied(self, model: Any, alpha: float | None = None) -> Iterator[Any]:
        threshold = self.threshold if alpha is None else check_threshold(alpha)
        with safe_lora_applied(model, self.vector, threshold, self.projection) as report:
            self.last = report
            yield model

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "default_alpha": self.default_alpha, "projection": self.projection,
                               "modules": len(self.vector.parts)}
        if self.last is not None:
            out["projected"] = len(self.last.projected)
            out["considered"] = len(self.last.similarity)
        return out
