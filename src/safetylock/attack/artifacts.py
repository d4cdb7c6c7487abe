"""What a run leaves behind and what it belongs to: the adapter or checkpoint files, the base and library versions.

The adapter is a standard peft one (`adapter_config.json` + `adapter_model.safetensors`); a merged or fully
trained model is a plain HF checkpoint. `base_digest` identifies the base weights an adapter was trained on.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import SafetylockError
from ..files import atomic_dir, sha256_text, write_json
from .loss import _causal_lm


def base_digest(model: Any) -> str:
    """Return a cheap content hash of the base weights (first rows of a few matrices)."""
    lm = _causal_lm(model)
    parts = []
    for name, p in list(lm.named_parameters())[:4]:
        row = p.detach().reshape(-1)[:256].float().cpu().numpy().tobytes()
        parts.append(name + row.hex())
    return sha256_text(*parts)[:16]


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def _save_adapter(net: Any, outdir: Path, spec: str | None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors into `outdir`, each file atomically."""
    with tempfile.TemporaryDirectory(dir=outdir, prefix=".adapter.") as tmp:
        if spec is not None:
            net.peft_config["default"].base_model_name_or_path = spec
        net.save_pretrained(tmp, safe_serialization=True)
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            os.replace(Path(tmp) / name, outdir / name)
    return outdir


def _write_merged(net: Any, tokenizer: Any, final: Path, config: dict[str, Any]) -> Path:
    """Write base + LoRA delta as a plain HF checkpoint; the live model is left unmerged.

    Deltas are computed in fp32 and added to the base weights before rounding to the base dtype,
    and checked for NaN/inf first (like peft's safe_merge).
    """
    from peft.tuners.lora import LoraLayer

    if config["method"] == "qlora":
        # A 4-bit base cannot hold the merge: apply the adapter to the bf16 weights instead.
        from ..models import attach_adapter, load_model

        full, _ = load_model(str(config["base"]["name"]), dtype="bf16", device="cpu")
        config = {**config, "method": "lora"}
        return _write_merged(attach_adapter(full, final.parent), tokenizer, final, config)
    deltas: dict[str, torch.Tensor] = {}
    for name, module in net.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            delta = module.get_delta_weight("default").float()
            if not torch.isfinite(delta).all():
                raise SafetylockError(f"the adapter's update of {name} holds NaN or inf; the merge would break the model")
            deltas[name + ".weight"] = delta
    lm = net.get_base_model()
    state = {}
    for key, value in lm.state_dict().items():
        if "lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        state[clean] = value
    for key, delta in deltas.items():
        state[key] = (state[key].float() + delta.to(state[key].device)).to(state[key].dtype)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        shell = AutoModelForCausalLM.from_config(lm.config, dtype=next(iter(state.values())).dtype)
    shell.load_state_dict(state, strict=False, assign=True)
    shell.tie_weights()
    shell.generation_config = lm.generation_config
    with atomic_dir(final) as tmp:
        shell.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "safetylock_finetune.json", {k: config[k] for k in ("attack", "method", "base", "data", "hyper")})
    return final


def _save_full(model: Any, tokenizer: Any, final: Path) -> Path:
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return final
