"""A model's Linear projections and their LoRA factors, as the repairs read and change them, and restoring them.

Paths are those of the plain transformers model, whether or not peft wraps it; a peft LoRA layer stands for
its base Linear.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..arch import unwrap
from ..errors import SafetylockError


def lora_delta(lora_b: torch.Tensor, lora_a: torch.Tensor, scale: float) -> torch.Tensor:
    """Return a LoRA module's merged update `(B @ A) * scale` in float32 (one formula for adapter and vector)."""
    return (lora_b.float() @ lora_a.float()) * float(scale)


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


@contextlib.contextmanager
def restoring(weights: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """Yield a dict to fill with {name: original copy} of weights about to change; copy them back on exit."""
    saved: dict[str, torch.Tensor] = {}
    try:
        yield saved
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                weights[name].copy_(original)
