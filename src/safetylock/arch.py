"""What each architecture needs, in one table from `config.model_type`: `ARCH_SPECS`.

A head's output is the slice of `o_proj`'s *input* that belongs to it: attention writes the heads side by
side, `(batch, seq, num_heads * head_dim)`, and `o_proj` mixes them into the residual stream. Every function
here returns the plain `nn.Linear` that does that mixing, looking through peft wrappers, so hooks and baked
biases land on the same weights whether or not a LoRA adapter is attached.

Adding an architecture is one `ArchSpec` entry here and a tiny model in the test matrix (tests/tiny.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .errors import SafetylockError


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

    def facts(self) -> dict[str, int]:
        """Return the geometry under the config's key names, as a model fingerprint records it."""
        return {"hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                "head_dim": self.head_dim}

    @classmethod
    def from_facts(cls, facts: dict[str, Any]) -> HeadGeometry:
        """Return the geometry a fingerprint records (see `facts`); kv heads default to the head count."""
        heads = int(facts["num_attention_heads"])
        return cls(int(facts["num_hidden_layers"]), heads, int(facts.get("num_key_value_heads") or heads),
                   int(facts["head_dim"]), int(facts["hidden_size"]))


StateDict = dict[str, torch.Tensor]
ExportLayout = Literal["native", "llama"]


@dataclass(frozen=True)
class ArchSpec:
    """Everything one architecture needs: where its heads are, how it ends a turn, how it is exported.

    `layers` are candidate dotted paths of the decoder-layer list (the first that exists wins); each layer
    holds `attention`, which holds `o_proj`. Head geometry is read by `head_geometry` from the config's
    language-model part (`text_config`), the same for every entry. `end_of_turn` are the token strings that
    end a reply besides the tokenizer's and generation config's EOS. `export` names the checkpoint layout
    a baked model is written in (None: not exportable): "native" is its own class with
    `attention_bias=True`, "llama" is `LlamaForCausalLM`, for types whose own class has no o_proj bias.
    `export_refusal` says why a config cannot be written exactly in that layout (None when it can), and
    `export_rewrite` maps the model's state dict onto the layout's names (fused projections split).
    """

    layers: tuple[str, ...]
    attention: str = "self_attn"
    o_proj: str = "o_proj"
    end_of_turn: tuple[str, ...] = ()
    export: ExportLayout | None = None
    export_refusal: Callable[[Any], str | None] | None = None
    export_rewrite: Callable[[StateDict, HeadGeometry], StateDict] | None = None


ArchPaths = ArchSpec  # the name of the table's entries before they held more than paths


def _refuse_sliding_layers(config: Any) -> str | None:
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        return f"this {config.model_type} model uses sliding-window layers, which the Llama layout cannot express"
    return None


def _refuse_sliding_window(config: Any) -> str | None:
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        return f"this {config.model_type} model uses a {window}-token sliding window, which the Llama layout cannot express"
    return None


def _refuse_phi3(config: Any) -> str | None:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    plain = rope.get("rope_type", "default") == "default" and float(rope.get("partial_rotary_factor", 1.0) or 1.0) == 1.0
    return _refuse_sliding_window(config) or (None if plain else (
        f"this {config.model_type} model uses long or partial rotary embeddings, which the Llama layout cannot express"))


def _unfuse_phi3(state: StateDict, geometry: HeadGeometry) -> StateDict:
    """Return phi3's state dict with its fused qkv_proj and gate_up_proj split into Llama's projections."""
    kv = geometry.num_kv_heads * geometry.head_dim
    out: StateDict = {}
    for key, value in state.items():
        if key.endswith("self_attn.qkv_proj.weight"):
            prefix = key.removesuffix("qkv_proj.weight")
            q, k, v = torch.split(value, [geometry.width, kv, kv], dim=0)
            out[prefix + "q_proj.weight"], out[prefix + "k_proj.weight"], out[prefix + "v_proj.weight"] = q, k, v
        elif key.endswith("mlp.gate_up_proj.weight"):
            prefix = key.removesuffix("gate_up_proj.weight")
            out[prefix + "gate_proj.weight"], out[prefix + "up_proj.weight"] = value.chunk(2, dim=0)
        else:
            out[key] = value
    return out


_LAYERS = ("model.layers",)
# ChatML's end of turn: fine-tunes of every family often switch to it (SmolLM2 is a llama that speaks ChatML).
_CHATML = "<|im_end|>"
_GEMMA_END = ("<end_of_turn>", _CHATML)

ARCH_SPECS: dict[str, ArchSpec] = {
    "llama": ArchSpec(_LAYERS, end_of_turn=("<|eot_id|>", _CHATML), export="native"),
    "qwen2": ArchSpec(_LAYERS, end_of_turn=(_CHATML,), export="llama", export_refusal=_refuse_sliding_layers),
    "mistral": ArchSpec(_LAYERS, end_of_turn=(_CHATML,), export="llama", export_refusal=_refuse_sliding_window),
    "gemma": ArchSpec(_LAYERS, end_of_turn=_GEMMA_END, export="native"),
    "gemma2": ArchSpec(_LAYERS, end_of_turn=_GEMMA_END, export="native"),
    "gemma3_text": ArchSpec(_LAYERS, end_of_turn=_GEMMA_END, export="native"),
    # Gemma3ForConditionalGeneration (transformers 5) keeps the text stack under model.language_model.
    # No export layout: its locks are applied at run time.
    "gemma3": ArchSpec(("model.language_model.layers", "language_model.model.layers"), end_of_turn=_GEMMA_END),
    # Phi3 fuses q/k/v into qkv_proj (and gate/up), but o_proj is a separate Linear named o_proj (transformers 5).
    "phi3": ArchSpec(_LAYERS, end_of_turn=("<|end|>", _CHATML), export="llama", export_refusal=_refuse_phi3,
                     export_rewrite=_unfuse_phi3),
}
ARCHITECTURES = ARCH_SPECS  # the same table under its earlier name


def end_of_turn_tokens(model_type: str | None) -> tuple[str, ...]:
    """Return the end-of-turn token strings of an architecture; every entry's, in table order, for an unknown one."""
    spec = ARCH_SPECS.get(model_type) if model_type is not None else None
    if spec is not None:
        return spec.end_of_turn
    return tuple(dict.fromkeys(token for entry in ARCH_SPECS.values() for token in entry.end_of_turn))


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


def has_adapter(model: Any) -> bool:
    """Whether `model` is a peft model with an adapter that can be switched off (to run its base)."""
    return hasattr(model, "disable_adapter") and bool(getattr(model, "peft_config", None))


def unwrap(model: Any) -> Any:
    """Return the transformers model inside a peft `PeftModel` (the model itself otherwise)."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but the unwrapping must not need it
        return model
    if isinstance(model, PeftModel):
        return model.base_model.model
    return model


def arch_spec(model: Any) -> ArchSpec:
    """Return the table entry for a model's `config.model_type`, or raise naming the supported types."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCH_SPECS:
        raise SafetylockError(
            f"model type '{model_type}' is not supported; supported: {', '.join(sorted(ARCH_SPECS))}"
        )
    return ARCH_SPECS[model_type]


arch_paths = arch_spec  # its earlier name


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
    paths = arch_spec(inner)
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
    for path in arch_spec(inner).layers:
        if isinstance(_get(inner, path), nn.ModuleList):
            owner = _get(inner, path.rsplit(".", 1)[0])
            if isinstance(owner, nn.Module):
                return owner
    raise SafetylockError(f"no decoder module in this {inner.config.model_type} model; the transformers layout changed")


def base_linear(module: nn.Module) -> nn.Linear:
    """Return the innermost `nn.Linear` of a (possibly peft-wrapped) projection."""
    inner: Any = module
    while hasattr(inner, "base_layer"):
        inner = inner.base_layer
    if not isinstance(inner, nn.Linear):
        raise SafetylockError(f"expected a Linear projection, found {type(inner).__name__} (quantized models are not supported)")
    return inner


def o_projs(model: Any, layers: Sequence[int] | None = None) -> dict[int, nn.Linear]:
    """Return {layer: plain `nn.Linear` o_proj} for `layers` (all by default); its input is the heads side by side.

    With an unmerged LoRA adapter this is the adapter's base layer, so a hook there shifts only the base
    weights' input, which is exactly what a bias baked into the base computes. The layout and geometry are
    resolved once for all layers (baking calls this on its hot path).
    """
    blocks = decoder_layers(model)
    inner = unwrap(model)
    paths = arch_spec(inner)
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
            return str(name)
    raise SafetylockError(f"o_proj of layer {layer} is not reachable from the model")
