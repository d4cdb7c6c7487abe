"""Load a chat model and its tokenizer from any spec: built-in alias, local directory, GGUF file or hub id.

Built-in aliases (`aliases`) are fetched and cached as safetensors on first use; a GGUF file is read by
`gguf_loader`; fingerprints and weight sketches (`fingerprints`) are re-exported here for their callers.
"""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from .aliases import ALIASES, DEFAULT_MODEL, Alias, alias_dir, dir_size, fetch_alias, is_cached
from .errors import SafetylockError
from .fingerprints import SKETCH_THRESHOLD, fingerprint, sketch_distance, weight_sketch
from .gguf_loader import GGUF_MAGIC, load_gguf

__all__ = [
    "ALIASES", "DEFAULT_MODEL", "GGUF_MAGIC", "SKETCH_THRESHOLD", "Alias", "adapter_mismatch", "alias_dir",
    "attach_adapter", "auto_dtype", "cpu_has_bf16", "default_device", "dir_size", "fetch_alias", "fingerprint",
    "is_cached", "load_gguf", "load_model", "model_source", "quiet_peft", "resolve_dtype", "resolve_spec",
    "sketch_distance", "weight_sketch",
]


def default_device() -> str:
    """Return 'cuda' when a GPU is present, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_bf16() -> bool:
    """Return True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


def auto_dtype() -> torch.dtype:
    """Return the fastest inference dtype here: bf16 on a GPU or a CPU with native bf16, else fp32.

    Measured on a 2-core AVX2 machine (bench/DTYPE.md): greedy generation is 1.8x (0.5B) to 2.3x (1.5B)
    faster in fp32 than in bf16, because bf16 has to be converted in software there.
    """
    if torch.cuda.is_available() or cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """Return the torch dtype for a name; 'auto' picks `auto_dtype()`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype in (None, "auto"):
        return auto_dtype()
    if dtype not in table:
        raise SafetylockError(f"unknown dtype '{dtype}'; use one of auto, bf16, fp16, fp32")
    return table[dtype]


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pickle_only(directory: Path) -> bool:
    """Return whether a checkpoint directory holds `.bin` (pickle) files but no `.safetensors` weights."""
    return not any(directory.glob("*.safetensors")) and any(directory.glob("*.bin"))


def resolve_spec(spec: str) -> tuple[str, Path | str, str | None]:
    """Return (kind, location, gguf_name) for a model spec; kind is alias, dir, gguf or hub."""
    if spec in ALIASES:
        return "alias", spec, None
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SafetylockError(f"{path} is not a model directory (no config.json); pass a Hugging Face checkpoint directory")
        if _pickle_only(path):
            raise SafetylockError(
                f"{path} holds only pickle (.bin) weights and safetylock loads safetensors only; convert it once with "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            )
        return "dir", path, None
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SafetylockError(f"GGUF file {path} does not exist; check the path")
        return "gguf", path, path.name
    if path.exists():
        raise SafetylockError(f"{path} is neither a model directory nor a .gguf file")
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise SafetylockError(
            f"model '{spec}' not found: it is not an alias ({', '.join(ALIASES)}), a directory or a .gguf file"
        )
    return "hub", spec, None


def model_source(spec: str) -> Path | str:
    """Return what `from_pretrained` should read for a spec (fetching an alias on first use)."""
    kind, where, _ = resolve_spec(spec)
    if kind == "alias":
        return fetch_alias(str(where))
    if kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(where), "config.json")
        if not isinstance(cached, str) and not _hub_reachable():
            raise SafetylockError(
                f"hub id '{spec}' is not in the local cache and the Hugging Face hub is unreachable; "
                "use a built-in alias, a local directory or a .gguf file"
            )
    return where


def load_model(
    spec: str,
    adapter: str | Path | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = None,
) -> tuple[Any, Any]:
    """Return (model, tokenizer) for a spec, with an optional peft LoRA adapter on top, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    device = device or default_device()
    kind, where, gguf_name = resolve_spec(spec)
    if kind == "gguf":
        model, tokenizer = load_gguf(Path(where), torch_dtype)
    else:
        source = model_source(spec)
        # A hub repo without safetensors would otherwise fall back to its pickle weights.
        kwargs: dict[str, Any] = {"dtype": torch_dtype, "use_safetensors": True}
        if device == "cuda" and torch.cuda.device_count() > 1:
            kwargs["device_map"] = "auto"
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except SafetylockError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise SafetylockError(f"could not load model '{spec}': {first}") from None
    if getattr(model, "hf_device_map", None) is None:
        model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = model.config.pad_token_id or tokenizer.pad_token_id
    model.safetylock_spec = spec  # type: ignore[attr-defined]
    if adapter is not None:
        model = attach_adapter(model, adapter)
    model.eval()
    return model, tokenizer


def adapter_mismatch(model: Any, adapter_dir: Path) -> str | None:
    """Return why a LoRA adapter's shapes do not fit the model, or None when they do."""
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    modules = dict(model.named_modules())
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            if ".lora_A." not in key:
                continue
            path = key.split(".lora_A.")[0]
            path = path.removeprefix("base_model.model.")
            module = modules.get(path)
            if module is None or not hasattr(module, "in_features"):
                return f"module '{path}' does not exist in the model"
            in_features = handle.get_slice(key).get_shape()[1]
            if in_features != module.in_features:
                return f"'{path}' takes {module.in_features} inputs, the adapter expects {in_features}"
    return None


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Silence the one FutureWarning peft triggers on every wrap (it reads transformers' deprecated
    `is_gradient_checkpointing`); not ours to fix, and every other warning still reaches the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def attach_adapter(model: Any, adapter: str | Path) -> Any:
    """Return the model wrapped with a peft LoRA adapter, refusing one trained for another base."""
    from peft import PeftModel

    adapter_dir = Path(adapter).expanduser()
    if not (adapter_dir / "adapter_config.json").is_file():
        raise SafetylockError(f"{adapter_dir} is not a LoRA adapter directory (no adapter_config.json)")
    if _pickle_only(adapter_dir):
        raise SafetylockError(
            f"adapter {adapter_dir} holds only pickle (.bin) weights and safetylock loads safetensors only; convert it once "
            "with PeftModel.from_pretrained(base, dir).save_pretrained(dir, safe_serialization=True)"
        )
    why = adapter_mismatch(model, adapter_dir)
    if why:
        raise SafetylockError(f"adapter {adapter_dir} does not fit this base model: {why}; use the base it was trained on")
    try:
        with quiet_peft():
            wrapped = PeftModel.from_pretrained(model, str(adapter_dir))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise SafetylockError(f"could not load adapter {adapter_dir}: {first}") from None
    wrapped.safetylock_spec = getattr(model, "safetylock_spec", None)  # type: ignore[attr-defined]
    return wrapped
