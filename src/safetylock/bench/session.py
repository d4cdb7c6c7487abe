"""Models, loaded only when a cell needs computing, and the first reply token's distribution (the KL to the base)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Loader = Callable[[str], tuple[Any, Any]]


class ModelSession:
    """One base model: loaded on first use; attack adapters attached one at a time; base logits for the KL."""

    def __init__(self, spec: str, loader: Loader) -> None:
        self.spec = spec
        self.loader = loader
        self._base: Any = None
        self.tokenizer: Any = None
        self.attached: tuple[str, Any] | None = None  # (adapter dir, wrapped model)
        self._reference: Any = None

    @property
    def base(self) -> Any:
        if self._base is None:
            self._base, self.tokenizer = self.loader(self.spec)
            self._base.safetylock_spec = self.spec
        return self._base

    def plain(self) -> Any:
        """Return the base with no adapter attached."""
        self.detach()
        return self.base

    def compromised(self, adapter: Path | None) -> Any:
        """Return the base with `adapter` attached (the base itself for None)."""
        if adapter is None:
            return self.plain()
        if self.attached is not None and self.attached[0] == str(adapter):
            return self.attached[1]
        from ..models import attach_adapter

        base = self.plain()
        wrapped = attach_adapter(base, adapter)
        wrapped.eval()
        self.attached = (str(adapter), wrapped)
        return wrapped

    def detach(self) -> None:
        if self.attached is not None:
            self._base = self.attached[1].unload()
            self._base.eval()
            self.attached = None

    def reference(self, prompts: Sequence[str], batch_size: int) -> Any:
        """Return the base's first-reply-token log-probabilities on `prompts` (no adapter, no defense)."""
        if self._reference is None:
            model = self.base if self.attached is None else self.attached[1]
            ctx = self.attached[1].disable_adapter() if self.attached is not None else contextlib.nullcontext()
            with ctx:
                self._reference = first_token_logprobs(model, self.tokenizer, prompts, None, batch_size)
        return self._reference


def first_token_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str], system: str | None,
                         batch_size: int = 8) -> Any:
    """Return (prompts, vocab) float32 log-probabilities of the reply's first token."""
    import torch

    from ..generate import format_chat, model_device

    texts = [format_chat(tokenizer, p, system) for p in prompts]
    tokenizer.padding_side = "left"
    rows = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model(**{k: v.to(model_device(model)) for k, v in enc.items()}, logits_to_keep=1).logits[:, -1, :]
        rows.append(torch.log_softmax(out.float(), dim=-1).cpu())
    return torch.cat(rows)


def first_token_kl(reference: Any, logprobs: Any) -> float:
    """Return the mean KL(reference || model) of first-reply-token distributions."""
    import torch

    p = reference.exp()
    # A forced reply (guard) puts -inf on all but one token: inf, not NaN where p underflowed to 0.
    return float(torch.where(p > 0, p * (reference - logprobs), 0.0).sum(-1).mean())
