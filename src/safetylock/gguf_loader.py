"""Read a GGUF file into a plain, dequantized transformers model and its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import SafetylockError

GGUF_MAGIC = b"GGUF"


def load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """Return (model, tokenizer) read from a GGUF file, dequantized into a plain transformers model of `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = Path(path)
    with open(path, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise SafetylockError(f"{path} is not a GGUF file (bad magic bytes); pass a .gguf model file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        packed = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
        )
    except SafetylockError:
        raise
    except Exception as exc:  # gguf raises many types on truncated files
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
        raise SafetylockError(
            f"could not read GGUF {path} ({type(exc).__name__}: {first}); the file is corrupt or truncated: download it again"
        ) from None
    # Rebuild as a plain model: the GGUF quantizer stays attached to the loaded one (it refuses to
    # save, and from_pretrained would try to dequantize the saved weights again).
    config = packed.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    state = packed.state_dict()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise SafetylockError(f"GGUF {path} does not map onto {config.model_type} weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    # Non-persistent buffers (rotary inv_freq) are not in the state dict, so the meta build would keep them on
    # meta and `.to(device)` fails ("Cannot copy out of meta tensor"). The alias path never saw this because
    # save_pretrained + from_pretrained recompute them; here they are taken from the loaded model.
    for name, buffer in packed.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if getattr(module._buffers.get(leaf), "is_meta", False):
            module._buffers[leaf] = buffer
    model.tie_weights()
    still = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still:
        raise SafetylockError(f"GGUF {path} left {len(still)} tensor(s) unloaded ({still[0]}, ...); convert it to a Hugging Face directory first")
    model.generation_config = packed.generation_config
    del packed, state
    return model, tokenizer
