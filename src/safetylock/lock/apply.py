"""Applying a lock: at run time through o_proj forward pre-hooks, or baked into o_proj's bias (and unbaked).

The shift lives in o_proj's *input*, so the baked bias is `W_o @ delta`: the same function of the input,
because o_proj is linear. Both ways return a record of exactly what they changed (`HookRecord`, `BakeRecord`,
as peft records the adapters it merged): taking the lock off again reads the record, nothing else.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..arch import head_geometry, o_proj, o_projs, unwrap
from ..errors import SafetylockError, check_alpha
from .artifact import Lock
from .gate import condition_hooks

_MARK = "_safetylock_bake"  # set on each o_proj a bake wrote: the `BakeRecord` that restores it


class _HookState:
    """Shared by one `applied` block's hooks: which rows to shift, and whether a decision pass is running."""

    def __init__(self) -> None:
        self.deciding = False
        self.conditional = False
        self.rows: torch.Tensor | None = None
        self.last_logits: torch.Tensor | None = None
        self.reading: Any = None  # the gate's reading of the prompt pass now running (`gate._Reading`)
        self.any_flagged = False

    def decide(self, logits: torch.Tensor, device: torch.device) -> None:
        """Record the gate's logits (CPU) for a batch: the rows it flags are the ones the shift hooks shift."""
        flagged = logits > 0
        self.rows, self.last_logits, self.any_flagged = flagged.to(device), logits, bool(flagged.any())


def _shift_hook(delta: torch.Tensor, shift_at: str, state: _HookState) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if state.deciding:
            return None
        x = args[0]
        d = delta if delta.dtype == x.dtype else delta.to(x.dtype)
        if state.conditional:
            if state.rows is None or state.rows.shape[0] != x.shape[0]:
                raise SafetylockError("conditional lock: no decision for this batch (call the model on the prompt first)")
            if not state.any_flagged:
                return None  # a zero shift: the same as none, without the work
            d = d * state.rows.to(device=x.device, dtype=x.dtype)[:, None, None]
        if shift_at == "generation" and x.shape[1] > 1:
            x = x.clone()
            x[:, -1:, :] += d
        else:
            x = x + d
        return (x, *args[1:])

    return hook


@dataclass
class HookRecord:
    """The forward pre-hooks a run-time lock installed: their handles, the layers they shift, the strength."""

    handles: list[Any]
    layers: tuple[int, ...]
    alpha: float
    conditional: bool

    def intact(self) -> bool:
        """Return whether every hook is still registered on its module."""
        return bool(self.handles) and all(_registered(handle) for handle in self.handles)

    def remove(self) -> int:
        """Remove the hooks (again: a no-op); return how many were still registered."""
        count = sum(_registered(handle) for handle in self.handles)
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return count

    undo = remove


def _registered(handle: Any) -> bool:
    if hasattr(handle, "registered"):  # the gate's wrapped forward (`gate._ForwardWrap`)
        return bool(handle.registered())
    hooks = handle.hooks_dict_ref()
    return hooks is not None and handle.id in hooks


def install(
    lock: Lock,
    model: Any,
    alpha: float | None = None,
    shift_at: str = "all",
    conditional: bool = False,
    force: bool = False,
) -> HookRecord:
    """Hook the lock's shift into `model` until the returned record's `remove()` (see `Lock.applied`)."""
    if shift_at not in ("all", "generation"):
        raise SafetylockError(f"shift_at must be 'all' or 'generation', got '{shift_at}'")
    if conditional and not lock.has_condition:
        raise SafetylockError("this lock has no harmfulness gate; fit one with fit_condition (extract --gate)")
    lock.validate(model, force=force)
    a = lock.default_alpha if alpha is None else check_alpha(alpha, "alpha")
    state = _HookState()
    record = HookRecord([], (), a, conditional)
    try:
        deltas = lock.deltas(a, model)
        for layer, delta in deltas.items():
            linear = o_proj(model, layer)
            shift = delta.to(device=linear.weight.device, dtype=linear.weight.dtype)
            record.handles.append(linear.register_forward_pre_hook(_shift_hook(shift, shift_at, state)))
        if conditional:
            record.handles += condition_hooks(lock, model, state)
    except BaseException:
        record.remove()
        raise
    record.layers = tuple(deltas)
    return record


@contextlib.contextmanager
def applied(
    lock: Lock,
    model: Any,
    alpha: float | None = None,
    shift_at: str = "all",
    conditional: bool = False,
    force: bool = False,
) -> Iterator[Any]:
    """Shift the lock's heads inside the block; yield the model (see `Lock.applied`)."""
    record = install(lock, model, alpha, shift_at, conditional, force)
    try:
        yield model
    finally:
        record.remove()


@dataclass
class BakedBias:
    """One o_proj a bake wrote: the module, its bias before (None: it had none) and the value written."""

    layer: int
    linear: nn.Linear
    original: torch.Tensor | None
    baked: torch.Tensor


