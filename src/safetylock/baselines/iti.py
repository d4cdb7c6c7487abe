"""Inference-time intervention (Li et al. 2023): per-head probes on the last reply token, shifts at generated
positions only."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import SafetylockError
from ..lock import Lock, Pair, extract
from .defense import Defense

ITI_POSITIONS = "response:-1"  # Li et al. probe the last token of question + answer
ITI_HEADS = 48  # Li et al.'s K on LLaMA-7B; capped at the model's head count
ITI_ALPHA = 15.0  # Li et al.'s alpha (in units of the activations' std along the direction)


class ITIDefense(Defense):
    """Inference-time intervention: the lock's head shifts at generated positions only (forward pre-hooks)."""

    name = "iti"

    def __init__(self, lock: Lock, force: bool = False) -> None:
        if lock.metadata.get("baseline") != "iti":
            raise SafetylockError("this lock file was not fitted by fit_iti (no 'baseline: iti' in its metadata)")
        self.lock = lock
        self.force = force
        self.default_alpha = lock.default_alpha

    @contextlib.contextmanager
    def applied(self, model: Any, alpha: float | None = None) -> Iterator[Any]:
        with self.lock.applied(model, alpha=alpha, shift_at="generation", force=self.force):
            yield model

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "default_alpha": self.default_alpha, "heads": len(self.lock),
                "positions": "generation"}


def fit_iti(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[Pair],
    *,
    heads: int = ITI_HEADS,
    alpha: float = ITI_ALPHA,
    seed: int = 0,
    val_fraction: float = 0.25,
    batch_size: int = 8,
    progress: bool = False,
    name: str | None = None,
) -> Lock:
    """Return ITI's head directions as a lock: probes on the last reply token, top-K heads by held-out accuracy.

    This is Li et al.'s recipe (per-head logistic probes on the last token of prompt + answer, the K most
    accurate heads, mass-mean shift scaled by the std of activations along it), with (safe, unsafe)
    replies in place of (true, false) answers. Applied with `shift_at="generation"`, as ITI shifts
    only the positions that produce new tokens.
    """
    lock = extract(model, tokenizer, pairs, heads=heads, positions=ITI_POSITIONS, seed=seed, val_fraction=val_fraction,
                   alpha=alpha, batch_size=batch_size, progress=progress, name=name)
    lock.metadata["method"] = ("iti (Li et al. 2023): per-head logistic probes on the last reply token, "
                               "top-K heads, mass-mean directions (safe - unsafe), shift at generated positions")
    lock.metadata["baseline"] = "iti"
    return lock
