"""Where each architecture keeps its attention heads: one table from `config.model_type` to module paths.

A head's output is the slice of `o_proj`'s *input* that belongs to it: attention writes the heads side by
side, `(batch, seq, num_heads * head_dim)`, and `o_proj` mixes them into the residual stream. Every function
here returns the plain `nn.Linear` that does that mixing, looking through peft wrappers, so hooks and baked
biases land on the same weights whether or not a LoRA adapter is attached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import SafetylockError


@dataclass(frozen=True)
class ArchPaths:
    """Dotted paths of one family: candidates for the decoder-layer list, then attention and o_proj names."""

    layers: tuple[str, ...]
    attention: str = "self_attn"
    o_proj: str = "o_proj"


_DECODER = ArchPaths(("model.layers",))

ARCHITECTURES: dict[str, ArchPaths] = {
    "llama": _DECODER,
    "qwen2": _DECODER,
    "mistral": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "gemma3_text": _DECODER,
    # Gemma3ForConditionalGeneration (transformers 5) keeps the text stack under model.language_model.
    "gemma3": ArchPaths(("model.language_model.layers", "language_model.model.layers")),
    # Phi3 fuses q/k/v into qkv_proj, but o_proj is a separate Linear named o_proj (transformers 5).
    "phi3": _DECODER,
}


@dataclass(frozen=True)
class HeadGeometry:
    """Head counts and sizes read from a config; `width` is o_proj's input size."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim


def text_config(config: Any) -> Any:
    """Return the language-model part of a config (itself for text-only models)."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def head_geometry(config: Any) -> HeadGeometry:
    """Return the layer count, head counts (GQA aware) and head size a config describes."""
    cfg = text_config(config)
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return HeadGeometry(int(cfg.num_hidden_layers), heads, kv, head_dim, int(cfg.hidden_size))


def unwrap(model: Any) -> Any:
    """Return the transformers model inside a peft `PeftModel` (the model itself otherwise)."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but the unwrapping must not need it
        return model
    if isinstance(model, PeftModel):
        return model.base_model.model
    return model


def arch_paths(model: Any) -> ArchPaths:
    """Return the table entry for a model's `config.model_type`, or raise naming the supported types."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise SafetylockError(
            f"model type '{model_type}' is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def _get(root: Any, dotted: str) -> Any:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: Any) -> nn.ModuleList:
    """Return the list of decoder layers of a model (peft-wrapped or not)."""
    inner = unwrap(model)
    paths = arch_paths(inner)
    for path in paths.layers:
        found = _get(inner, path)
        if isinstance(found, nn.ModuleList):
            return found
    raise SafetylockError(
        f"no decoder layers at {' or '.join(paths.layers)} in this {inner.config.model_type} model; "
        "the transformers layout changed"
    )


def decoder_model(model: Any) -> nn.Module:
    """Return the module that owns the decoder layers (e.g. `LlamaModel`); it takes input_ids and the mask."""
    inner = unwrap(model)
    for path in arch_paths(inner).layers:
        if isinstance(_get(inner, path), nn.ModuleList):
            owner = _get(inner, path.rsplit(".", 1)[0])
            if isinstance(owner, nn.Module):
                return owner
    raise SafetylockError(f"no decoder module in this {inner.config.model_type} model; the transformers layout changed")


def base_linear(module: nn.Module) -> nn.Linear:
    """Return the innermost `nn.Linear` of a (possibly peft-wrapped) projection."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    if not isinstance(module, nn.Linear):
        raise SafetylockError(f"expected a Linear projection, found {type(module).__name__} (quantized models are not supported)")
    return module


def o_projs(model: Any, layers: Sequence[int] | None = None) -> dict[int, nn.Linear]:
    """Return {layer: plain `nn.Linear` o_proj} for `layers` (all by default); its input is the heads side by side.

    With an unmerged LoRA adapter this is the adapter's base layer, so a hook there shifts only the base
    weights' input, which is exactly what a bias baked into the base computes. The layout and geometry are
    resolved once for all layers (baking calls this on its hot path).
    """
    blocks = decoder_layers(model)
    inner = unwrap(model)
    paths = arch_paths(inner)
    width = head_geometry(inner.config).width
    wanted = range(len(blocks)) if layers is None else layers
    out: dict[int, nn.Linear] = {}
    for layer in wanted:
        if not 0 <= layer < len(blocks):
            raise SafetylockError(f"layer {layer} does not exist; the model has {len(blocks)} layers")
        attn = getattr(blocks[layer], paths.attention, None)
        proj = getattr(attn, paths.o_proj, None) if attn is not None else None
        if proj is None:
            raise SafetylockError(f"layer {layer} has no {paths.attention}.{paths.o_proj}; the transformers layout changed")
        linear = base_linear(proj)
        if linear.in_features != width:
            raise SafetylockError(
                f"o_proj of layer {layer} takes {linear.in_features} inputs, the config says "
                f"{width} (heads x head_dim)"
            )
        out[int(layer)] = linear
    return out


def o_proj(model: Any, layer: int) -> nn.Linear:
    """Return the plain `nn.Linear` o_proj of `layer` (see `o_projs`)."""
    return o_projs(model, [layer])[layer]


def o_proj_path(model: Any, layer: int) -> str:
    """Return the dotted parameter prefix of `layer`'s o_proj inside the unwrapped model."""
    inner = unwrap(model)
    target = o_proj(model, layer)
    for name, module in inner.named_modules():
        if module is target:
            return name
    raise SafetylockError(f"o_proj of layer {layer} is not reachable from the model")


def model_device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    """Return the device and dtype of the first layer's o_proj weight."""
    weight = o_proj(model, 0).weight
    return weight.device, weight.dtype
