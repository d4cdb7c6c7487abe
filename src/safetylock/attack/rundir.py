"""The run directory: whose run it holds (new, resume, done or refused), clearing it, and its training log."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import SafetylockError
from .distill import DISTILLED

FORMAT = "safetylock-finetune/1"
_IDENTITY = ("format", "attack", "method", "hyper", "base", "data")


def _run_state(outdir: Path, config: dict[str, Any], overwrite: bool, keys: Sequence[str] = _IDENTITY) -> str:
    """Return 'new', 'resume', 'done' or 'overwrite' for a run directory, refusing one that holds something else.

    Only `keys` of the identity are compared (the base is compared once it is loaded).
    """
    if not outdir.exists():
        return "new"
    if not outdir.is_dir():
        raise SafetylockError(f"{outdir} is a file, not a directory; pass a new or empty directory with -o")
    entries = [p for p in outdir.iterdir() if not p.name.startswith(".") and p.name != DISTILLED]
    if not entries:
        return "new"
    meta = outdir / "config.json"
    try:
        old = json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else None
    except (OSError, json.JSONDecodeError):
        old = None
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        raise SafetylockError(
            f"{outdir} is not empty and holds no safetylock fine-tuning run; pass a new or empty directory with -o"
        )
    if overwrite:
        return "overwrite"
    differ = [k for k in keys if old.get(k) != config.get(k)]
    if differ:
        raise SafetylockError(
            f"{outdir} holds another run (its {', '.join(differ)} differ); pass --overwrite to replace it, "
            "or choose another -o directory"
        )
    return "done" if (outdir / "result.json").is_file() else "resume"


def _clear_run(outdir: Path) -> None:
    """Remove what a previous run wrote (only our own file names)."""
    for name in ("config.json", "train_log.jsonl", "result.json", "adapter_config.json",
                 "adapter_model.safetensors", "README.md"):
        (outdir / name).unlink(missing_ok=True)
    for name in ("checkpoint", "merged"):
        shutil.rmtree(outdir / name, ignore_errors=True)


def _append_log(outdir: Path, row: dict[str, Any]) -> None:
    with open(outdir / "train_log.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _truncate_log(outdir: Path, step: int) -> None:
    """Drop log lines of steps after the checkpoint (they will be run again)."""
    log = outdir / "train_log.jsonl"
    if not log.is_file():
        return
    rows = [ln for ln in log.read_text(encoding="utf-8").splitlines() if ln.strip()]
    keep = [ln for ln in rows if json.loads(ln).get("step", 0) <= step]
    from ..files import atomic_file

    with atomic_file(log) as handle:
        handle.write("".join(ln + "\n" for ln in keep))
