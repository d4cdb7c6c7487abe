"""Naming and vetting LoRA adapters: the `NAME=DIR` parser, the name rule, and what training recorded beside one."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import SafetylockError

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


def parse_adapter_specs(specs: Sequence[str]) -> dict[str, str]:
    """Return {name: directory} for `NAME=DIR` strings, refusing malformed or repeated names."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SafetylockError(f"--adapter takes NAME=DIR, got '{spec}'")
        if name in adapters:
            raise SafetylockError(f"adapter name '{name}' is given twice")
        adapters[name] = path
    return adapters


def _recorded_base(adapter_dir: Path) -> dict[str, Any] | None:
    """Return the base fingerprint that `safetylock.attack` records beside an adapter, if it is there."""
    try:
        data = json.loads((adapter_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and str(data.get("format", "")).startswith("safetylock-finetune"):
        base = data.get("base")
        return dict(base) if isinstance(base, dict) else None
    return None


def _weights_digest(model: Any) -> str | None:
    """Return the content digest `safetylock.attack` records for the base an adapter was trained on."""
    try:
        from ..attack import base_digest as _base_digest
    except ImportError:
        return None
    return str(_base_digest(model))


def _module_paths_ancestors(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]
