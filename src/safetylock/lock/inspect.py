"""Inspection: a lock's accuracy map as text or PNG, and a short summary."""

from __future__ import annotations

from pathlib import Path

from ..errors import SafetylockError
from ..files import atomic_file
from .artifact import Lock

_SHADES = " .:-=+*#%@"


def heatmap_text(lock: Lock) -> str:
    """Return the layer x head validation-accuracy map as text; chosen heads are bracketed in the legend row."""
    if lock.accuracy is None:
        return "(this lock stores no accuracy map)"
    L, H = lock.accuracy.shape
    chosen = set(zip(lock.layers.tolist(), lock.heads.tolist()))
    lo = float(lock.accuracy.min())
    hi = float(lock.accuracy.max())
    lines = [f"validation accuracy per head (rows: layers, columns: heads); shade ' '={lo:.2f} .. '@'={hi:.2f}; "
             "X = chosen head",
             "layer | " + "".join(str(h % 10) for h in range(H))]
    for layer in range(L):
        row = []
        for head in range(H):
            v = float(lock.accuracy[layer, head])
            shade = _SHADES[min(len(_SHADES) - 1, int((v - lo) / max(hi - lo, 1e-9) * (len(_SHADES) - 1)))]
            row.append("X" if (layer, head) in chosen else shade)
        lines.append(f"{layer:5d} | " + "".join(row))
    return "\n".join(lines)


def plot_heatmap(lock: Lock, path: str | Path) -> Path:
    """Write the layer x head accuracy map as a PNG (chosen heads outlined); return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if lock.accuracy is None:
        raise SafetylockError("this lock stores no accuracy map to plot")
    L, H = lock.accuracy.shape
    fig, ax = plt.subplots(figsize=(max(4, H * 0.35 + 2), max(3, L * 0.25 + 1)))
    image = ax.imshow(lock.accuracy.numpy(), aspect="auto", cmap="viridis", origin="lower")
    ax.scatter(lock.heads.numpy(), lock.layers.numpy(), s=12, facecolors="none", edgecolors="red", linewidths=0.8)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"probe validation accuracy ({len(lock)} chosen heads circled)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)
    return path


def describe(lock: Lock) -> str:
    """Return a short text summary of a lock: model, settings, heads per layer and score range."""
    fp = lock.fingerprint
    ex = lock.metadata.get("extraction", {})
    per_layer: dict[int, int] = {}
    for layer in lock.layers.tolist():
        per_layer[layer] = per_layer.get(layer, 0) + 1
    lines = [
        f"model: {fp.get('name')} ({fp.get('model_type')}, {fp.get('num_hidden_layers')} layers x "
        f"{fp.get('num_attention_heads')} heads x {fp.get('head_dim')})",
        f"heads: {len(lock)}; default alpha {lock.default_alpha:g}; library {lock.metadata.get('version')}",
        "extraction: " + ", ".join(f"{k}={ex[k]}" for k in ("positions", "pairs", "seed", "val_fraction", "dtype") if k in ex),
        f"probe val accuracy of chosen heads: {float(lock.scores.min()):.3f} .. {float(lock.scores.max()):.3f}",
        "heads per layer: " + ", ".join(f"{k}:{v}" for k, v in sorted(per_layer.items())),
    ]
    if lock.gate is not None:
        gate = lock.gate
        lines.append(f"gate: {gate.design}, {len(gate.layers)} heads, reads the {gate.reads}"
                     + (f", val accuracy {gate.about['val_accuracy']}" if "val_accuracy" in gate.about else ""))
    return "\n".join(lines)
