"""Weight-space repairs: RESTA's safety vector (Bhardwaj et al. 2024) and Safe LoRA's projection (Hsu et al. 2024).

Both start from one artifact, the safety vector V = theta_aligned - theta_unaligned, where the unaligned
model is the aligned base fine-tuned on harmful data (the harness's `harmful-100` attack). For a LoRA fine-tune
V is minus the adapter's merged update, kept as its factors (`-scale * B @ A`, adapter-sized) on the modules
the adapter touched; for a full fine-tune it is the dense difference of every Linear that changed.

- RESTA adds `coef * V` to the customer's fine-tuned weights (coef is the strength, default 1), optionally
  after DARE (drop a fraction p of the fine-tune's own delta at random, seeded, rescale the rest by 1/(1-p)).
  A peft LoRA model is handled by folding its delta into the base weights (fp32 sum, one rounding) with its
  LoRA layers switched off, so coef 1 on the harmful fine-tune itself gives back the aligned weights exactly.
- Safe LoRA projects each LoRA module's update dW = B @ A onto V's column space, C dW with
  C = V V^T / ||V||_F (the paper's projection; `projection="exact"` uses the orthogonal projector U U^T of
  V's column space instead), but only in modules where cos(dW, C dW) (Frobenius) is below the threshold tau,
  the strength (default 0.5, the threshold option's default in the authors' code). It needs no data and no
  training: C dW = (C B) @ A, so only B changes, and the cosine comes from r x r products of the factors.

Each application changes weights in place and restores them bit for bit on exit (the originals are copied).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import unwrap
from .baselines import Defense
from .errors import SafetylockError, check_alpha
from .files import read_tagged_safetensors, write_tagged_safetensors

VECTOR_FORMAT = "safetylock.safety-vector"
VECTOR_VERSION = 1
UNALIGNED_ATTACK = "harmful-100"  # the harmful fine-tune of the base whose update V reverses
RESTA_COEF = 1.0
SAFE_LORA_THRESHOLD = 0.5
PROJECTIONS = ("approx", "exact")
_FP32_EPS = float(torch.finfo(torch.float32).eps)


# ---------------------------------------------------------------------------------------------------------
# The maths (pure functions)


def lora_delta(lora_b: torch.Tensor, lora_a: torch.Tensor, scale: float) -> torch.Tensor:
    """Return a LoRA module's merged update `(B @ A) * scale` in float32 (one formula for adapter and vector)."""
    return (lora_b.float() @ lora_a.float()) * float(scale)


def dare(delta: torch.Tensor, rate: float, seed: int) -> torch.Tensor:
    """Return `delta` with a seeded random fraction `rate` of its entries zeroed and the rest divided by 1 - rate."""
    if not 0 < rate < 1:
        raise SafetylockError(f"the DARE drop rate must lie in (0, 1), got {rate!r}")
    generator = torch.Generator(device=delta.device).manual_seed(int(seed))
    keep = torch.rand(delta.shape, generator=generator, device=delta.device) >= rate
    return torch.where(keep, delta / (1.0 - rate), torch.zeros((), dtype=delta.dtype, device=delta.device))


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


# ---------------------------------------------------------------------------------------------------------
# The artifact


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
        from .lock import SHAPE_KEYS
        from .models import fingerprint

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


# ---------------------------------------------------------------------------------------------------------
# Modules and adapters


def _lora_layer_type() -> Any:
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def linear_modules(model: Any) -> dict[str, nn.Module]:
    """Return {path: Linear or peft LoRA layer} in the transformers model, paths as in the plain model."""
    lora = _lora_layer_type()
    out: dict[str, nn.Module] = {}
    for name, module in unwrap(model).named_modules():
        parts = name.split(".")
        if any(p.startswith("lora_") or p in ("base_layer", "original_module", "modules_to_save") for p in parts):
            continue
        if isinstance(module, (lora, nn.Linear)):
            out[name] = module
    return out


