"""Atomic file and directory writes, the cache root, and content hashes.

Nothing the project writes is ever seen half-written: every artifact goes to a temporary
sibling first and is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def home() -> Path:
    """Return the cache root: `$SAFETYLOCK_HOME`, default `~/.cache/safetylock`."""
    root = os.environ.get("SAFETYLOCK_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "safetylock")
    return Path(root)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "w") -> Iterator[Any]:
    """Yield an open temporary file that replaces `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(name, final)
    finally:
        if os.path.exists(name):
            os.unlink(name)


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_file(Path(path)) as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Return the hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(*parts: str) -> str:
    """Return the hex sha256 of strings joined by NUL (a stable content hash)."""
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


def write_tagged_safetensors(path: Path, tensors: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write `tensors` as safetensors with `meta` as JSON under the "safetylock" header key, atomically."""
    from safetensors.torch import save

    blob = save(tensors, metadata={"safetylock": json.dumps(meta, sort_keys=True)})
    path = Path(path)
    with atomic_file(path, "wb") as handle:
        handle.write(blob)
    return path


def read_tagged_safetensors(path: Path, fmt: str, what: str, missing_hint: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (tensors, metadata) of a file `write_tagged_safetensors` wrote with metadata format `fmt`.

    Anything else (missing, unreadable, untagged, another format) is refused with a one-line reason naming
    `what` the file should be; `missing_hint` says how to make one. Never unpickles anything.
    """
    from safetensors import safe_open

    from .errors import SafetylockError

    path = Path(path).expanduser()
    if not path.is_file():
        raise SafetylockError(f"{what} {path} does not exist; {missing_hint}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:
        raise SafetylockError(f"{path} is not a readable safetensors {what} ({type(exc).__name__}); {missing_hint}") from None
    try:
        meta = json.loads(header.get("safetylock", ""))
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise SafetylockError(f"{path} is a safetensors file but not a {what} (format {found!r}); {missing_hint}")
    return tensors, meta
