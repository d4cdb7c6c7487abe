"""The probe maths (pure): split by pair, fit one probe per head, rank the heads.

This is the one file to change to try another way of finding the directions.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SafetylockError


def split_pairs(n: int, val_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return (train, val) pair indices: a seeded split of range(n), so no pair lands on both sides."""
    if n < 2:
        raise SafetylockError(f"need at least 2 pairs to hold some out for validation, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, int(round(n * val_fraction))))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@dataclass
class HeadFit:
    """Per-head results of fitting probes: maps (layers, heads) and per-head direction statistics."""

    accuracy: torch.Tensor  # (L, H) validation accuracy of the logistic probe
    separation: torch.Tensor  # (L, H) Cohen's d of validation projections on the mass-mean direction
    directions: torch.Tensor  # (L, H, D) unit mass-mean directions (positive minus negative), from train
    stds: torch.Tensor  # (L, H) std of train projections on the direction
    midpoints: torch.Tensor  # (L, H) midpoint of the class means of train projections
    projection_accuracy: torch.Tensor  # (L, H) validation accuracy of thresholding at the midpoint


def fit_heads(
    values: torch.Tensor,
    labels: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    *,
    seed: int = 0,
    progress: bool = False,
) -> HeadFit:
    """Return per-head probe accuracy, separation and mass-mean directions for samples `values` (S, L, H, D).

    `labels` is 1 for the positive (safe) class; `train` / `val` are boolean or index masks over samples.
    """
    from sklearn.linear_model import LogisticRegression

    S, L, H, D = values.shape
    y = np.asarray(labels).astype(int)
    tr = np.zeros(S, bool)
    tr[train] = True
    va = np.zeros(S, bool)
    va[val] = True
    if len(set(y[tr])) < 2 or len(set(y[va])) < 2:
        raise SafetylockError("train and validation sets each need both classes; give more pairs")
    acc = torch.zeros(L, H)
    sep = torch.zeros(L, H)
    dirs = torch.zeros(L, H, D)
    stds = torch.zeros(L, H)
    mids = torch.zeros(L, H)
    pacc = torch.zeros(L, H)
    data = values.numpy().astype(np.float64, copy=False)
    heads = [(layer, head) for layer in range(L) for head in range(H)]
    if progress:
        from tqdm.auto import tqdm

        heads = tqdm(heads, desc="probes", unit="head", leave=False)
    for layer, head in heads:
        x = data[:, layer, head, :]
        xt, yt = x[tr], y[tr]
        mu, sd = xt.mean(0), xt.std(0) + 1e-6
        probe = LogisticRegression(C=1.0, max_iter=1000, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe.fit((xt - mu) / sd, yt)
        acc[layer, head] = float((probe.predict((x[va] - mu) / sd) == y[va]).mean())
        diff = xt[yt == 1].mean(0) - xt[yt == 0].mean(0)
        norm = float(np.linalg.norm(diff))
        if not math.isfinite(norm) or norm == 0.0:
            continue
        direction = diff / norm
        proj_t = xt @ direction
        proj_v = x[va] @ direction
        pos, neg = proj_v[y[va] == 1], proj_v[y[va] == 0]
        pooled = math.sqrt((pos.var() + neg.var()) / 2) + 1e-12
        mid = (proj_t[yt == 1].mean() + proj_t[yt == 0].mean()) / 2
        dirs[layer, head] = torch.from_numpy(direction).float()
        stds[layer, head] = float(proj_t.std())
        sep[layer, head] = float((pos.mean() - neg.mean()) / pooled)
        mids[layer, head] = float(mid)
        pacc[layer, head] = float(((proj_v > mid).astype(int) == y[va]).mean())
    return HeadFit(acc, sep, dirs, stds, mids, pacc)


def rank_heads(accuracy: torch.Tensor, separation: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """Return the top-k (layer, head) by validation accuracy, ties broken by separation (accuracy saturates)."""
    L, H = accuracy.shape
    cells = [(layer, head) for layer in range(L) for head in range(H)]
    cells.sort(key=lambda c: (-float(accuracy[c]), -float(separation[c]), c))
    return cells[: max(1, min(k, len(cells)))]
