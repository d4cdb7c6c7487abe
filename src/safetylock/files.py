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


MANIFEST = ".safetylock-output.json"  # what an output directory holds, so a later run knows what it may replace


def check_output_dir(final: Path, kind: str, overwrite: bool) -> None:
    """Raise unless `final` may receive an output of `kind`: absent, empty, or (with overwrite) an earlier one.

    An earlier output is recognised by its manifest, and is replaced only if it still holds nothing but what
    that output wrote: a user's own file in it, or any other non-empty directory, is never removed.
    """
    from .errors import SafetylockError

    final = Path(final)
    if not final.exists():
        return
    if not final.is_dir():
        raise SafetylockError(f"{final} exists and is not a directory; choose another -o")
    entries = {p.name for p in final.iterdir()}
    if not entries:
        return
    try:
        manifest = json.loads((final / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("kind") != kind:
        raise SafetylockError(f"{final} is not empty and is not an earlier {kind} output; nothing was changed; "
                              "choose a new or empty directory")
    foreign = sorted(entries - set(manifest.get("entries") or []) - {MANIFEST})
    if foreign:
        raise SafetylockError(f"{final} holds {foreign[0]!r}, which the earlier {kind} did not write; nothing was "
                              "changed; move it away or choose another directory")
    if not overwrite:
        raise SafetylockError(f"{final} holds an earlier {kind} output; pass --overwrite to replace it, or choose another -o")


@contextlib.contextmanager
def atomic_dir(final: Path, kind: str | None = None, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final` only if the block succeeds.

    kind=None: `final` is the project's own (a cache entry, a part of a run directory) and is replaced
    whatever it holds. kind="...": `final` is a directory the user named; `check_output_dir` decides, before
    and again after the block, whether it may be replaced, and a manifest of what was written is added.
    """
    final = Path(final).absolute()
    if kind is not None:
        check_output_dir(final, kind, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if kind is not None:
            entries = sorted(p.name for p in tmp.iterdir())
            (tmp / MANIFEST).write_text(json.dumps({"kind": kind, "entries": entries}, indent=2) + "\n")
            check_output_dir(final, kind, overwrite)
        if final.exists():
            if any(final.iterdir()):
                shutil.rmtree(final)
            else:
                final.rmdir()
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


def read_tagged_safetensors(path: Path, fmt: str, what: str, missing_hint: str,
                            version: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (tensors, metadata without format keys) of a file `write_tagged_safetensors` wrote as `fmt` `version`.

    Anything else (missing, unreadable, untagged, another format or version) is refused with a one-line reason
    naming `what` the file should be; `missing_hint` says how to make one. Never unpickles anything.
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
    found_version = meta.pop("format_version", None)
    meta.pop("format", None)
    if found_version != version:
        raise SafetylockError(f"{path} has {what.removesuffix(' file')} format version {found_version}; "
                              f"this safetylock reads version {version}")
    return tensors, meta


def _nearest_existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_can_create_in(directory: Path, target: Path) -> None:
    from .errors import SafetylockError

    if not directory.is_dir():
        raise SafetylockError(f"cannot write {target}: {directory} is a file, not a directory; choose another path")
    try:  # a real probe: os.access says yes to root on a read-only mount
        fd, probe = tempfile.mkstemp(prefix=".safetylock-probe.", dir=directory)
    except OSError as exc:
        raise SafetylockError(f"cannot write {target}: {directory} is not writable ({exc.strerror}); "
                              "choose another path") from None
    os.close(fd)
    os.unlink(probe)


def check_writable_file(path: Path) -> None:
    """Raise a one-line SafetylockError unless a file can be written at `path` (checked before any slow work)."""
    from .errors import SafetylockError

    path = Path(path)
    if path.is_dir():
        raise SafetylockError(f"{path} is a directory; give a file name to write")
    _check_can_create_in(_nearest_existing(path.parent), path)


def check_writable_dir(path: Path) -> None:
    """Raise a one-line SafetylockError unless `path` is, or can be made, a writable directory."""
    from .errors import SafetylockError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SafetylockError(f"{path} exists and is not a directory; choose another -o")
    _check_can_create_in(_nearest_existing(path), path)
