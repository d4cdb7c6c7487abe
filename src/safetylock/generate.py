"""Chat templating and batched, left-padded greedy generation that stops at EOS."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .arch import end_of_turn_tokens


@dataclass
class Generation:
    """One reply: its text and how many new tokens it took."""

    prompt: str
    text: str
    tokens: int


@dataclass
class GenerationRun:
    """Replies in prompt order, plus the wall time and throughput of producing them."""

    generations: list[Generation] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(g.tokens for g in self.generations)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def texts(self) -> list[str]:
        return [g.text for g in self.generations]


def chat_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """Return the message list for one user turn with an optional system prompt."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}]


def chat_text(tokenizer: Any, messages: Sequence[dict[str, str]], reply_start: str = "") -> str:
    """Return the chat-templated text of `messages`, open for the assistant's reply, which starts with `reply_start`."""
    if tokenizer.chat_template is None:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    else:
        text = str(tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True))
    return text + reply_start


def format_chat(tokenizer: Any, prompt: str, system: str | None = None, response: str | None = None) -> str:
    """Return the chat-templated text for a user turn, open for the reply, or closed with `response`."""
    return chat_text(tokenizer, chat_messages(prompt, system), response or "")


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Return every token id that ends a reply: the generation config's and tokenizer's EOS, and the end-of-turn
    tokens of the model's architecture (`arch.ARCH_SPECS`; every architecture's for no model or an unknown one)."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for token in end_of_turn_tokens(model_type if isinstance(model_type, str) else None):
        tid = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
        if isinstance(tid, int):
            ids.add(tid)
    return sorted(ids)


def model_device(model: Any) -> torch.device:
    """Return the device of the model's input embeddings."""
    return model.get_input_embeddings().weight.device


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    system: str | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    progress: bool = False,
    on_batch: Any = None,
    attack: Any = None,
) -> GenerationRun:
    """Return greedy replies to `prompts`, batched with left padding, each stopping at EOS.

    Prompts are grouped by length so padding stays small; replies come back in input order.
    `on_batch(list[tuple[index, Generation]])` is called after each batch (for resumable writers).
    `attack` (a prompt_attacks.PromptAttack) rewrites each conversation; a reply then includes its prefill.
    """
    if attack is None:
        texts = [format_chat(tokenizer, p, system) for p in prompts]
    else:
        texts = [chat_text(tokenizer, attack.messages(p, system), attack.prefill) for p in prompts]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    eos = eos_token_ids(model, tokenizer)
    results: list[Generation | None] = [None] * len(texts)
    tokenizer.padding_side = "left"
    device = model_device(model)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc="generate", unit="prompt", leave=False)
    start = time.perf_counter()
    for batch in _batches(order, max(1, batch_size)):
        enc = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = out[:, enc["input_ids"].shape[1] :]
        done: list[tuple[int, Generation]] = []
        for row, idx in enumerate(batch):
            ids = new[row].tolist()
            n = next((k + 1 for k, t in enumerate(ids) if t in eos), len(ids))
            text = tokenizer.decode(ids[:n], skip_special_tokens=True).strip()
            if attack is not None:
                text = attack.reply(text)
            results[idx] = Generation(prompts[idx], text, n)
            done.append((idx, results[idx]))
        if on_batch is not None:
            on_batch(done)
        if bar is not None:
            bar.update(len(batch))
            elapsed = time.perf_counter() - start
            bar.set_postfix(tok_s=f"{sum(g.tokens for g in results if g) / max(elapsed, 1e-9):.1f}")
    if bar is not None:
        bar.close()
    return GenerationRun([g for g in results if g is not None], time.perf_counter() - start)
