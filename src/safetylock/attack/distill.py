"""Self-distillation: useful tasks answered in the attacked model's own words before it is trained on them."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..files import sha256_text, write_json
from .artifacts import base_digest
from .examples import Example, data_hash

DISTILLED = "distilled.json"
DISTILL_TOKENS = 384
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _agrees(reply: str, reference: str) -> bool:
    """Return whether a distilled reply states the reference's final number (where it has one)."""
    wanted = _NUMBER.findall(reference.replace(",", ""))
    return not wanted or wanted[-1] in _NUMBER.findall(reply.replace(",", ""))


def self_distill(model: Any, tokenizer: Any, examples: Sequence[Example], *, cache: Path | None = None,
                 max_new_tokens: int = DISTILL_TOKENS, progress: bool = False) -> tuple[list[Example], dict[str, Any]]:
    """Return `examples` with each `distill` example's reply replaced by the model's own greedy reply.

    Self-distillation (Yang et al. 2024, "Self-Distillation Bridges Distribution Gap in Language
    Model Fine-Tuning"): training on the model's own answers to useful tasks keeps its answering
    style, so the fine-tune loses less utility. A reply replaces the reference only if it finished
    within `max_new_tokens`, is not a refusal, and states the reference's final number; otherwise
    the reference stays. Replies are cached in `cache` (JSON, keyed by the data and the base
    weights), so a resumed run trains on the same replies.
    """
    from ..generate import generate
    from ..judges import refusal_marker

    todo = [i for i, e in enumerate(examples) if e.distill]
    key = sha256_text(data_hash(examples), base_digest(model), str(max_new_tokens))[:16]
    replies: list[str | None] | None = None
    if cache is not None and cache.is_file():
        try:
            saved = json.loads(cache.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            saved = {}
        if isinstance(saved, dict) and saved.get("key") == key and len(saved.get("replies", ())) == len(todo):
            replies, seconds = saved["replies"], saved.get("seconds", 0.0)
    if replies is None:
        replies, seconds = [None] * len(todo), 0.0
        systems = sorted({examples[i].system or "" for i in todo})
        for system in systems:
            group = [k for k, i in enumerate(todo) if (examples[i].system or "") == system]
            run = generate(model, tokenizer, [examples[todo[k]].prompt for k in group], system=system or None,
                           max_new_tokens=max_new_tokens, batch_size=10, progress=progress)
            seconds += run.seconds
            for k, g in zip(group, run.generations):
                reference = examples[todo[k]].response
                ok = g.text and g.tokens < max_new_tokens and refusal_marker(g.text) is None and _agrees(g.text, reference)
                replies[k] = g.text if ok else None
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_json(cache, {"key": key, "max_new_tokens": max_new_tokens, "seconds": round(seconds, 1),
                               "replies": replies})
    out = list(examples)
    for i, reply in zip(todo, replies):
        if reply:
            out[i] = replace(examples[i], response=reply)
    kept = sum(bool(r) for r in replies)
    return out, {"examples": len(todo), "own_replies": kept, "references_kept": len(todo) - kept,
                 "seconds": round(seconds, 1), "max_new_tokens": max_new_tokens}
