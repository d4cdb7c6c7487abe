"""Tokenization and batching: chat-templated ids with all but the reply masked out, padded (micro-)batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import SafetylockError
from .examples import Example

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example and its labels: -100 everywhere but the reply and its end-of-turn token."""

    input_ids: list[int]
    labels: list[int]

    @property
    def response_tokens(self) -> int:
        return sum(t != IGNORE for t in self.labels)


def encode_example(tokenizer: Any, example: Example, max_length: int = 512) -> Encoded:
    """Return the chat-templated example's ids with the prompt and template tokens masked out.

    The prompt side is tokenized exactly as `generate` tokenizes it at inference (the templated head,
    no special tokens added); the reply runs through the end-of-turn token, which is learned too so
    the model still stops.
    """
    from ..generate import chat_messages, format_chat

    head = format_chat(tokenizer, example.prompt, example.system)
    tail = example.response
    eos_id = tokenizer.eos_token_id
    if tokenizer.chat_template is not None:
        messages = chat_messages(example.prompt, example.system) + [{"role": "assistant", "content": example.response}]
        full = str(tokenizer.apply_chat_template(messages, tokenize=False))
        if full.startswith(head):
            tail = full[len(head):]
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    ends = _end_ids(tokenizer)
    cut = next((i + 1 for i, t in enumerate(tail_ids) if t in ends), None)
    if cut is not None:
        tail_ids = tail_ids[:cut]
    elif eos_id is not None:
        tail_ids = tail_ids + [int(eos_id)]
    ids = (head_ids + tail_ids)[:max_length]
    labels = ([IGNORE] * len(head_ids) + tail_ids)[:max_length]
    if all(t == IGNORE for t in labels):
        raise SafetylockError(
            f"an example's prompt fills all {max_length} tokens, leaving no reply to learn (prompt: "
            f"'{example.prompt[:50]}'); shorten it"
        )
    return Encoded(ids, labels)


def _end_ids(tokenizer: Any) -> set[int]:
    # generate's end-of-turn tokens, so a reply is learned up to where generation stops; there is no
    # model here, so only the tokenizer's EOS and the chat templates' end tokens count.
    from ..generate import eos_token_ids

    return set(eos_token_ids(None, tokenizer))


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Return right-padded input_ids, attention_mask and labels tensors for a batch."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


PAD_BUDGET = 1024  # padded tokens per forward pass before a batch is split further (2048 peaked at 21.6 GB on the 1.5B)


def micro_batches(rows: Sequence[Encoded], cap: int, budget: int = PAD_BUDGET) -> list[list[Encoded]]:
    """Split one optimizer batch into forward passes of similar length, to waste little compute on padding.

    Rows are sorted by length and grouped greedily: a pass takes at most `cap` rows and, beyond its first
    row, at most `budget` padded tokens. The gradient is the same (the loss is summed over reply tokens and
    divided by the whole batch's count); only the padding, and so the time, changes.
    """
    ordered = sorted(rows, key=lambda e: len(e.input_ids))
    out: list[list[Encoded]] = []
    for e in ordered:
        group = out[-1] if out else None
        if group is not None and len(group) < cap and (len(group) + 1) * len(e.input_ids) <= budget:
            group.append(e)
        else:
            out.append([e])
    return out
