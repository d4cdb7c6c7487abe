"""A fixed reply for flagged prompts: hooks that make `generate` emit a message instead of the model's own reply.

`forced_reply(model, tokenizer, decide, message)` is a context manager. Inside it, every call that starts a
sequence asks `decide(input_ids, attention_mask) -> BoolTensor[batch]` which rows to refuse; for those rows the
logits of the last position are forced (-inf everywhere but one token, 0 there) to the message's next token,
then to EOS for ever, so greedy and sampled decoding (batched, left-padded) both emit exactly the message and
stop. Unflagged rows' logits are the model's own, bit for bit. The hooks are removed on exit.

`decide` may instead return `(flags, openings)`: `openings[row]` is a list of token ids (empty for none) that an
unflagged row is forced through first, after which the model's own logits take over. That hands a reply's
first tokens to another writer (the base-refusal screen's `restore` gives the base's opening to prompts the
fine-tune would refuse but the base answers); an opening that ends in EOS ends the reply there.

What starts a sequence: a call with an empty or absent KV cache, except a `use_cache=False` call whose ids
extend the previous prompt's (that is `generate(use_cache=False)` feeding the whole sequence again). A call
that extends a non-empty cache continues the rows' state (cached decoding, one token or more). Only the last
position is forced: it is the one `generate` reads; earlier positions of a prefill keep the model's logits.

`decide` may run `model` itself (a probe on the same weights): the hooks stand aside while it runs. The hooks
sit on the transformers model and, for a peft model, on the wrapper too (whichever the caller enters first
does the work), on the model's final logits (after any soft-capping), so they see every route `generate`
and direct calls take.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .arch import unwrap
from .errors import SafetylockError

REFUSAL_MESSAGE = "I can't help with that request."
Decide = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | tuple[torch.Tensor, list[list[int]]]]


@dataclass
class Screen:
    """What a `forced_reply` block has decided so far: the latest rows' flags, totals and time spent deciding."""

    message_ids: list[int]
    eos_token_id: int
    flagged: torch.Tensor | None = None  # (batch,) bool, the latest prompt batch
    prompts: int = 0  # rows decided
    refused: int = 0  # rows flagged
    opened: int = 0  # rows forced through an opening of another writer's, then left to the model
    seconds: float = 0.0  # wall time inside `decide`

    @property
    def seconds_per_prompt(self) -> float | None:
        return self.seconds / self.prompts if self.prompts else None


@dataclass
class _State:
    depth: int = 0  # nesting of hooked forwards in flight (the wrapper's, then the model's, or decide's own calls)
    prompt: torch.Tensor | None = None  # (batch, length) ids of the sequence start
    index: int = 0  # which reply token this call's last position predicts
    openings: list[list[int]] = field(default_factory=list)  # per row of the latest batch; [] for none
    handles: list[Any] = field(default_factory=list)


def message_token_ids(tokenizer: Any, message: str) -> list[int]:
    """Return the token ids of `message` as a reply continues them (no special tokens added)."""
    if not message.strip():
        raise SafetylockError("the fixed reply message is empty; give a refusal in words")
    ids = tokenizer(message, add_special_tokens=False)["input_ids"]
    if not ids:
        raise SafetylockError(f"the message {message!r} tokenizes to nothing")
    return [int(i) for i in ids]


def reply_end_id(model: Any, tokenizer: Any) -> int:
    """Return the token that ends the forced reply: the tokenizer's EOS if `generate` stops on it, else the model's."""
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ends = [config_eos] if isinstance(config_eos, int) else [int(v) for v in (config_eos or [])]
    if tokenizer.eos_token_id is not None and (not ends or tokenizer.eos_token_id in ends):
        return int(tokenizer.eos_token_id)
    if ends:
        return ends[0]
    raise SafetylockError("neither the tokenizer nor the model's generation config names an EOS token")


def forced_logits(logits: torch.Tensor, rows: torch.Tensor, token: int | torch.Tensor) -> torch.Tensor:
    """Return `logits` (batch, vocab) with each row in `rows` replaced by 0 at `token` and -inf elsewhere.

    `token` is one id for every row, or a (batch,) tensor of ids, one per row."""
    tokens = torch.as_tensor(token, device=logits.device).long().expand(logits.shape[0])
    forced = torch.full_like(logits, float("-inf")).scatter(1, tokens[:, None], 0.0)
    return torch.where(rows.to(logits.device)[:, None], forced, logits)


def _decision(decided: Any, rows: int, width: int | None) -> tuple[torch.Tensor, list[list[int]]]:
    """Return (flags, openings) from what `decide` returned (flags alone, or flags and openings), checked."""
    with_openings = isinstance(decided, tuple) and len(decided) == 2 and isinstance(decided[1], (list, tuple))
    flags, openings = decided if with_openings else (decided, None)
    flags = torch.as_tensor(flags)
    if flags.shape != (rows,):
        raise SafetylockError(f"decide returned shape {tuple(flags.shape)}; it must return one flag per row ({rows})")
    openings = [[] for _ in range(rows)] if openings is None else [[int(t) for t in o] for o in openings]
    if len(openings) != rows:
        raise SafetylockError(f"decide returned {len(openings)} openings; it must return one per row ({rows})")
    bad = [t for o in openings for t in o if width is not None and not 0 <= t < width]
    if bad:
        raise SafetylockError(f"token {bad[0]} of an opening is outside the model's {width}-token vocabulary")
    return flags.bool(), openings