def base_weight(module: Any) -> torch.Tensor:
    """Return the frozen base weight of a Linear or of a peft LoRA layer's base Linear."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    if not isinstance(module, nn.Linear):
        raise SafetylockError(f"expected a Linear projection, found {type(module).__name__} (quantized models are "
                              "not supported)")
    return module.weight


def lora_factors(module: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """Return (adapter, B weight, A weight, scale) of each active plain-LoRA adapter of a peft layer (none if off)."""
    if not isinstance(module, _lora_layer_type()) or module.disable_adapters:
        return []
    if module.merged:
        raise SafetylockError("the LoRA adapter is merged into the weights; unmerge it (or pass the merged model "
                              "without peft)")
    out = []
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        if module.lora_variant.get(adapter) is not None or module.use_dora.get(adapter):
            raise SafetylockError(f"adapter '{adapter}' is a LoRA variant (DoRA or similar); only plain LoRA is supported")
        if module.lora_bias.get(adapter) or getattr(module, "fan_in_fan_out", False):
            raise SafetylockError(f"adapter '{adapter}' has a LoRA bias or fan-in-fan-out weights; not supported")
        out.append((adapter, module.lora_B[adapter].weight, module.lora_A[adapter].weight,
                    float(module.scaling[adapter])))
    return out


def has_lora(model: Any) -> bool:
    """Return whether the model has an active plain-LoRA adapter on any Linear."""
    return any(lora_factors(m) for m in linear_modules(model).values())


def adapter_deltas(model: Any) -> dict[str, torch.Tensor]:
    """Return {module path: float32 merged update} of the model's active LoRA adapters (empty for a plain model)."""
    out: dict[str, torch.Tensor] = {}
    for name, module in linear_modules(model).items():
        for _, b, a, scale in lora_factors(module):
            delta = lora_delta(b.detach(), a.detach(), scale)
            out[name] = delta if name not in out else out[name] + delta
    return out


# ---------------------------------------------------------------------------------------------------------
# Fitting


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
    from . import __version__
    from .models import fingerprint

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


def _resta_settings(coef: float, dare_rate: float | None, seed: int) -> dict[str, Any]:
    check_alpha(coef, "the RESTA coefficient")
    if dare_rate is not None and not 0 < float(dare_rate) < 1:
        raise SafetylockError(f"the DARE drop rate must lie in (0, 1), got {dare_rate!r}")
    return {"coef": float(coef), "dare": None if dare_rate is None else float(dare_rate), "seed": int(seed)}


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


def fit_resta(unaligned: Any, aligned: Any | None = None, *, coef: float = RESTA_COEF, dare_rate: float | None = None,
              seed: int = 0, name: str | None = None) -> SafetyVector:
    """Return RESTA's safety vector from the harmful fine-tune of the aligned base (see `safety_vector_parts`).

    `coef` is the default strength; `dare_rate` (None: off) drops that fraction of the customer fine-tune's own
    delta (seeded by `seed`) before the vector is added.
    """
    return fit_safety_vector(unaligned, aligned, defense="resta", settings=_resta_settings(coef, dare_rate, seed),
                             name=name)


def fit_safe_lora(unaligned: Any, aligned: Any | None = None, *, threshold: float = SAFE_LORA_THRESHOLD,
                  projection: str = "approx", name: str | None = None) -> SafetyVector:
    """Return Safe LoRA's alignment matrices V from the harmful fine-tune of the aligned base.

    `threshold` (the default strength) is the cosine below which a module's update is projected; `projection`
    is "approx" (the paper's V V^T / ||V||_F) or "exact" (orthogonal projector on V's columns).
    """
    return fit_safety_vector(unaligned, aligned, defense="safe-lora",
                             settings=_safe_lora_settings(threshold, projection), name=name)


# ---------------------------------------------------------------------------------------------------------
# Applying


