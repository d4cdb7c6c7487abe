"""Applying a lock: at run time through o_proj forward pre-hooks, or baked into o_proj's bias (and unbaked).

The shift lives in o_proj's *input*, so the baked bias is `W_o @ delta`: the same function of the input,
because o_proj is linear.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..arch import head_geometry, o_proj, o_projs, unwrap
from ..errors import SafetylockError
from .artifact import Lock
from .gate import condition_hooks


class _HookState:
    """Shared by one `applied` block's hooks: which rows to shift, and whether a decision pass is running."""

    def __init__(self) -> None:
        self.deciding = False
        self.conditional = False
        self.rows: torch.Tensor | None = None
        self.last_logits: torch.Tensor | None = None


def _shift_hook(delta: torch.Tensor, positions: str, state: _HookState) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if state.deciding:
            return None
        x = args[0]
        d = delta if delta.dtype == x.dtype else delta.to(x.dtype)
        if state.conditional:
            if state.rows is None or state.rows.shape[0] != x.shape[0]:
                raise SafetylockError("conditional lock: no decision for this batch (call the model on the prompt first)")
            d = d * state.rows.to(device=x.device, dtype=x.dtype)[:, None, None]
        if positions == "generation" and x.shape[1] > 1:
            x = x.clone()
            x[:, -1:, :] += d
        else:
            x = x + d
        return (x, *args[1:])

    return hook


@contextlib.contextmanager
def applied(
    lock: Lock,
    model: Any,
    alpha: float | None = None,
    positions: str = "all",
    conditional: bool = False,
    force: bool = False,
) -> Iterator[Any]:
    """Shift the lock's heads inside the block; yield the model (see `Lock.applied`)."""
    if positions not in ("all", "generation"):
        raise SafetylockError(f"positions must be 'all' or 'generation', got '{positions}'")
    if conditional and not lock.has_condition:
        raise SafetylockError("this lock has no harmfulness probe; fit one with fit_condition (extract --conditional)")
    lock.validate(model, force=force)
    state = _HookState()
    handles: list[Any] = []
    try:
        for layer, delta in lock.deltas(alpha, model).items():
            linear = o_proj(model, layer)
            shift = delta.to(device=linear.weight.device, dtype=linear.weight.dtype)
            handles.append(linear.register_forward_pre_hook(_shift_hook(shift, positions, state)))
        if conditional:
            handles += condition_hooks(lock, model, state)
        yield model
    finally:
        for handle in handles:
            handle.remove()


def bake(lock: Lock, model: Any, alpha: float | None = None, force: bool = False) -> float:
    """Add `W_o @ delta` to each locked layer's o_proj bias in place; return the seconds it took (see `Lock.bake`)."""
    lock.validate(model, force=force)
    start = time.perf_counter()
    geometry = head_geometry(unwrap(model).config)
    deltas = lock.deltas(alpha, geometry=geometry)
    slices = lock.head_slices(geometry.head_dim)
    linears = o_projs(model, list(deltas))
    baked = [layer for layer, linear in linears.items() if hasattr(linear, "_safetylock_original_bias")]
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
    with torch.no_grad():
        for linear, row in zip(linears.values(), stacked):
            new = row.to(linear.weight.dtype, copy=True)  # its own storage, not a view of the stack
            original = linear.bias.detach().clone() if linear.bias is not None else None
            if linear.bias is None:
                linear.bias = nn.Parameter(new, requires_grad=linear.weight.requires_grad)
            else:
                linear.bias.copy_(new)
            object.__setattr__(linear, "_safetylock_original_bias", original)
    return time.perf_counter() - start


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


def unbake(model: Any) -> int:
    """Restore the o_proj biases that `Lock.bake` changed to their exact earlier values; return how many."""
    count = 0
    with torch.no_grad():
        for linear in o_projs(model).values():
            if not hasattr(linear, "_safetylock_original_bias"):
                continue
            original = linear.__dict__.pop("_safetylock_original_bias")
            if original is None:
                linear.bias = None  # type: ignore[assignment]
            else:
                assert linear.bias is not None
                linear.bias.copy_(original)
            count += 1
    return count
