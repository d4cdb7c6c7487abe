"""Refuse where the base refuses: the aligned base's own first reply tokens decide, nothing is fitted.

"Back to the base's standard" means refusing exactly where the aligned base would. Rather than predict that
from prompt features (a gate, which out of distribution reads what its fitting sources look like), this
screen asks the base itself: for each new prompt the fine-tune's LoRA adapter is switched off, the base
generates its first `tokens` reply tokens greedily, and the prompt is flagged when those tokens carry a
refusal marker (`judges.refusal_marker`). A flagged prompt gets a fixed refusal (`screen.forced_reply`);
the others get the fine-tune's own reply, bit for bit.

No artifact and no harm labels: the base's weights are the decision. The cost per request is a second
prefill (the adapter off) plus `tokens` decode steps of the base. A fine-tune given as a peft adapter carries its
base; a merged or fully fine-tuned model has none left to switch to, so the aligned base is handed in as a
second model (`base=`), at the cost of its memory, and asked the same way.

With `restore` the screen also works the other way: where the base does not start refusing but the fine-tune
does (its own first `tokens` reply tokens, the adapter on, carry a marker), the reply opens with the base's
first tokens and the fine-tune writes the rest. A fine-tune that learned to over-refuse is then held to the
base's standard of answering too; the cost is a second probe (`tokens` decode steps of the fine-tune) per
prompt, and a fine-tune's deliberate refusals (a support bot declining off-topic requests) are overridden
wherever the base would answer, which is why it is an option (`--defense base-refusal-restore`).

`first_tokens_refuse` scores a cached base reply the same way, which is how `ood` composes this screen.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .arch import has_adapter, text_config, unwrap
from .baselines import Defense
from .errors import SafetylockError
from .judges import refusal_marker
from .screen import REFUSAL_MESSAGE, Screen, forced_reply

BASE_REFUSAL_TOKENS = 12  # the base's stock refusals ("I'm sorry, but I can't ...") open within 4-8 tokens


def check_tokens(value: object) -> int:
    """Return a count of base reply tokens to read (an integer >= 1); raise otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        count: int | None = value
    elif isinstance(value, float) and math.isfinite(value) and value == int(value):
        count = int(value)
    else:
        count = None
    if count is None or count < 1:
        raise SafetylockError(f"the base-refusal screen reads a whole number of tokens >= 1, got {value!r}")
    return count


def first_tokens_refuse(tokenizer: Any, reply: str, tokens: int = BASE_REFUSAL_TOKENS) -> bool:
    """Whether the first `tokens` tokens of `reply` (re-tokenized) carry a refusal marker."""
    ids = tokenizer(reply, add_special_tokens=False)["input_ids"][:tokens]
    return refusal_marker(tokenizer.decode(ids, skip_special_tokens=True)) is not None


NEEDS_ADAPTER = ("the base-refusal screen needs the aligned base to ask: the fine-tune as a LoRA adapter on it "
                 "(--adapter), or, for a merged or fully fine-tuned model, the base as a second model (--base-model)")


@torch.no_grad()
def base_starts_refusing(model: Any, tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor,
                         tokens: int = BASE_REFUSAL_TOKENS, plain_is_base: bool = False,
                         base: Any = None) -> tuple[torch.Tensor, list[str]]:
    """Return (flag per row, the base's first reply tokens as text): `tokens` greedy steps of the base.

    The base is `base` when given (a second model, for a merged fine-tune), else `model` with its adapter off.
    A model without an adapter and no `base` is refused unless `plain_is_base` says the caller knows it is the
    base itself (the benchmark's unattacked row)."""
    if base is None and not has_adapter(model) and not plain_is_base:
        raise SafetylockError(NEEDS_ADAPTER)
    asked = base if base is not None else model
    texts = [tokenizer.decode(row, skip_special_tokens=True)
             for row in base_reply_ids(asked, ids, mask, tokens, pad_id(tokenizer))]
    return refusing(texts, ids.device), texts


def pad_id(tokenizer: Any) -> int:
    """Return the id `generate` pads finished rows with: the tokenizer's pad, else its EOS."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def opening(reply: torch.Tensor, ends: Sequence[int]) -> list[int]:
    """Return a reply's token ids up to and including its first end token (EOS or pad), or all of them."""
    ids = [int(t) for t in reply.tolist()]
    stop = next((i for i, t in enumerate(ids) if t in ends), None)
    return ids if stop is None else ids[: stop + 1]


def end_ids(models: Sequence[Any], tokenizer: Any) -> list[int]:
    """Return the ids that end a reply: every model's generation-config EOS ids, the tokenizer's EOS and pad."""
    ends: list[Any] = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    for model in models:
        config_eos = getattr(getattr(unwrap(model), "generation_config", None), "eos_token_id", None)
        ends += [config_eos] if isinstance(config_eos, int) else list(config_eos or [])
    return sorted({int(t) for t in ends if t is not None})


