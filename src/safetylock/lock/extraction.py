"""Extraction: a lock from (prompt, safe reply, unsafe reply) triples teacher-forced through the aligned base."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..arch import unwrap
from ..errors import SafetylockError
from .artifact import DEFAULT_ALPHA, DEFAULT_HEADS, DEFAULT_POSITIONS, Item, Lock, Pair, _hash_rows, _library_version
from .capture import head_activations
from .method import fit_heads, rank_heads, split_pairs
from .positions import parse_positions, template_token_count


def extract(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[Pair],
    *,
    heads: int = DEFAULT_HEADS,
    positions: str = DEFAULT_POSITIONS,
    seed: int = 0,
    val_fraction: float = 0.25,
    alpha: float = DEFAULT_ALPHA,
    batch_size: int = 8,
    progress: bool = False,
    name: str | None = None,
) -> Lock:
    """Return a lock from (prompt, safe, unsafe) triples teacher-forced through the aligned base model."""
    from ..models import fingerprint

    pairs = [tuple(p) for p in pairs]  # type: ignore[misc]
    if any(len(p) != 3 or not all(isinstance(v, str) and v for v in p) for p in pairs):
        raise SafetylockError("every pair must be three non-empty strings: (prompt, safe reply, unsafe reply)")
    terms = parse_positions(positions)
    if all(t.segment != "response" for t in terms):
        raise SafetylockError(
            f"positions '{positions}' read only prompt tokens, where safe and unsafe replies look identical "
            "(the model is causal); include response positions, e.g. response:1-8"
        )
    train_pairs, val_pairs = split_pairs(len(pairs), val_fraction, seed)
    items: list[Item] = [*((p, s) for p, s, _ in pairs), *((p, u) for p, _, u in pairs)]
    acts = head_activations(model, tokenizer, items, positions, batch_size=batch_size, progress=progress)
    n = len(pairs)
    owner = acts.owner.numpy()
    labels = (owner < n).astype(int)  # 1 = safe reply
    pair_of = owner % n
    train = np.isin(pair_of, train_pairs)
    val = np.isin(pair_of, val_pairs)
    fit = fit_heads(acts.values, labels, train, val, seed=seed, progress=progress)
    chosen = rank_heads(fit.accuracy, fit.separation, heads)
    idx = tuple(torch.tensor(v) for v in zip(*chosen))
    fp = fingerprint(model, name, sketch=True)
    metadata = {
        "library": "safetylock",
        "version": _library_version(),
        "method": "safetylock: per-head logistic probes, unit mass-mean directions (safe - unsafe)",
        "fingerprint": fp,
        "default_alpha": float(alpha),
        "extraction": {
            "positions": positions,
            "heads": len(chosen),
            "seed": seed,
            "val_fraction": val_fraction,
            "pairs": n,
            "train_pairs": len(train_pairs),
            "val_pairs": len(val_pairs),
            "samples": int(len(owner)),
            "template_tokens": template_token_count(tokenizer),
            "dtype": str(next(iter(unwrap(model).parameters())).dtype).removeprefix("torch."),
            "ranking": "validation accuracy, ties by Cohen's d of validation projections",
            "pairs_sha256": _hash_rows(pairs),
            "projection_accuracy": [round(float(fit.projection_accuracy[c]), 4) for c in chosen],
            "mean_val_accuracy_all_heads": round(float(fit.accuracy.mean()), 4),
        },
    }
    return Lock(
        layers=idx[0].long(),
        heads=idx[1].long(),
        directions=fit.directions[idx].float().contiguous(),
        stds=fit.stds[idx].float(),
        scores=fit.accuracy[idx].float(),
        metadata=metadata,
        midpoints=fit.midpoints[idx].float(),
        accuracy=fit.accuracy.float(),
        separation=fit.separation.float(),
    )
