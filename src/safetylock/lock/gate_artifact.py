"""The harmfulness gate as an artifact of its own: which heads it reads, their standardisation, the logistic
weights and threshold, what it reads at run time (the deployed model or the base) and what it was fitted on.

A lock carries at most one (`Lock.gate`; `Lock.with_gate` swaps it without touching the lock's directions). In a
lock file the gate is stored as before (`cond_*` tensors, `metadata["condition"]`), so older locks load; a gate
also saves to a file of its own (`Gate.save`, `Gate.load`), so gate designs can be kept and compared side by side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SafetylockError
from ..files import read_tagged_safetensors, write_tagged_safetensors

GATE_FORMAT = "safetylock.gate"
GATE_FORMAT_VERSION = 1
GATE_READS = ("model", "base")
GATE_TENSORS = ("cond_layers", "cond_heads", "cond_mean", "cond_scale", "cond_weight", "cond_bias")
_STORED_KEYS = ("template_tokens", "template_ids", "heads", "reads")  # written beside `about` in the condition metadata


def read_heads(features: torch.Tensor, layers: Sequence[int], heads: Sequence[int]) -> np.ndarray:
    """Return (n, len(heads) * head_dim) float64: the named (layer, head) outputs of (n, layers, heads, head_dim)
    features, concatenated in order (what a gate's weights multiply)."""
    idx_l = torch.tensor(list(layers), dtype=torch.long)
    idx_h = torch.tensor(list(heads), dtype=torch.long)
    return features[:, idx_l, idx_h, :].reshape(features.shape[0], -1).double().numpy()


@dataclass
class Gate:
    """A fitted gate: the (layer, head) outputs it reads, standardised, weighted and thresholded.

    Its score for a prompt is `((x - mean) / scale) @ weight + bias`, where x concatenates each read head's output
    averaged over the prompt's post-instruction template tokens (found by `template_ids`, else the last
    `template_tokens` tokens); it fires when the score is > 0. `reads` says what
    the run-time decision reads: 'model' (the deployed model) or 'base' (its peft adapter switched off).
    `about` records the design and the data it was fitted on.
    """

    layers: list[int]
    heads: list[int]
    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: float
    about: dict[str, Any] = field(default_factory=dict)
    template_tokens: int = 1
    reads: str = "model"
    template_ids: list[int] | None = None  # the template's token ids, to find them before a prefilled reply

    def __post_init__(self) -> None:
        self.layers = [int(x) for x in self.layers]
        self.heads = [int(x) for x in self.heads]
        self.mean, self.scale, self.weight = (np.asarray(a, dtype=np.float64).reshape(-1)
                                              for a in (self.mean, self.scale, self.weight))
        self.bias = float(self.bias)
        m = len(self.layers)
        if m == 0 or len(self.heads) != m:
            raise SafetylockError(f"a gate reads at least one head, with one layer per head (got {m} layers, "
                                  f"{len(self.heads)} heads)")
        width = self.mean.shape[0]
        if width == 0 or width % m or self.scale.shape[0] != width or self.weight.shape[0] != width:
            raise SafetylockError(f"gate tensors disagree: mean {width}, scale {self.scale.shape[0]}, weight "
                                  f"{self.weight.shape[0]} values for {m} heads (one head_dim block each)")
        if not (np.isfinite(self.mean).all() and np.isfinite(self.weight).all() and np.isfinite(self.scale).all()
                and (self.scale > 0).all() and math.isfinite(self.bias)):
            raise SafetylockError("the gate holds NaN/inf or a non-positive scale; fit it again")
        if self.reads not in GATE_READS:
            raise SafetylockError(f"this gate reads '{self.reads}'; this version knows {', '.join(GATE_READS)}")
        if int(self.template_tokens) < 1:
            raise SafetylockError(f"a gate reads at least one template token, not {self.template_tokens}")
        self.template_tokens = int(self.template_tokens)
        if not self.template_ids:
            self.template_ids = None  # a template with no tokens of its own: read the last tokens
        else:
            if not isinstance(self.template_ids, (list, tuple)) or len(self.template_ids) != self.template_tokens:
                raise SafetylockError(f"the gate's template ids ({self.template_ids!r}) are not "
                                      f"{self.template_tokens} token ids; fit the gate again")
            self.template_ids = [int(t) for t in self.template_ids]

    @property
    def design(self) -> str:
        return str(self.about.get("design", "builtin"))

    @property
    def head_dim(self) -> int:
        return int(self.mean.shape[0]) // len(self.layers)

    def scores(self, features: torch.Tensor) -> np.ndarray:
        """Return the gate's score per prompt (> 0: it fires) from (n, layers, heads, head_dim) features."""
        x = read_heads(features, self.layers, self.heads)
        return np.asarray(((x - self.mean) / self.scale) @ self.weight + self.bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Return the score per row of (n, heads * head_dim) features, the read heads' outputs in order (float64)."""
        mean, scale, weight = (torch.from_numpy(a) for a in (self.mean, self.scale, self.weight))
        return ((x.double() - mean) / scale) @ weight + self.bias

    def rounded(self) -> Gate:
        """Return the gate as a file stores it (float32 weights), so a saved and reloaded gate decides the same."""
        f32 = [np.asarray(a, dtype=np.float32).astype(np.float64) for a in (self.mean, self.scale, self.weight)]
        return replace(self, mean=f32[0], scale=f32[1], weight=f32[2], bias=float(np.float32(self.bias)),
                       about=dict(self.about))

    # -- storage ----------------------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        """Return the gate's tensors under the names a lock file uses."""
        return {"cond_layers": torch.tensor(self.layers, dtype=torch.long),
                "cond_heads": torch.tensor(self.heads, dtype=torch.long),
                "cond_mean": torch.from_numpy(self.mean).float(), "cond_scale": torch.from_numpy(self.scale).float(),
                "cond_weight": torch.from_numpy(self.weight).float(),
                "cond_bias": torch.tensor([self.bias], dtype=torch.float32)}

    def condition(self) -> dict[str, Any]:
        """Return the gate's metadata as a lock file stores it (`metadata["condition"]`)."""
        stored = {**self.about, "template_tokens": self.template_tokens, "heads": len(self.layers), "reads": self.reads}
        return stored if self.template_ids is None else {**stored, "template_ids": list(self.template_ids)}

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], condition: dict[str, Any], where: str) -> Gate | None:
        """Return the gate a lock file holds (None if it holds none); refuse half a gate in one line."""
        present = [k for k in GATE_TENSORS if k in tensors]
        if not present:
            return None
        if len(present) != len(GATE_TENSORS):
            raise SafetylockError(f"{where} holds only part of a gate ({', '.join(present)}); extract it again")
        if not isinstance(condition, dict):
            raise SafetylockError(f"{where}: the gate's metadata is not a JSON object; the file is damaged")
        about = {k: v for k, v in condition.items() if k not in _STORED_KEYS}
        return cls(tensors["cond_layers"].tolist(), tensors["cond_heads"].tolist(),
                   tensors["cond_mean"].double().numpy(), tensors["cond_scale"].double().numpy(),
                   tensors["cond_weight"].double().numpy(), float(tensors["cond_bias"].reshape(-1)[0]), about,
                   int(condition.get("template_tokens", 1)), str(condition.get("reads", "model")),
                   condition.get("template_ids"))

    def save(self, path: str | Path, fingerprint: dict[str, Any]) -> Path:
        """Write the gate as safetensors, with the fingerprint of the model it reads, atomically; return the path."""
        meta = {"format": GATE_FORMAT, "format_version": GATE_FORMAT_VERSION, "condition": self.condition(),
                "fingerprint": dict(fingerprint)}
        return write_tagged_safetensors(Path(path), {k: v.contiguous() for k, v in self.tensors().items()}, meta)

    @classmethod
    def load(cls, path: str | Path) -> tuple[Gate, dict[str, Any]]:
        """Return (gate, fingerprint of the model it reads) from a file `save` wrote, or from a lock file's gate."""
        path = Path(path).expanduser()
        try:
            tensors, meta = read_tagged_safetensors(path, GATE_FORMAT, "gate file", "save one with `safetylock gate LOCK --save FILE`",
                                                    GATE_FORMAT_VERSION)
        except SafetylockError:
            from .artifact import Lock

            try:
                lock = Lock.load(path)
            except SafetylockError:
                raise SafetylockError(f"{path} is neither a gate file nor a lock file; save a gate with "
                                      "`safetylock gate LOCK --save FILE` or pass a lock that has one") from None
            if lock.gate is None:
                raise SafetylockError(f"{path} is a lock without a gate; extract it with --gate") from None
            return lock.gate, lock.fingerprint
        fingerprint = meta.get("fingerprint")
        gate = cls.from_stored(tensors, meta.get("condition", {}), str(path))
        if gate is None or not isinstance(fingerprint, dict):
            raise SafetylockError(f"{path} holds no gate or no fingerprint; the file is damaged, save it again")
        return gate, fingerprint
