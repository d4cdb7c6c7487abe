"""Export: a baked, merged checkpoint that plain `transformers` loads with the o_proj bias intact."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import torch

from ..arch import ARCH_SPECS, HeadGeometry, head_geometry, unwrap
from ..errors import SafetylockError, check_alpha
from ..files import atomic_dir, check_output_dir
from .artifact import Lock

EXPORT_KIND = "apply"  # the manifest kind of a locked checkpoint directory (files.check_output_dir)

# Which layout each exportable model_type is written in: a view of arch.ARCH_SPECS.
EXPORT_LAYOUT: dict[str, str] = {kind: spec.export for kind, spec in ARCH_SPECS.items() if spec.export is not None}
_LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
               "tie_word_embeddings", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id")


def _export_refusal(config: Any) -> str | None:
    """Return why a model cannot be written as a bias-carrying checkpoint exactly, or None."""
    spec = ARCH_SPECS.get(config.model_type)
    if spec is None or spec.export is None:
        return f"exporting a {config.model_type} model is not supported"
    return spec.export_refusal(config) if spec.export_refusal is not None else None


def _llama_config(config: Any, geometry: HeadGeometry) -> Any:
    from transformers import LlamaConfig

    values = {k: getattr(config, k) for k in _LLAMA_KEYS if hasattr(config, k)}
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope.pop("partial_rotary_factor", None)
    out = LlamaConfig(**values, head_dim=geometry.head_dim, attention_bias=True, mlp_bias=False, rope_parameters=rope or None)
    out.architectures = ["LlamaForCausalLM"]
    return out


def _export_state(model: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Return (config, state dict) of a bias-carrying checkpoint equivalent to the baked, merged `model`."""
    config = model.config
    spec = ARCH_SPECS[config.model_type]
    geometry = head_geometry(config)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if spec.export == "native":
        out = copy.deepcopy(config)
        out.attention_bias = True
        out.architectures = [type(model).__name__]
    else:
        out = _llama_config(config, geometry)
    if spec.export_rewrite is not None:
        state = spec.export_rewrite(state, geometry)
    # attention_bias=True gives q, k, v and o a bias each: the ones the model lacks are zeros.
    for key in [k for k in state if re.search(r"self_attn\.(q|k|v|o)_proj\.weight$", k)]:
        bias_key = key.removesuffix("weight") + "bias"
        if bias_key not in state:
            weight = state[key]
            state[bias_key] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    if getattr(out, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return out, {k: v.contiguous().cpu() for k, v in state.items()}


def export_locked(
    model: Any,
    tokenizer: Any,
    lock: Lock,
    alpha: float | None,
    outdir: str | Path,
    *,
    force: bool = False,
    verify: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Bake the lock, merge any LoRA adapter, and write a checkpoint plain transformers loads; return a summary.

    The model is changed in place (baked, and merged when it carries an adapter). Qwen2, Mistral and Phi3
    have no o_proj bias, so they are written in the Llama layout, which computes the same function with
    `attention_bias=True` (their q/k/v biases kept or zero). With `verify`, the written checkpoint is
    loaded back with `AutoModelForCausalLM.from_pretrained` and its logits are compared with the model's.
    `outdir` must be new, empty, or (with `overwrite`) an earlier export holding only what it wrote.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    check_output_dir(Path(outdir), EXPORT_KIND, overwrite)
    inner = unwrap(model)
    why = _export_refusal(inner.config)
    if why:
        raise SafetylockError(f"{why}; apply the lock at run time instead (`--lock` on chat/eval/serve, or Lock.applied)")
    a = lock.default_alpha if alpha is None else check_alpha(alpha, "alpha")
    seconds = lock.bake(model, alpha=a, force=force)
    merged = model.merge_and_unload() if inner is not model else model
    config, state = _export_state(merged)
    dtype = next(iter(merged.parameters())).dtype
    config.dtype = dtype
    outdir = Path(outdir)
    summary: dict[str, Any] = {
        "outdir": str(outdir),
        "alpha": a,
        "bake_seconds": seconds,
        "source_model_type": inner.config.model_type,
        "layout": config.model_type,
        "lock": lock.metadata,
    }
    with atomic_dir(outdir, EXPORT_KIND, overwrite) as tmp:
        config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        generation_config = getattr(merged, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if verify:
            summary["max_logit_diff"] = _verify_export(merged, tmp, dtype, AutoModelForCausalLM)
        (tmp / "safetylock.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


@torch.no_grad()
def _verify_export(model: Any, directory: Path, dtype: torch.dtype, auto: Any) -> float:
    reloaded = auto.from_pretrained(directory, dtype=dtype)
    reloaded.eval()
    device = model.get_input_embeddings().weight.device
    reloaded.to(device)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    want = model(input_ids=ids).logits.float()
    got = reloaded(input_ids=ids).logits.float()
    diff = float((want - got).abs().max())
    scale = 1e-4 if dtype == torch.float32 else 2e-2
    if not diff <= scale * (1.0 + float(want.abs().max())):
        raise SafetylockError(
            f"the exported {reloaded.config.model_type} checkpoint does not reproduce the locked model "
            f"(max logit difference {diff:.3g}); nothing was written; apply the lock at run time instead"
        )
    del reloaded
    return diff
