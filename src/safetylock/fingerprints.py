"""Model fingerprints: the shape facts an artifact must match, and a weight sketch that tells a descendant apart.

`fingerprint` records what decides whether a saved artifact fits a model (model type, head geometry,
vocabulary, name); `weight_sketch` adds a few hundred reproducible floats of the base weights, and
`sketch_distance` says how far another model's weights have moved from them.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import nn


def fingerprint(model: Any, name: str | None = None, sketch: bool = False) -> dict[str, Any]:
    """Return the shape facts that decide whether an artifact fits a model, with its weight sketch if asked.

    Head geometry and vocabulary come from the config's language-model part (`arch.text_config`), so a
    multimodal config such as gemma3's fingerprints like its text stack; `model_type` stays the top one's.
    """
    from .arch import head_geometry, text_config

    config = model.config
    facts: dict[str, Any] = {
        "model_type": config.model_type,
        **head_geometry(config).facts(),
        "vocab_size": text_config(config).vocab_size,
        "name": name or getattr(model, "safetylock_spec", None) or getattr(config, "_name_or_path", ""),
    }
    if sketch:
        facts["sketch"] = weight_sketch(model)
    return facts


# -- weight sketch: is this model a descendant of that one? ------------------------------------------------

SKETCH_METHOD = "rows8-signs-v1"  # change the name whenever the recipe below changes
SKETCH_ROWS = 8
SKETCH_LAYERS = 4
# A fine-tune moves each matrix by ~1e-3..1e-2 of its norm and bf16 rounding by ~1e-3, while weights not derived
# from the base are uncorrelated with it, which puts ||a - b|| / ||b|| at >= 1 whatever their scale (~1.41 at
# equal scale). Measured medians: tiny models (tests/test_descent.py) 0.0095 with 1e-2 relative noise, 0.048 with
# 5e-2, 0.0017 for a bf16 copy, 1.36-1.49 for another init, 1.42 with rows shuffled; the real 0.5B 0.0032 and
# 0.0063 after 5 and 20 full fine-tune steps (AdamW, lr 2e-5; up to 2.3% change per matrix), 0.0100 with 1e-2
# noise, 1.23 with its layers reversed, 1.60 for a fresh init. 0.5 is 80x above those fine-tunes, 2.5x below the
# nearest unrelated weights.
SKETCH_THRESHOLD = 0.5


def _signs(n: int) -> torch.Tensor:
    """Return a fixed ±1 vector of length n (splitmix64 of the index: the same on every machine and version)."""
    import numpy as np

    x = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x5AFE7C0C)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return torch.from_numpy(np.where(x & np.uint64(1), 1.0, -1.0).astype(np.float32))


def _sketch_rows(weight: torch.Tensor) -> list[float] | None:
    """Return a few evenly spaced rows of a matrix, each projected on the fixed sign vector (float32, CPU)."""
    if weight.dim() != 2 or not weight.is_floating_point() or weight.is_meta:
        return None  # quantized (packed integer) or offloaded weights cannot be read this way
    out, width = weight.shape
    rows = torch.tensor(sorted({(2 * i + 1) * out // (2 * SKETCH_ROWS) for i in range(SKETCH_ROWS)}))
    # Only the picked rows are converted, on CPU, so the cost is tiny and the same on every device and dtype.
    picked = weight.detach().index_select(0, rows.to(weight.device)).to("cpu", torch.float32)
    return [float(f"{v:.6g}") for v in (picked @ _signs(width)).tolist()]


def _layer_linears(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Return {path: base weight} of every Linear in a decoder layer, looking through peft wrappers."""
    found: dict[str, torch.Tensor] = {}
    for path, module in layer.named_modules():
        parts = path.split(".")
        if any(p.startswith("lora_") or p == "modules_to_save" for p in parts):
            continue  # adapter matrices, not the base's
        if isinstance(module, nn.Linear):
            key = ".".join(p for p in parts if p not in ("base_layer", "original_module"))
            found[key] = module.weight
    return found


def weight_sketch(model: Any) -> dict[str, Any]:
    """Return a small, reproducible sketch of a model's base weights (a few hundred floats, JSON-ready).

    Each sketched matrix gives 8 evenly spaced rows projected on a fixed ±1 vector: the embedding and every
    Linear of 4 layers spread over depth. An unmerged peft adapter is looked through (its base weights are
    sketched); a merged one is part of the weights. `sketch_distance` compares two sketches.
    """
    from .arch import decoder_layers, unwrap

    inner = unwrap(model)
    matrices: dict[str, torch.Tensor] = {}
    embedding = inner.get_input_embeddings()
    if embedding is not None and isinstance(getattr(embedding, "weight", None), torch.Tensor):
        matrices["embed"] = embedding.weight
    blocks = decoder_layers(model)
    count = len(blocks)
    for layer in sorted({round(i * (count - 1) / max(SKETCH_LAYERS - 1, 1)) for i in range(SKETCH_LAYERS)}):
        for path, weight in _layer_linears(blocks[layer]).items():
            matrices[f"layer{layer}.{path}"] = weight
    sketched: dict[str, Any] = {}
    with torch.no_grad():
        for key, weight in matrices.items():
            rows = _sketch_rows(weight)
            if rows is not None:
                sketched[key] = {"shape": list(weight.shape), "rows": rows}
    return {"method": SKETCH_METHOD, "matrices": sketched}


def sketch_distance(recorded: Any, current: dict[str, Any]) -> tuple[float, int] | None:
    """Return (median relative distance, matrices compared) between two sketches, or None if none compare.

    Per matrix the distance is ||current - recorded|| / ||recorded||; the median keeps one heavily retrained
    matrix (say, new token embeddings) from deciding. Sketches of another recipe do not compare.
    """
    if not isinstance(recorded, dict) or recorded.get("method") != current.get("method"):
        return None
    theirs, ours = recorded.get("matrices"), current.get("matrices") or {}
    if not isinstance(theirs, dict):
        return None
    distances = []
    for key, entry in theirs.items():
        mine = ours.get(key)
        if not (isinstance(entry, dict) and mine and entry.get("shape") == mine["shape"]):
            continue
        try:
            a = torch.tensor(mine["rows"], dtype=torch.float64)
            b = torch.tensor(entry.get("rows"), dtype=torch.float64)
        except (TypeError, ValueError):
            continue
        if a.shape != b.shape or not torch.isfinite(b).all() or float(b.norm()) == 0.0:
            continue
        distances.append(float((a - b).norm() / b.norm()))
    if not distances:
        return None
    return statistics.median(distances), len(distances)