@torch.no_grad()
def restore_openings(model: Any, tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor, flags: torch.Tensor,
                     base_ids: torch.Tensor, tokens: int, base: Any = None) -> list[list[int]]:
    """Return per row the base's opening where the base did not start refusing but the fine-tune does, else [].

    The fine-tune (`model` with its adapter on, or the merged model itself) writes its first `tokens` greedy
    reply tokens for the rows the base lets through; those that carry a refusal marker get the base's opening
    (`base_ids`, written by `base` or by `model` with its adapter off), cut at its first end token. An opening
    with no text (the base ended at once) is not given: it would be an empty reply."""
    openings: list[list[int]] = [[] for _ in range(ids.shape[0])]
    asked = [row for row, flagged in enumerate(flags.tolist()) if not flagged]
    if not asked:
        return openings
    out = model.generate(input_ids=ids[asked], attention_mask=mask[asked], max_new_tokens=tokens, do_sample=False,
                         pad_token_id=pad_id(tokenizer))
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in out[:, ids.shape[1]:]]
    ends = end_ids([model] + ([base] if base is not None else []), tokenizer)
    for row, refuses in zip(asked, refusing(texts).tolist()):
        given = opening(base_ids[row], ends)
        if refuses and tokenizer.decode(given, skip_special_tokens=True).strip():
            openings[row] = given
    return openings


@torch.no_grad()
def base_reply_ids(model: Any, ids: torch.Tensor, mask: torch.Tensor, tokens: int, pad_id: int) -> torch.Tensor:
    """Return the base's first `tokens` greedy reply ids per row (pad after an early end): the adapter, if any, off."""
    with model.disable_adapter() if has_adapter(model) else contextlib.nullcontext():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False,
                             pad_token_id=pad_id)
    reply: torch.Tensor = out[:, ids.shape[1]:]
    return reply


def check_same_vocab(model: Any, base: Any) -> None:
    """Raise unless `base` reads the same token ids as `model` (the screen feeds it the fine-tune's prompt ids)."""
    ours, theirs = (getattr(text_config(unwrap(m).config), "vocab_size", None) for m in (model, base))
    if ours != theirs:
        raise SafetylockError(f"the base to ask has a vocabulary of {theirs} tokens but the fine-tune {ours}; "
                              "give the fine-tune's own aligned base (--base-model)")


def refusing(texts: Sequence[str], device: Any = None) -> torch.Tensor:
    """Return a bool flag per reply text: whether it carries a refusal marker."""
    return torch.tensor([refusal_marker(t) is not None for t in texts], dtype=torch.bool, device=device)


class BaseRefusal(Defense):
    """Flag a prompt where the base's own first reply tokens refuse; reply a fixed refusal there."""

    name = "base-refusal"

    def __init__(self, tokenizer: Any = None, tokens: int = BASE_REFUSAL_TOKENS, message: str = REFUSAL_MESSAGE,
                 plain_is_base: bool = False, base: Any = None, restore: bool = False) -> None:
        self.tokenizer = tokenizer
        self.base = base  # the aligned base as a second model (a merged fine-tune); None: the adapter off
        self.asks = "a second model" if base is not None else "the adapter off"
        self.tokens = check_tokens(tokens)
        self.message = message
        self.plain_is_base = plain_is_base  # a model without an adapter is the base itself (the bench's "none" row)
        self.restore = restore  # also give the base's opening where the fine-tune refuses and the base does not
        if restore:
            self.name = "base-refusal-restore"
        self.last: Screen | None = None

    def _tokenizer(self, model: Any) -> Any:
        if self.tokenizer is None:
            from .guard import tokenizer_for

            spec = getattr(model, "safetylock_spec", None) or getattr(unwrap(model), "safetylock_spec", None)
            if spec is None:
                raise SafetylockError("the base-refusal screen needs the model's tokenizer; pass BaseRefusal(tokenizer=)")
            self.tokenizer = tokenizer_for(str(spec))
        return self.tokenizer

    @contextlib.contextmanager
    def applied(self, model: Any, alpha: float | None = None) -> Iterator[Any]:
        if alpha is not None:
            raise SafetylockError("the base-refusal screen has no strength; leave --alpha out")
        if self.base is None and not has_adapter(model) and not self.plain_is_base:
            raise SafetylockError(NEEDS_ADAPTER)
        if self.base is not None:
            check_same_vocab(model, self.base)
        tokenizer = self._tokenizer(model)

        def decide(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, list[list[int]]]:
            first = base_reply_ids(self.base if self.base is not None else model, ids, mask, self.tokens,
                                   pad_id(tokenizer))
            flags = refusing([tokenizer.decode(row, skip_special_tokens=True) for row in first], ids.device)
            is_base = self.base is None and not has_adapter(model)  # the bench's unattacked row: nothing to restore
            if not self.restore or is_base:
                return flags
            return flags, restore_openings(model, tokenizer, ids, mask, flags, first, self.tokens, self.base)

        with forced_reply(model, tokenizer, decide, self.message) as screen:
            self.last = screen
            yield model

    def describe(self) -> dict[str, Any]:
        screen = self.last
        return {"name": self.name, "tokens": self.tokens, "message": self.message,
                "asks": self.asks,
                "screened": screen.prompts if screen is not None else 0,
                "refused": screen.refused if screen is not None else 0,
                "restore": self.restore,
                "restored": screen.opened if screen is not None else 0,
                "seconds_per_prompt": screen.seconds_per_prompt if screen is not None else None}


def refusal_flags(tokenizer: Any, replies: Sequence[str], tokens: int = BASE_REFUSAL_TOKENS) -> list[bool]:
    """Return `first_tokens_refuse` of each cached base reply."""
    return [first_tokens_refuse(tokenizer, r, tokens) for r in replies]


__all__ = ["BASE_REFUSAL_TOKENS", "BaseRefusal", "base_reply_ids", "base_starts_refusing", "check_same_vocab",
           "check_tokens", "end_ids", "first_tokens_refuse", "opening", "pad_id", "refusal_flags", "refusing",
           "restore_openings"]
