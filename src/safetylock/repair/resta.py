"""RESTA (Bhardwaj et al. 2024): the safety vector added back to the fine-tuned weights, optionally after DARE."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import torch

from ..baselines import Defense
from ..errors import SafetylockError, check_alpha
from .vector import SafetyVector, fit_safety_vector
from .weights import adapter_deltas, base_weight, linear_modules, restoring

RESTA_COEF = 1.0


def dare(delta: torch.Tensor, rate: float, seed: int) -> torch.Tensor:
    """Return `delta` with a seeded random fraction `rate` of its entries zeroed and the rest divided by 1 - rate."""
    if not 0 < rate < 1:
        raise SafetylockError(f"the DARE drop rate must lie in (0, 1), got {rate!r}")
    generator = torch.Generator(device=delta.device).manual_seed(int(seed))
    keep = torch.rand(delta.shape, generator=generator, device=delta.device) >= rate
    return torch.where(keep, delta / (1.0 - rate), torch.zeros((), dtype=delta.dtype, device=delta.device))


def _resta_settings(coef: float, dare_rate: float | None, seed: int) -> dict[str, Any]:
    check_alpha(coef, "the RESTA coefficient")
    if dare_rate is not None and not 0 < float(dare_rate) < 1:
        raise SafetylockError(f"the DARE drop rate must lie in (0, 1), got {dare_rate!r}")
    return {"coef": float(coef), "dare": None if dare_rate is None else float(dare_rate), "seed": int(seed)}


def fit_resta(unaligned: Any, aligned: Any | None = None, *, coef: float = RESTA_COEF, dare_rate: float | None = None,
              seed: int = 0, name: str | None = None) -> SafetyVector:
    """Return RESTA's safety vector from the harmful fine-tune of the aligned base (see `safety_vector_parts`).

    `coef` is the default strength; `dare_rate` (None: off) drops that fraction of the customer fine-tune's own
    delta (seeded by `seed`) before the vector is added.
    """
    return fit_safety_vector(unaligned, aligned, defense="resta", settings=_resta_settings(coef, dare_rate, seed),
                             name=name)


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
        saved = stack.enter_context(restoring(weights))
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