@contextlib.contextmanager
def _restoring(weights: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """Yield a dict to fill with {name: original copy} of weights about to change; copy them back on exit."""
    saved: dict[str, torch.Tensor] = {}
    try:
        yield saved
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                weights[name].copy_(original)


def _module_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def resta_applied(model: Any, vector: SafetyVector, coef: float = RESTA_COEF, dare_rate: float | None = None,
                  seed: int = 0) -> Iterator[Any]:
    """Add `coef * V` to the model's effective weights inside the block; yield the model, restored on exit.

    A peft LoRA model gets its update folded in (W + DARE(dW) + coef * V, summed in float32, rounded once) with
    those LoRA layers switched off; a plain model gets W + coef * V. DARE needs the fine-tune's own delta,
    so only a LoRA model takes it.
    """
    coef = check_alpha(coef, "the RESTA coefficient")
    targets = vector.validate(model)
    modules = linear_modules(model)
    deltas = adapter_deltas(model)
    if dare_rate is not None and not deltas:
        raise SafetylockError("DARE drops part of the fine-tune's own delta, which only a LoRA model carries; "
                              "drop dare for a full fine-tune")
    names = list(dict.fromkeys([*targets, *deltas]))
    weights = {name: base_weight(modules[name]) for name in names}
    switched: list[Any] = [modules[name] for name in deltas]  # peft LoRA layers
    flags = [(m, m.disable_adapters, [(p, p.requires_grad) for p in m.parameters()]) for m in switched]
    with contextlib.ExitStack() as stack:
        saved = stack.enter_context(_restoring(weights))
        with torch.no_grad():
            for name in names:
                weight = weights[name]
                total = deltas.get(name)
                if total is not None and dare_rate is not None:
                    total = dare(total, float(dare_rate), _module_seed(seed, name))
                if name in vector.parts:
                    shift = vector.parts[name].dense(weight.device) * coef
                    total = shift if total is None else total + shift
                assert total is not None
                new = (weight.float() + total).to(weight.dtype)
                if not torch.isfinite(new).all():
                    raise SafetylockError(f"RESTA would put NaN/inf into {name}; nothing was kept")
                saved[name] = weight.detach().clone()
                weight.copy_(new)
                del total, new
        try:
            for module in switched:
                module.enable_adapters(False)
            yield model
        finally:
            for module, was_disabled, grads in flags:
                if not was_disabled:
                    module.enable_adapters(True)
                for param, grad in grads:
                    param.requires_grad_(grad)


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
    with _restoring(weights) as saved:
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


class RestaDefense(Defense):
    """RESTA: the safety vector added to the fine-tuned weights; alpha is its coefficient (default 1)."""

    name = "resta"

    def __init__(self, vector: SafetyVector, dare_rate: float | None = None, seed: int | None = None) -> None:
        if vector.defense != "resta":
            raise SafetylockError(f"this safety vector was fitted for '{vector.defense}', not resta; fit one with fit_resta")
        settings = vector.settings
        self.vector = vector
        self.coef = check_alpha(settings.get("coef", RESTA_COEF), "the RESTA coefficient")
        self.default_alpha = self.coef
        self.dare_rate = settings.get("dare") if dare_rate is None else dare_rate
        self.seed = int(settings.get("seed", 0) if seed is None else seed)
        _resta_settings(self.coef, self.dare_rate, self.seed)

    @contextlib.contextmanager
    def applied(self, model: Any, alpha: float | None = None) -> Iterator[Any]:
        coef = self.coef if alpha is None else check_alpha(alpha, "alpha")
        with resta_applied(model, self.vector, coef, self.dare_rate, self.seed) as defended:
            yield defended

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "default_alpha": self.default_alpha, "dare": self.dare_rate, "seed": self.seed,
                "modules": len(self.vector.parts), "source": self.vector.metadata.get("source")}


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


__all__ = [
    "PROJECTIONS",
    "RESTA_COEF",
    "SAFE_LORA_THRESHOLD",
    "UNALIGNED_ATTACK",
    "Projection",
    "RestaDefense",
    "SafeLoraDefense",
    "SafetyVector",
    "VectorPart",
    "adapter_deltas",
    "check_threshold",
    "dare",
    "fit_resta",
    "fit_safe_lora",
    "fit_safety_vector",
    "has_lora",
    "linear_modules",
    "lora_delta",
    "project_lora",
    "projector",
    "resta_applied",
    "safe_lora_applied",
    "safety_vector_parts",
]
