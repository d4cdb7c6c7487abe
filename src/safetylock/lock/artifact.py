"""The lock artifact: chosen heads, their directions and stds, the metadata that says what they fit, and its file.

A lock file is safetensors with the metadata as JSON in the header (`FORMAT`, `FORMAT_VERSION`). Applying a
lock (`Lock.applied`, `Lock.bake`) lives in `apply`, its harmfulness gate in `gate`; the methods here delegate.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from ..arch import HeadGeometry, head_geometry, unwrap
from ..errors import SafetylockError, check_alpha
from ..files import read_tagged_safetensors, sha256_text, write_tagged_safetensors
from .gate_artifact import Gate

FORMAT = "safetylock.lock"
FORMAT_VERSION = 1
# Measured on the 1.5B with a harmful-10 adapter (bench/LOCK_RESEARCH.md): every head at alpha 1.5 restored
# 94% refusals on held-back harmful prompts with 0% on benign-edgy ones, where the top-96 heads at alpha 4
# restored 19% and already garbled benign replies. Many heads, small per-head shifts. Calibrate per lock.
DEFAULT_ALPHA = 1.5
DEFAULT_HEADS = 100_000  # more than any model has: keep every head, ranked
DEFAULT_POSITIONS = "response:1-8"
SHAPE_KEYS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size")
SOFT_KEYS = ("model_type", "vocab_size", "name")

Pair = tuple[str, str, str]  # (prompt, safe reply, unsafe reply)
Item = tuple[str, str | None]  # (prompt, teacher-forced reply or None for the open prompt)


def _library_version() -> str:
    from .. import __version__

    return __version__


def _hash_rows(rows: Sequence[Sequence[str | None]]) -> str:
    return sha256_text(*("\x1f".join(str(v) for v in row) for row in rows))


@dataclass
class Lock:
    """Chosen heads, their unit directions and projection stds, plus the metadata that says what they fit.

    Optional: the full layer x head validation-accuracy map (`accuracy`), and a harmfulness gate for
    conditional application (`gate`, its own object: swap it with `with_gate`).
    """

    layers: torch.Tensor  # (K,) int64
    heads: torch.Tensor  # (K,) int64
    directions: torch.Tensor  # (K, head_dim) float32, unit norm
    stds: torch.Tensor  # (K,) float32
    scores: torch.Tensor  # (K,) validation accuracy of each head's probe
    metadata: dict[str, Any] = field(default_factory=dict)
    midpoints: torch.Tensor | None = None  # (K,) projection threshold on the base, for transfer checks
    accuracy: torch.Tensor | None = None  # (L, H)
    separation: torch.Tensor | None = None  # (L, H)
    gate: Gate | None = None  # the harmfulness gate of a conditional lock (`gate_artifact`)

    # -- metadata -------------------------------------------------------------------------------------

    @property
    def default_alpha(self) -> float:
        return check_alpha(self.metadata.get("default_alpha", DEFAULT_ALPHA), "the lock's default_alpha")

    @default_alpha.setter
    def default_alpha(self, value: float) -> None:
        self.metadata["default_alpha"] = check_alpha(value, "alpha")

    def with_alpha(self, alpha: float) -> Lock:
        """Return a copy whose default alpha is `alpha` (tensors shared, metadata copied)."""
        other = replace(self, metadata=copy.deepcopy(self.metadata))
        other.default_alpha = alpha
        return other

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self.metadata.get("fingerprint") or {})

    @property
    def has_condition(self) -> bool:
        return self.gate is not None

    def with_gate(self, gate: Gate | None) -> Lock:
        """Return a copy whose gate is `gate` (None: no gate); directions, stds and alpha are shared unchanged.

        The gate is stored as a file stores it (float32), so the lock decides the same before and after a save.
        """
        if gate is not None:
            head_dim = self.fingerprint.get("head_dim")
            if head_dim is not None and gate.head_dim != int(head_dim):
                raise SafetylockError(f"the gate reads heads {gate.head_dim} wide but this lock's model has head_dim "
                                      f"{head_dim}; fit a gate on this lock's base")
            gate = gate.rounded()
        return replace(self, metadata=copy.deepcopy(self.metadata), gate=gate)

    def __len__(self) -> int:
        return int(self.layers.numel())

    # -- choosing heads ---------------------------------------------------------------------------------

    # Tensor fields that are not one row per chosen head: the full layer x head maps (their first dimension is
    # the layer count, which can equal K by chance); the gate is not a tensor. Every other tensor field is
    # per-head, so `select` slices a new one without being told, and refuses one whose rows do not match.
    _WHOLE_LOCK = ("accuracy", "separation")

    def select(self, keep: torch.Tensor | Sequence[int]) -> Lock:
        """Return a new lock of only the heads `keep` names: indices (in that order) or a boolean mask."""
        k = len(self)
        index = torch.as_tensor(keep)
        if index.dim() != 1 or index.numel() == 0:
            raise SafetylockError(f"select needs a non-empty 1-D index list or mask, not shape {tuple(index.shape)}")
        if index.dtype == torch.bool:
            if index.numel() != k:
                raise SafetylockError(f"a head mask needs one entry per head of the lock ({k}), got {index.numel()}")
            index = index.nonzero().flatten()
            if index.numel() == 0:
                raise SafetylockError("the head mask keeps no head; a lock needs at least one")
        elif index.is_floating_point() or index.is_complex():
            raise SafetylockError(f"head indices must be integers, got {str(index.dtype).removeprefix('torch.')}")
        index = index.long()
        if bool(((index < -k) | (index >= k)).any()):
            raise SafetylockError(f"head index out of range for a lock of {k} heads: {index.tolist()}")
        index = torch.where(index < 0, index + k, index)
        if len(set(index.tolist())) != len(index):
            raise SafetylockError(f"head indices repeat ({index.tolist()}); a head's shift would be added twice")
        chosen: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, torch.Tensor) or f.name in self._WHOLE_LOCK:
                chosen[f.name] = copy.deepcopy(value)
            elif value.dim() >= 1 and value.shape[0] == k:
                chosen[f.name] = value[index.to(value.device)]
            else:
                raise SafetylockError(
                    f"lock field '{f.name}' has shape {tuple(value.shape)}, not one row per head ({k}); "
                    "list it in Lock._WHOLE_LOCK if it describes the whole lock"
                )
        return replace(self, **chosen)

    # -- files ----------------------------------------------------------------------------------------

    _TENSORS = ("layers", "heads", "directions", "stds", "scores", "midpoints", "accuracy", "separation")

    def save(self, path: str | Path) -> Path:
        """Write the lock as safetensors with its metadata as JSON in the header, atomically; return the path."""
        path = Path(path)
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in self._TENSORS
                   if getattr(self, name) is not None}
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **self.metadata}
        if self.gate is not None:
            tensors.update(self.gate.tensors())
            meta["condition"] = self.gate.condition()
        return write_tagged_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> Lock:
        """Read a lock file written by `save`; refuse anything else with a one-line reason."""
        path = Path(path).expanduser()
        tensors, meta = read_tagged_safetensors(path, FORMAT, "lock file", "run `safetylock extract` to make one",
                                                FORMAT_VERSION)
        missing = [k for k in ("layers", "heads", "directions", "stds", "scores") if k not in tensors]
        if missing:
            raise SafetylockError(f"{path} lacks tensor(s) {', '.join(missing)}; the file is damaged, extract it again")
        if not isinstance(meta.get("fingerprint", {}), dict):
            raise SafetylockError(f"{path}: its metadata's fingerprint is not a JSON object; the file is damaged, extract it again")
        gate = Gate.from_stored(tensors, meta.pop("condition", {}), str(path))
        lock = cls(metadata=meta, gate=gate, **{k: v for k, v in tensors.items() if k in cls._TENSORS})
        lock._check_consistent(str(path))
        check_alpha(meta.get("default_alpha", DEFAULT_ALPHA), f"{path}: default_alpha")
        return lock

    def _check_consistent(self, where: str = "lock") -> None:
        k = len(self)
        if self.directions.dim() != 2 or self.directions.shape[0] != k:
            raise SafetylockError(f"{where}: directions have shape {tuple(self.directions.shape)}, expected ({k}, head_dim)")
        for name in ("heads", "stds", "scores"):
            if getattr(self, name).shape != (k,):
                raise SafetylockError(f"{where}: '{name}' has shape {tuple(getattr(self, name).shape)}, expected ({k},)")
        if not torch.isfinite(self.directions).all() or not torch.isfinite(self.stds).all():
            raise SafetylockError(f"{where}: directions or stds hold NaN/inf; extract the lock again")
        fp = self.fingerprint
        if fp.get("head_dim") is not None and self.directions.shape[1] != fp["head_dim"]:
            raise SafetylockError(f"{where}: directions are {self.directions.shape[1]} wide but the fingerprint says head_dim {fp['head_dim']}")

    # -- fitting a model --------------------------------------------------------------------------------

    def validate(self, model: Any, force: bool = False) -> None:
        """Raise unless the lock fits `model`: shapes must match; vocab/model_type may differ with force.

        Descent is judged by the weights when the lock carries a sketch of its base's (any name is then
        fine, and a model whose weights are far from the base's is refused), by the name otherwise.
        """
        from ..models import SKETCH_THRESHOLD, fingerprint, sketch_distance, weight_sketch

        recorded = self.fingerprint
        if not recorded:
            raise SafetylockError("the lock records no model fingerprint; extract it again")
        current = fingerprint(model)
        hard = [f"{k} {recorded[k]} (lock) vs {current.get(k)} (model)" for k in SHAPE_KEYS
                if k in recorded and recorded[k] != current.get(k)]
        if hard:
            raise SafetylockError(
                f"the lock was extracted from a model of another shape: {'; '.join(hard)}; it cannot be applied (not even with --force)"
            )
        soft = {k: f"{k} '{recorded[k]}' (lock) vs '{current.get(k)}' (model)" for k in SOFT_KEYS
                if k in recorded and recorded[k] != current.get(k)}
        if not force:
            descent = None
            if not set(soft) - {"name"} and "sketch" in recorded:
                descent = sketch_distance(recorded["sketch"], weight_sketch(model))
            if descent is not None:
                soft.pop("name", None)
            if soft:
                raise SafetylockError(
                    f"the lock was extracted from another model: {'; '.join(soft.values())}; pass force=True (--force) if this model descends from the lock's base"
                )
            if descent is not None and descent[0] > SKETCH_THRESHOLD:
                raise SafetylockError(
                    f"the model's weights are far from those of the lock's base '{recorded.get('name')}': relative distance "
                    f"{descent[0]:.3g} (median of {descent[1]} matrices) > {SKETCH_THRESHOLD:g}, so it does not descend from "
                    "it; extract a lock from this model's own aligned base (force=True / --force applies it anyway)"
                )
        geometry = head_geometry(unwrap(model).config)
        if int(self.layers.max()) >= geometry.num_layers or int(self.heads.max()) >= geometry.num_heads:
            raise SafetylockError("the lock names a layer or head the model does not have")

    def deltas(self, alpha: float | None = None, model: Any = None,
               geometry: HeadGeometry | None = None) -> dict[int, torch.Tensor]:
        """Return {layer: shift of o_proj's input} (float32, CPU, width num_heads * head_dim) at strength alpha."""
        a = self.default_alpha if alpha is None else check_alpha(alpha, "alpha")
        if geometry is None and model is not None:
            geometry = head_geometry(unwrap(model).config)
        elif geometry is None:
            geometry = HeadGeometry.from_facts(self.fingerprint)
        layers = sorted({int(layer) for layer in self.layers.tolist()})
        slot = {layer: i for i, layer in enumerate(layers)}
        rows = torch.tensor([slot[int(layer)] for layer in self.layers.tolist()], dtype=torch.long)
        rows = rows * geometry.num_heads + self.heads.long()
        scaled = self.directions.float() * (a * self.stds.float())[:, None]
        flat = torch.zeros(len(layers) * geometry.num_heads, geometry.head_dim).index_add_(0, rows, scaled)
        return dict(zip(layers, flat.view(len(layers), geometry.width).unbind(0)))

    def head_slices(self, head_dim: int) -> dict[int, list[slice]]:
        """Return {layer: o_proj input columns of its locked heads}, adjacent heads merged into one slice."""
        out: dict[int, list[slice]] = {}
        for layer, head in sorted(set(zip(self.layers.tolist(), self.heads.tolist()))):
            cols, start = out.setdefault(int(layer), []), int(head) * head_dim
            if cols and cols[-1].stop == start:
                cols[-1] = slice(cols[-1].start, start + head_dim)
            else:
                cols.append(slice(start, start + head_dim))
        return out

    # -- runtime application -----------------------------------------------------------------------------

    def applied(
        self,
        model: Any,
        alpha: float | None = None,
        shift_at: str = "all",
        conditional: bool = False,
        force: bool = False,
    ) -> contextlib.AbstractContextManager[Any]:
        """Shift the lock's heads inside the block through o_proj forward pre-hooks; yield the model.

        shift_at="all" shifts every token. shift_at="generation" shifts only positions whose output
        predicts a generated token: the last position of a multi-token (prefill) call, and every position
        of a one-token (cached decoding) call. The prefill rule assumes left padding, as `generate` uses.
        conditional=True reads the lock's gate at each prompt's (multi-token call's) template tokens, unshifted,
        and shifts only the flagged rows, for that call and the one-token calls that follow it. The gate decides
        inside the prompt's own pass (`gate.condition_hooks`): a prompt nothing flags costs one pass.
        Hooks are removed on exit, so the model afterwards computes exactly what it did before.
        """
        from .apply import applied

        return applied(self, model, alpha, shift_at, conditional, force)

    def condition_logits(self, model: Any, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
        """Return the harmfulness probe's logit per prompt (> 0: the conditional lock would apply)."""
        from .gate import condition_logits

        return condition_logits(self, model, tokenizer, prompts)

    def flagged(self, model: Any, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
        """Return, per prompt, whether the harmfulness probe flags it (True: the conditional lock applies)."""
        return self.condition_logits(model, tokenizer, prompts) > 0

    # -- baking ---------------------------------------------------------------------------------------

    def bake(self, model: Any, alpha: float | None = None, force: bool = False) -> float:
        """Add `W_o @ delta` to each locked layer's o_proj bias in place; return the seconds it took.

        Every new bias is computed and checked for NaN/inf before any is written. A missing bias becomes a
        zero Parameter of the weight's dtype and device. With an unmerged LoRA adapter the bias goes into
        the adapter's base layer, matching the runtime hooks (the shift passes through the base weights).
        `apply.bake` returns the whole `BakeRecord` (what was written, and the values it replaced).
        """
        from .apply import bake

        return bake(self, model, alpha, force).seconds

    def unbake(self, model: Any) -> None:
        """Restore every o_proj bias a bake changed, exactly (see `unbake`; a `BakeRecord` works too)."""
        from .apply import unbake

        unbake(model)
