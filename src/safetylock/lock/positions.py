"""Which token positions a spec such as "response:1-8" or "template+response:1-4" names, and how items are tokenized."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import SafetylockError


@dataclass(frozen=True)
class PositionTerm:
    """One part of a positions spec: a segment and a 1-based inclusive range of it (None = all)."""

    segment: str  # response | template | prompt
    first: int | None = None  # 1-based, inclusive
    last: int | None = None  # 1-based, inclusive
    tail: int | None = None  # the last `tail` tokens


_TERM = re.compile(r"^(response|template|prompt)(?::(?:-(\d+)|(\d+)(?:-(\d+))?))?$")


def parse_positions(spec: str) -> tuple[PositionTerm, ...]:
    """Return the terms of a positions spec such as "response:-5", "response:1-8" or "template+response:1-4"."""
    terms = []
    for raw in str(spec).replace(",", "+").split("+"):
        part = raw.strip()
        match = _TERM.match(part)
        if not match:
            raise SafetylockError(
                f"bad positions term '{part}' in '{spec}'; use response[:-N|:N|:A-B], template[:-N], prompt[:-N], joined by +"
            )
        segment, tail, first, last = match.groups()
        if tail is not None:
            terms.append(PositionTerm(segment, tail=int(tail)))
        elif first is not None:
            a = int(first)
            b = int(last) if last is not None else a
            if a < 1 or b < a:
                raise SafetylockError(f"bad range in positions term '{part}'; ranges are 1-based, A <= B")
            terms.append(PositionTerm(segment, first=a, last=b))
        else:
            terms.append(PositionTerm(segment))
    if not terms:
        raise SafetylockError("empty positions spec")
    return tuple(terms)


def _range(term: PositionTerm, start: int, length: int) -> list[int]:
    if term.tail is not None:
        lo = max(0, length - term.tail)
        return list(range(start + lo, start + length))
    if term.first is not None and term.last is not None:
        return [start + i for i in range(term.first - 1, min(term.last, length))]
    return list(range(start, start + length))


def select_positions(terms: Sequence[PositionTerm], n_head: int, n_template: int, n_response: int) -> list[int]:
    """Return sorted absolute token positions for a text of `n_head` prompt tokens then `n_response` reply tokens."""
    out: set[int] = set()
    for term in terms:
        if term.segment == "response":
            out.update(_range(term, n_head, n_response))
        elif term.segment == "template":
            t = min(n_template, n_head)
            out.update(_range(term, n_head - t, t))
        else:
            out.update(_range(term, 0, n_head))
    return sorted(out)


_MARK = "\u2063safetylock-marker\u2063"


def template_token_ids(tokenizer: Any) -> list[int]:
    """Return the tokens the chat template puts between the end of the user's text and the reply."""
    from ..generate import format_chat

    text = format_chat(tokenizer, _MARK)
    suffix = text[text.rindex(_MARK) + len(_MARK) :]
    return [int(t) for t in tokenizer(suffix, add_special_tokens=False)["input_ids"]]


def template_token_count(tokenizer: Any) -> int:
    """Return how many tokens the chat template puts between the end of the user's text and the reply."""
    return max(1, len(template_token_ids(tokenizer)))


def template_positions(ids: Any, mask: Any, n: int, template_ids: Sequence[int] | None = None) -> Any:
    """Return the positions of one left-padded row's post-instruction template tokens: the last occurrence of
    `template_ids` among its real tokens, so a reply prefilled after the template ("Sure, here is") does not move
    what a gate reads; the row's last `n` real tokens when the ids are not given or not found.

    Causal attention makes the head outputs at those positions independent of any prefill after them.
    """
    import torch

    real = torch.nonzero(mask, as_tuple=False).flatten()
    if template_ids:
        k = len(template_ids)
        tokens = ids[real].tolist()
        want = list(template_ids)
        for start in range(len(tokens) - k, -1, -1):
            if tokens[start : start + k] == want:
                return real[start : start + k]
    return real[-n:]


def encode_item(tokenizer: Any, prompt: str, response: str | None) -> tuple[list[int], int]:
    """Return (token ids, number of prompt tokens) of a chat-templated prompt followed by a teacher-forced reply."""
    from ..generate import format_chat

    head = tokenizer(format_chat(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    tail = tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
    return list(head) + list(tail), len(head)