@dataclass
class BakeRecord:
    """What one `bake` changed, exactly: per locked layer the o_proj bias it wrote, with the value it replaced.

    `unbake()` restores every one of them bit for bit (a bias that was missing is removed again); `intact()`
    says whether each still holds the value the bake wrote.
    """

    entries: list[BakedBias]
    alpha: float
    seconds: float
    undone: bool = field(default=False)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(entry.layer for entry in self.entries)

    def intact(self) -> bool:
        """Return whether every baked bias is still in place and holds the value the bake wrote."""
        if self.undone:
            return False
        for entry in self.entries:
            bias = entry.linear.bias
            if bias is None or getattr(entry.linear, _MARK, None) is not self or not torch.equal(bias.detach(), entry.baked):
                return False
        return True

    def unbake(self) -> int:
        """Restore every bias this bake wrote to its exact earlier value (once); return how many."""
        if self.undone:
            return 0
        with torch.no_grad():
            for entry in self.entries:
                linear = entry.linear
                if entry.original is None:
                    linear.bias = None  # type: ignore[assignment]
                else:
                    assert linear.bias is not None
                    linear.bias.copy_(entry.original)
                if getattr(linear, _MARK, None) is self:
                    del linear.__dict__[_MARK]
        self.undone = True
        return len(self.entries)

    undo = unbake


def bake(lock: Lock, model: Any, alpha: float | None = None, force: bool = False) -> BakeRecord:
    """Add `W_o @ delta` to each locked layer's o_proj bias in place; return the record of what it wrote.

    `Lock.bake` returns the record's `seconds`; `unbake(record)` (or `record.unbake()`) restores the biases.
    """
    lock.validate(model, force=force)
    a = lock.default_alpha if alpha is None else check_alpha(alpha, "alpha")
    start = time.perf_counter()
    geometry = head_geometry(unwrap(model).config)
    deltas = lock.deltas(a, geometry=geometry)
    slices = lock.head_slices(geometry.head_dim)
    linears = o_projs(model, list(deltas))
    baked = [layer for layer, linear in linears.items() if hasattr(linear, _MARK)]
    if baked:
        raise SafetylockError(f"a lock is already baked into layer {baked[0]}; unbake it first")
    news = []
    for layer, delta in deltas.items():
        linear = linears[layer]
        add = _project(linear.weight.detach(), delta, slices[layer])
        news.append(add if linear.bias is None else add + linear.bias.detach().float())
    stacked = torch.stack(news)
    if not torch.isfinite(stacked).all():
        bad = [layer for layer, row in zip(deltas, stacked) if not torch.isfinite(row).all()]
        raise SafetylockError(f"baking would put NaN/inf into layer {bad[0]}'s o_proj bias; nothing was changed")
    record = BakeRecord([], a, 0.0)
    with torch.no_grad():
        for (layer, linear), row in zip(linears.items(), stacked):
            new = row.to(linear.weight.dtype, copy=True)  # its own storage, not a view of the stack
            original = linear.bias.detach().clone() if linear.bias is not None else None
            if linear.bias is None:
                linear.bias = nn.Parameter(new, requires_grad=linear.weight.requires_grad)
            else:
                linear.bias.copy_(new)
            record.entries.append(BakedBias(layer, linear, original, linear.bias.detach().clone()))
            object.__setattr__(linear, _MARK, record)
    record.seconds = time.perf_counter() - start
    return record


def _project(weight: torch.Tensor, delta: torch.Tensor, slices: Sequence[slice]) -> torch.Tensor:
    """Return `weight @ delta` (float32) reading only the weight columns of `slices`, where delta is nonzero.

    A lock on every head of the layer multiplies the whole matrix in its own dtype (no float32 copy: the
    bake is bound by reading the weights); a few heads' columns are copied to float32 and multiplied there
    (measured on the 1.5B's shapes: a strided bf16 product is ~1.4x slower than the copy). float32
    weights give the exact full product.
    """
    delta = delta.to(weight.device)
    if len(slices) == 1 and slices[0] == slice(0, weight.shape[1]):
        return (weight @ delta.to(weight.dtype)).float()
    out = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
    for cols in slices:
        out += weight[:, cols].float() @ delta[cols]
    return out


def unbake(baked: BakeRecord | Any) -> int:
    """Restore the o_proj biases a bake changed to their exact earlier values; return how many.

    Given a `BakeRecord`, exactly what that bake wrote; given a model, what every bake still in it wrote
    (each o_proj a bake wrote carries its record).
    """
    if isinstance(baked, BakeRecord):
        return baked.unbake()
    records: dict[int, BakeRecord] = {}
    for linear in o_projs(baked).values():
        record = getattr(linear, _MARK, None)
        if isinstance(record, BakeRecord):
            records.setdefault(id(record), record)
    return sum(record.unbake() for record in records.values())
