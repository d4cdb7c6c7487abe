"""Reading a user's text, CSV and JSONL files, with a one-line error naming the file and line of bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..errors import SafetylockError


def read_user_text(path: Path) -> str:
    """Return a user's text file's contents; a one-line error for a binary, non-UTF-8 or unreadable file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SafetylockError(f"{path} is not UTF-8 text (a binary file?); save it as UTF-8 text") from None
    except OSError as exc:
        raise SafetylockError(f"cannot read {path} ({exc.strerror}); check the path and its permissions") from None


def csv_rows(path: Path, raw: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Return (column names, rows) of CSV text; a one-line error naming the line of a malformed row.

    Strict parsing, so an unterminated quote is an error at the row where it opens, not rows silently
    merged into one field; quoted fields may still span lines.
    """
    import io

    reader = csv.reader(io.StringIO(raw, newline=""), strict=True)
    rows: list[dict[str, Any]] = []
    fields: list[str] | None = None
    while True:
        start = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            why = "a quote opened here is never closed" if "end of data" in str(exc) else str(exc)
            raise SafetylockError(f"{path.name} line {start}: malformed CSV ({why}); fix its quotes") from None
        if fields is None:
            fields = values
        elif values and len(values) != len(fields):
            raise SafetylockError(f"{path.name} line {start}: {len(values)} fields where the header has "
                                  f"{len(fields)}; check its quotes and commas")
        elif values:
            rows.append(dict(zip(fields, values)))
    return fields or [], rows


def jsonl_objects(path: Path, raw: str) -> list[tuple[int, dict[str, Any]]]:
    """Return (line number, object) for each non-blank line of JSONL text `raw` read from `path` (one-line errors)."""
    rows = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SafetylockError(f"{path.name} line {n} is not valid JSON ({exc.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise SafetylockError(f"{path.name} line {n} is not a JSON object; write one object per line")
        rows.append((n, row))
    return rows


def read_table(path: Path, raw: str | None = None) -> list[dict[str, Any]]:
    """Return the rows of a .jsonl or .csv file as dicts (one-line errors on malformed input)."""
    path = Path(path)
    if raw is None:
        if not path.is_file():
            raise SafetylockError(f"{path} does not exist; check the path")
        raw = read_user_text(path)
    if path.suffix.lower() == ".jsonl":
        return [row for _, row in jsonl_objects(path, raw)]
    if path.suffix.lower() == ".csv":
        return csv_rows(path, raw)[1]
    raise SafetylockError(f"unsupported file type '{path.suffix or path.name}'; use .jsonl or .csv")