def _call_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Return (input_ids, 2-D mask of this call's tokens, cached length, whether it is a cache-less rerun)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise SafetylockError("a fixed reply needs input_ids of shape (batch, tokens); inputs_embeds are not supported")
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != ids.shape[0]:
        mask = torch.ones_like(ids)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
    return ids, mask[:, -ids.shape[1]:], past, cache is None and kwargs.get("use_cache") is False


@contextlib.contextmanager
def forced_reply(model: Any, tokenizer: Any, decide: Decide, message: str = REFUSAL_MESSAGE, *,
                 eos_token_id: int | None = None) -> Iterator[Screen]:
    """Make `model` reply `message` to the rows `decide` flags, inside the block; yield the running `Screen`.

    `decide(input_ids, attention_mask)` gets each new sequence's ids and 2-D mask (left padding as `generate`
    uses) and returns a bool tensor with one entry per row, or `(flags, openings)` (the module docstring).
    `eos_token_id` ends the message (default `reply_end_id`). On exit the model computes exactly what it did before.
    """
    screen = Screen(message_token_ids(tokenizer, message),
                    int(eos_token_id) if eos_token_id is not None else reply_end_id(model, tokenizer))
    vocab = unwrap(model).get_output_embeddings()
    width = getattr(vocab, "out_features", None) or getattr(unwrap(model).config, "vocab_size", None)
    bad = [t for t in [*screen.message_ids, screen.eos_token_id] if width is not None and not 0 <= t < int(width)]
    if bad:
        raise SafetylockError(f"token {bad[0]} of the fixed reply is outside the model's {width}-token vocabulary; "
                              "use the defended model's own tokenizer")
    reply = [*screen.message_ids, screen.eos_token_id]
    state = _State()

    def start(ids: torch.Tensor, mask: torch.Tensor, past: int, rerun: bool) -> None:
        prompt = state.prompt
        if past > 0:
            if prompt is None or prompt.shape[0] != ids.shape[0]:
                raise SafetylockError("a cached call arrived without the prompt it continues (or for another batch "
                                      "size); start generation inside the forced_reply block")
            state.index = past + ids.shape[1] - prompt.shape[1]
            return
        if (rerun and prompt is not None and prompt.shape[0] == ids.shape[0] and ids.shape[1] > prompt.shape[1]
                and torch.equal(ids[:, : prompt.shape[1]], prompt.to(ids.device))):
            state.index = ids.shape[1] - prompt.shape[1]
            return
        began = time.perf_counter()
        decided = decide(ids, mask)
        screen.seconds += time.perf_counter() - began
        flags, openings = _decision(decided, ids.shape[0], None if width is None else int(width))
        screen.flagged = flags.to(ids.device)
        state.openings = [[] if f else o for f, o in zip(screen.flagged.tolist(), openings)]
        screen.prompts += ids.shape[0]
        screen.refused += int(screen.flagged.sum())
        screen.opened += sum(bool(o) for o in state.openings)
        state.prompt = ids.detach().clone()
        state.index = 0

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if state.depth > 0:  # the inner half of a wrapped call, or a call made by decide
            state.depth += 1
            return
        state.depth = 1
        try:
            start(*_call_inputs(args, kwargs))
        except BaseException:
            state.depth = 0
            raise

    def after(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if state.depth == 0:  # `before` failed and reset; nothing to undo
            return None
        state.depth -= 1
        if state.depth > 0 or output is None or screen.flagged is None:
            return None
        if any(state.openings):
            rows, tokens = forced_now(screen.flagged, state.openings, state.index)
        else:  # the common case, a message and no openings: no per-row work on each decode step
            rows, tokens = screen.flagged, torch.tensor(reply[min(state.index, len(reply) - 1)])
        if not bool(rows.any()):
            return None
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            logits = output[0]
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            raise SafetylockError("a fixed reply needs the model to return logits of shape (batch, tokens, vocab)")
        new = logits.clone()
        new[:, -1] = forced_logits(logits[:, -1], rows, tokens)
        if isinstance(output, tuple):
            return (new, *output[1:])
        output.logits = new
        return output

    def forced_now(flagged: torch.Tensor, openings: list[list[int]], index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (rows forced at reply token `index`, the token per row): the message's, or an opening's."""
        tokens = torch.full(flagged.shape, reply[min(index, len(reply) - 1)], dtype=torch.long)
        rows = flagged.clone().cpu()
        for row, opening in enumerate(openings):
            if index < len(opening):
                rows[row], tokens[row] = True, opening[index]
        return rows, tokens

    modules = [model] if unwrap(model) is model else [model, unwrap(model)]
    try:
        for module in modules:
            state.handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            state.handles.append(module.register_forward_hook(after, always_call=True))
        yield screen
    finally:
        for handle in state.handles:
            handle.remove()


__all__ = ["REFUSAL_MESSAGE", "Screen", "forced_logits", "forced_reply", "message_token_ids", "reply_end_id"]
