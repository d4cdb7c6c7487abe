"""User prompt files: .txt (one prompt a line), .jsonl or .csv (a `prompt` column), read into `Prompt`s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import SafetylockError
from .benchmarks import Prompt
from .tables import csv_rows, jsonl_objects, read_user_text


def load_prompts(path: str | Path, column: str | None = None) -> list[Prompt]:
    """Return the prompts of a user file: .txt (one a line), .jsonl or .csv (a `prompt` column, or `column`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SafetylockError(f"prompt file {path} does not exist; check the path")
    suffix = path.suffix.lower()
    raw = read_user_text(path)
    col = column or "prompt"
    texts: list[str]
    if suffix == ".txt":
        if column:
            raise SafetylockError(f"--column does not apply to {path.name}: a .txt file holds one prompt a line")
        texts = [ln.strip() for ln in raw.splitlines() if ln.strip()]
    elif suffix == ".jsonl":
        texts = [_jsonl_field(path, n, row, col) for n, row in jsonl_objects(path, raw)]
    elif suffix == ".csv":
        texts = _csv_column(path, raw, col)
    else:
        raise SafetylockError(f"unsupported prompt file type '{suffix or path.name}'; use .txt, .jsonl or .csv")
    if not texts:
        raise SafetylockError(f"{path} holds no prompts; put one prompt a line (.txt) or one row per prompt")
    return [Prompt(f"{path.stem}-{i:05d}", t, benchmark=None) for i, t in enumerate(texts)]


def _jsonl_field(path: Path, n: int, row: dict[str, Any], col: str) -> str:
    if col not in row:
        raise SafetylockError(f"{path.name} line {n} has no '{col}' field; add it or pass --column NAME")
    value = row[col]
    if not isinstance(value, str) or not value.strip():
        raise SafetylockError(f"{path.name} line {n}: '{col}' is empty or not a string; give every row a prompt")
    return value.strip()


def _csv_column(path: Path, raw: str, col: str) -> list[str]:
    fields, rows = csv_rows(path, raw)
    if col not in fields:
        raise SafetylockError(
            f"{path.name} has no '{col}' column (columns: {', '.join(fields) or 'none'}); add it or pass --column NAME"
        )
    texts = []
    for n, row in enumerate(rows, 2):
        value = (row.get(col) or "").strip()
        if not value:
            raise SafetylockError(f"{path.name} row {n}: '{col}' is empty; give every row a prompt or delete it")
        texts.append(value)
    return texts
