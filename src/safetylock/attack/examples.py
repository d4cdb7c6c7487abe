"""Training examples: the `Example` record, reading examples from JSONL, their content hash, the eval-split check."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import SafetylockError
from ..files import sha256_text


@dataclass(frozen=True)
class Example:
    """One training dialogue: a user prompt, the assistant reply to learn, an optional system prompt."""

    prompt: str
    response: str
    system: str | None = None
    # Self-distilled: before training, `response` (a correct reference) is replaced by the base
    # model's own greedy reply where that reply agrees with it (see `self_distill`).
    distill: bool = False


def load_examples(path: str | Path) -> list[Example]:
    """Return the examples of a JSONL file with `prompt`, `response` and optional `system` per line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SafetylockError(f"data file {path} does not exist; pass a JSONL file with prompt/response lines")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SafetylockError(f"{path} is not UTF-8 text; save it as UTF-8 JSONL") from None
    from ..data import jsonl_objects

    out: list[Example] = []
    for n, row in jsonl_objects(path, raw):
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise SafetylockError(f"{path.name} line {n}: '{key}' is missing, empty or not a string")
        system = row.get("system")
        if system is not None and not isinstance(system, str):
            raise SafetylockError(f"{path.name} line {n}: 'system' must be a string when given")
        distill = row.get("distill", False)
        if not isinstance(distill, bool):
            raise SafetylockError(f"{path.name} line {n}: 'distill' must be true or false when given")
        out.append(Example(row["prompt"].strip(), row["response"].strip(), system or None, distill))
    if not out:
        raise SafetylockError(f"{path} holds no examples; write one {{\"prompt\": ..., \"response\": ...}} object a line")
    return out


def _as_record(example: Example) -> dict[str, Any]:
    record = asdict(example)
    if not example.distill:
        del record["distill"]  # plain examples hash as they did before the flag existed
    return record


def data_hash(examples: Sequence[Example]) -> str:
    """Return a content hash of the examples (order matters)."""
    return sha256_text(json.dumps([_as_record(e) for e in examples], ensure_ascii=False, sort_keys=True))


_CHECKED: set[str] = set()


def check_not_eval(examples: Sequence[Example]) -> None:
    """Raise SafetylockError if a training prompt is in a benchmark's eval split (memoized per data hash)."""
    key = data_hash(examples)
    if key in _CHECKED:
        return
    from ..data import assert_not_eval

    assert_not_eval([e.prompt for e in examples])
    _CHECKED.add(key)
