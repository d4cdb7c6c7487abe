"""The lock as a defense (baked or conditional) and its harmfulness gate alone (gate-only refusal)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import SafetylockError, check_finite
from ..lock import Lock
from .defense import Defense


class LockDefense(Defense):
    """SafetyLock: bake the lock at `alpha` (restored exactly on exit), or apply it conditionally by hooks.

    A thin adapter over `Deployment`, the one path a lock is applied by. `force` defaults to False there, in
    `Lock.applied` and `Lock.bake`, in `calibrate` and in `check_transfer`: a lock steers the heads of the base it
    was found on, so applying it to a model that does not descend from that base is refused unless asked for
    (the shapes must match even then). A LoRA or full fine-tune of the base passes the check without it.
    """

    name = "safetylock"

    def __init__(self, lock: Lock, conditional: bool = False, force: bool = False) -> None:
        if conditional and not lock.has_condition:
            raise SafetylockError("this lock has no harmfulness probe; extract it with --conditional or drop conditional")
        self.lock = lock
        self.conditional = conditional
        self.force = force
        self.default_alpha = lock.default_alpha

    @contextlib.contextmanager
    def applied(self, model: Any, alpha: float | None = None) -> Iterator[Any]:
        from ..deployment import Deployment

        mode = "conditional" if self.conditional else "baked"
        with Deployment(lock=self.lock, mode=mode, alpha=alpha, force=self.force, model=model) as ready:
            yield ready

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "conditional": self.conditional, "default_alpha": self.default_alpha,
                "heads": len(self.lock)}


class GateRefusal(Defense):
    """Gate-only refusal: the lock's harmfulness gate decides, and a flagged prompt gets a fixed refusal message;
    nothing is steered. The honest baseline the conditional lock's gate enables on its own.

    alpha, if given, is the gate's logit threshold (any finite number; default 0, the cut the gate was fitted
    with): a prompt is flagged when its gate logit exceeds it, so a lower threshold refuses more.
    """

    name = "gate-refusal"

    def __init__(self, lock: Lock, tokenizer: Any = None, message: str | None = None, force: bool = False) -> None:
        if not lock.has_condition:
            raise SafetylockError("gate-refusal needs a lock with a harmfulness gate; extract it with --conditional")
        from ..screen import REFUSAL_MESSAGE

        self.lock = lock
        self.tokenizer = tokenizer
        self.message = message or REFUSAL_MESSAGE
        self.force = force
        self.last: Any = None

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            from ..models import model_source

            name = self.lock.fingerprint.get("name")
            if not name:
                raise SafetylockError("this lock does not name its model; pass the tokenizer to GateRefusal")
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_source(str(name))))
        return self.tokenizer

    @contextlib.contextmanager
    def applied(self, model: Any, alpha: float | None = None) -> Iterator[Any]:
        from ..lock.gate import gate_logits_on_ids
        from ..screen import forced_reply

        threshold = 0.0 if alpha is None else check_finite(alpha, "the gate threshold")
        self.lock.validate(model, force=self.force)

        def decide(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return gate_logits_on_ids(self.lock, model, ids, mask) > threshold

        with forced_reply(model, self._tokenizer(), decide, self.message) as screen:
            self.last = screen
            yield model

    def describe(self) -> dict[str, Any]:
        screen = self.last
        return {"name": self.name, "message": self.message, "gate": self.lock.gate.design if self.lock.gate is not None else None,
                "seconds_per_prompt": screen.seconds_per_prompt if screen is not None else None}
