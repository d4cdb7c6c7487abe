"""Transfer check: do the lock's directions still separate safe from unsafe replies on another model?"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import SafetylockError
from .artifact import DEFAULT_POSITIONS, Item, Lock, Pair
from .capture import Activations, head_activations


@dataclass
class TransferReport:
    """Per-head accuracy of the lock's directions (threshold at the base's midpoint) on two models."""

    layers: list[int]
    heads: list[int]
    base_accuracy: list[float]
    target_accuracy: list[float]
    threshold: float

    @property
    def mean_base(self) -> float:
        return float(np.mean(self.base_accuracy)) if self.base_accuracy else float("nan")

    @property
    def mean_target(self) -> float:
        return float(np.mean(self.target_accuracy)) if self.target_accuracy else float("nan")

    @property
    def weak(self) -> bool:
        return self.mean_target < self.threshold

    def summary(self) -> str:
        return (f"{len(self.layers)} heads: mean accuracy {self.mean_target:.3f} on the target vs "
                f"{self.mean_base:.3f} on the base" + (" (WEAK: the directions do not transfer)" if self.weak else ""))


def direction_accuracy(lock: Lock, acts: Activations, labels: np.ndarray) -> list[float]:
    """Return per lock head the accuracy of `projection > midpoint` against labels (1 = safe)."""
    if lock.midpoints is None:
        raise SafetylockError("this lock has no projection midpoints; extract it again with this version")
    col = {layer: i for i, layer in enumerate(acts.layers)}
    out = []
    for k, (layer, head) in enumerate(zip(lock.layers.tolist(), lock.heads.tolist())):
        proj = acts.values[:, col[layer], head, :] @ lock.directions[k]
        out.append(float(((proj > lock.midpoints[k]).numpy().astype(int) == labels).mean()))
    return out


def check_transfer(
    lock: Lock,
    model: Any,
    tokenizer: Any,
    pairs: Sequence[Pair],
    *,
    base: Any = None,
    threshold: float = 0.7,
    force: bool = False,
    batch_size: int = 8,
    progress: bool = False,
) -> TransferReport:
    """Return how well the lock's stored directions still separate safe from unsafe replies on `model`.

    Compared with the same measure on `base` when given, else with the projection accuracy recorded at
    extraction (on held-out pairs). Warns when the mean target accuracy falls below `threshold`. `force` as in
    `Lock.validate`: off, a model that does not descend from the lock's base is refused.
    """
    lock.validate(model, force=force)
    positions = str(lock.metadata.get("extraction", {}).get("positions", DEFAULT_POSITIONS))
    layers = sorted(set(lock.layers.tolist()))
    items: list[Item] = [*((p, s) for p, s, _ in pairs), *((p, u) for p, _, u in pairs)]

    def measure(m: Any) -> list[float]:
        acts = head_activations(m, tokenizer, items, positions, layers=layers, batch_size=batch_size, progress=progress)
        return direction_accuracy(lock, acts, (acts.owner.numpy() < len(pairs)).astype(int))

    target = measure(model)
    if base is not None:
        base_acc = measure(base)
    else:
        base_acc = [float(v) for v in lock.metadata.get("extraction", {}).get("projection_accuracy", [])]
    report = TransferReport(lock.layers.tolist(), lock.heads.tolist(), base_acc, target, threshold)
    if report.weak:
        warnings.warn(f"lock transfer is weak: {report.summary()}", stacklevel=2)
    return report
