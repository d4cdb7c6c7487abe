"""The harmfulness gate at work: fitting the built-in probe (`fit_condition`), reading it on a prompt, and the
hooks that let a conditional lock shift only the sequences it flags (`Lock.applied(..., conditional=True)`).

The gate itself, its weights and what it was fitted on, is a `Gate` (`gate_artifact`). At run time it decides
inside the prompt's own forward pass when it reads the deployed model: its layers are read on the way, and the
pass goes on unshifted (nothing flagged), shifted from there on (every shifted layer lies deeper), or is cut
short and run again shifted. Only a gate that reads the base under a peft adapter needs a pass of its own.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..arch import decoder_model, has_adapter, head_geometry, o_proj, unwrap
from ..errors import SafetylockError
from .artifact import Lock, _hash_rows
from .capture import Activations, StopForward, head_activations, run_until_stopped
from .gate_artifact import GATE_READS, Gate
from .method import fit_heads, rank_heads, split_pairs
from .positions import template_positions, template_token_count, template_token_ids

if TYPE_CHECKING:
    from .apply import _HookState


def _prompt_split(acts: Activations, n_pos: int, n_neg: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return sample labels (1 = first group) and train/val masks split by prompt, stratified by group."""
    owner = acts.owner.numpy()
    labels = (owner < n_pos).astype(int)
    tr_p, va_p = split_pairs(n_pos, val_fraction, seed)
    tr_n, va_n = split_pairs(n_neg, val_fraction, seed + 1)
    train_items = np.concatenate([tr_p, n_pos + tr_n])
    val_items = np.concatenate([va_p, n_pos + va_n])
    return labels, np.isin(owner, train_items), np.isin(owner, val_items)


def _condition_features(acts: Activations, n_items: int, layers: Sequence[int], heads: Sequence[int]) -> torch.Tensor:
    """Return (items, M * head_dim): each chosen head's output averaged over an item's template positions."""
    col = {layer: i for i, layer in enumerate(acts.layers)}
    parts = []
    for layer, head in zip(layers, heads):
        per_sample = acts.values[:, col[int(layer)], int(head), :].double()
        sums = torch.zeros(n_items, per_sample.shape[1], dtype=torch.float64).index_add_(0, acts.owner, per_sample)
        counts = torch.bincount(acts.owner, minlength=n_items).clamp(min=1).double()[:, None]
        parts.append(sums / counts)
    return torch.cat(parts, dim=1)


def fit_condition(
    lock: Lock,
    model: Any,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    heads: int = 8,
    seed: int = 0,
    val_fraction: float = 0.25,
    batch_size: int = 8,
    progress: bool = False,
) -> Lock:
    """Return a copy of `lock` with a harmfulness probe on the prompt's post-instruction template tokens.

    Heads are ranked by single-head probe accuracy on held-out prompts; one logistic probe is then fitted on
    the chosen heads' standardised outputs (averaged over the template tokens). `applied(conditional=True)`
    shifts a sequence only when this probe calls its prompt harmful.
    """
    from sklearn.linear_model import LogisticRegression

    if len(harmful) < 2 or len(harmless) < 2:
        raise SafetylockError("the harmfulness probe needs at least 2 harmful and 2 harmless prompts")
    prompts = [*harmful, *harmless]
    acts = head_activations(model, tokenizer, [(p, None) for p in prompts], "template",
                            batch_size=batch_size, progress=progress)
    n = len(prompts)
    # One sample per prompt: the head output averaged over the template tokens, as at run time.
    sums = torch.zeros((n, *acts.values.shape[1:]), dtype=torch.float64).index_add_(0, acts.owner, acts.values.double())
    counts = torch.bincount(acts.owner, minlength=n).clamp(min=1).double().view(n, 1, 1, 1)
    per_prompt = Activations((sums / counts).float(), torch.arange(n), acts.layers, "template")
    labels, train, val = _prompt_split(per_prompt, len(harmful), len(harmless), val_fraction, seed)
    fit = fit_heads(per_prompt.values, labels, train, val, seed=seed, progress=progress)
    chosen = rank_heads(fit.accuracy, fit.separation, heads)
    layers = [acts.layers[l] for l, _ in chosen]
    hs = [h for _, h in chosen]
    x = _condition_features(per_prompt, n, layers, hs).numpy()
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    probe = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    probe.fit((x[train] - mu) / sd, labels[train])
    val_acc = float((probe.predict((x[val] - mu) / sd) == labels[val]).mean())
    gate = Gate(layers, hs, mu, sd, probe.coef_[0], float(probe.intercept_[0]),
                {"val_accuracy": round(val_acc, 4), "harmful": len(harmful), "harmless": len(harmless),
                 "prompts_sha256": _hash_rows([[*harmful], [*harmless]]), "seed": seed},
                template_tokens=template_token_count(tokenizer), template_ids=template_token_ids(tokenizer))
    return lock.with_gate(gate)


def with_gate_file(lock: Lock, path: str | Path) -> Lock:
    """Return a copy of `lock` with the gate saved at `path` (a gate file, or a lock that has one), refused in one
    line unless it was fitted on the lock's own base (same model name and shape); the directions are untouched."""
    from .artifact import SHAPE_KEYS

    gate, fitted_on = Gate.load(path)
    mine = lock.fingerprint
    differ = [f"{k} {fitted_on.get(k)} (gate) vs {mine.get(k)} (lock)" for k in ("name", *SHAPE_KEYS)
              if k in fitted_on and k in mine and fitted_on[k] != mine[k]]
    if differ:
        raise SafetylockError(f"the gate at {path} was fitted on another model: {'; '.join(differ)}; fit a gate on "
                              "this lock's base (`safetylock extract --gate DESIGN`)")
    layers, heads = mine.get("num_hidden_layers"), mine.get("num_attention_heads")
    if (layers is not None and max(gate.layers) >= int(layers)) or (heads is not None and max(gate.heads) >= int(heads)):
        raise SafetylockError(f"the gate at {path} reads a layer or head this lock's model does not have")
    return lock.with_gate(gate)


def gate_reads(lock: Lock) -> str:
    """Return what the gate reads: 'model' (the deployed model as it is) or 'base' (its adapter switched off)."""
    return lock.gate.reads if lock.gate is not None else "model"


@contextlib.contextmanager
def gate_reading(lock: Lock, model: Any) -> Iterator[None]:
    """Inside the block the model computes what the gate should read.

    A gate that reads the base switches a peft adapter off for the decision (the fine-tune's own reply is
    unchanged): a fine-tune moves the features a gate fitted on the base reads. A model without an adapter is
    read as it is (a merged fine-tune cannot be told from its base here: give it a `deployed:` threshold).
    """
    if gate_reads(lock) == "base" and has_adapter(model):
        with model.disable_adapter():
            yield
    else:
        yield


def _installed(lock: Lock) -> Gate:
    if lock.gate is None:
        raise SafetylockError("this lock has no harmfulness gate; fit one with fit_condition (extract --gate)")
    return lock.gate


def _read_gate(gate: Gate, captured: dict[int, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return the gate's logit per row from each read layer's o_proj input at the rows' template tokens."""
    D = gate.head_dim
    feats = []
    for b in range(mask.shape[0]):
        real = template_positions(ids[b], mask[b], gate.template_tokens, gate.template_ids)
        parts = [captured[layer][b, real, head * D : (head + 1) * D].double().mean(0).cpu()
                 for layer, head in zip(gate.layers, gate.heads)]
        feats.append(torch.cat(parts))
    return gate.logits(torch.stack(feats))


def _ids_and_mask(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        raise SafetylockError("conditional locks need input_ids (inputs_embeds are not supported)")
    mask = kwargs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        mask = torch.ones_like(ids)
    return ids, mask


def gate_logits_on_ids(lock: Lock, model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return the gate's logit per row of a (left-padded) batch of token ids (> 0: the gate fires).

    The batch runs through the model (as the gate reads it: `gate_reading`) up to the deepest layer the gate
    reads, as it is (any shift hooks the caller installed act, so callers that want the unshifted reading
    switch them off first); the gate reads each row's template tokens (`template_positions`).
    """
    gate = _installed(lock)
    wanted = sorted(set(gate.layers))
    captured: dict[int, torch.Tensor] = {}

    def capture(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            captured[layer] = args[0].detach()
            if layer == wanted[-1]:
                raise StopForward

        return hook

    handles = [o_proj(model, layer).register_forward_pre_hook(capture(layer)) for layer in wanted]
    try:
        with torch.no_grad(), gate_reading(lock, model):
            run_until_stopped(decoder_model(model), ids, mask)
    finally:
        for handle in handles:
            handle.remove()
    return _read_gate(gate, captured, ids, mask)


def _warn_if_base_unreachable(lock: Lock, model: Any) -> None:
    """Warn when a gate that reads the base meets a model whose weights moved but that has no adapter to
    switch off (a merged or full fine-tune): the gate then reads the fine-tune, where it was not fitted."""
    if gate_reads(lock) != "base" or getattr(model, "peft_config", None):
        return
    from ..models import sketch_distance, weight_sketch

    recorded = lock.fingerprint.get("sketch")
    found = sketch_distance(recorded, weight_sketch(model)) if recorded else None
    if found is not None and found[0] > 1e-6:
        warnings.warn("this lock's gate reads the base, but the model has no LoRA adapter to switch off and its "
                      "weights differ from the base's: the gate reads the fine-tune itself, where it may not fire "
                      "(docs/ood.md); serve the fine-tune as an unmerged adapter", stacklevel=3)


class _RunAgainShifted(Exception):
    """Raised at the gate's deepest layer when it flags a row and a shifted layer has already run unshifted."""


class _Reading:
    """One prompt pass the gate decides inside: the batch's mask and the o_proj inputs read so far."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.ids, self.mask = ids, mask
        self.captured: dict[int, torch.Tensor] = {}


def _cache_marks(cache: Any) -> dict[int, int] | None:
    """Return each cache layer's length, to rewind a pass cut short; None for a cache this cannot rewind."""
    if cache is None:
        return {}  # the decoder makes its own cache for this call: nothing of a cut pass survives it
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or any(type(layer) is not DynamicLayer for layer in layers):
        return None  # sliding-window, quantised or static layers: the two-pass path is exact for them
    return {i: layer.get_seq_length() for i, layer in enumerate(layers)}


def _rewind(cache: Any, marks: dict[int, int]) -> None:
    """Cut every cache layer back to its length in `marks` (0 for a layer the cut pass created)."""
    if cache is None:
        return
    for i, layer in enumerate(cache.layers):
        keep = marks.get(i, 0)
        if layer.is_initialized and layer.keys.shape[-2] > keep:
            layer.keys = layer.keys[..., :keep, :]
            layer.values = layer.values[..., :keep, :]


class _ForwardWrap:
    """The decoder's forward, wrapped for the gate; `remove()` puts back what was there (an instance-level
    forward another library set, such as accelerate's, or the class's own)."""

    def __init__(self, module: nn.Module, wrap: Any) -> None:
        self.module = module
        self.previous = module.__dict__.get("forward")
        self.wrapped = wrap(module.forward)
        setattr(module, "forward", self.wrapped)

    def registered(self) -> bool:
        return self.module.__dict__.get("forward") is self.wrapped

    def remove(self) -> None:
        if not self.registered():
            return
        if self.previous is None:
            delattr(self.module, "forward")
        else:
            setattr(self.module, "forward", self.previous)


def condition_hooks(lock: Lock, model: Any, state: _HookState) -> list[Any]:
    """Return the handles that decide, per prompt, whether `state` lets the shift hooks act.

    Each multi-token call is decided on its prompt's template tokens, read unshifted; the decision sets
    `state.rows`, which the one-token calls that follow reuse. A gate that reads the deployed model decides
    inside the call's own pass (the module docstring says how); one that reads the base under a peft
    adapter, or a cache that cannot be rewound, takes a decision pass of its own up to the deepest gate layer.
    """
    _warn_if_base_unreachable(lock, model)
    gate = _installed(lock)
    deepest = max(gate.layers)
    shift_later = int(lock.layers.min()) > deepest  # every shifted layer runs after the decision
    one_pass = gate.reads == "model" or not has_adapter(model)

    def read(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            reading = state.reading
            if reading is None:
                return
            reading.captured[layer] = args[0].detach()
            if layer != deepest:
                return
            state.reading = None
            logits = _read_gate(gate, reading.captured, reading.ids, reading.mask)
            state.decide(logits, args[0].device)
            if state.any_flagged:
                if not shift_later:
                    raise _RunAgainShifted
                state.deciding = False  # the shift hooks of the deeper layers act in this very pass

        return hook

    def wrap(forward: Any) -> Any:
        def decided(*args: Any, **kwargs: Any) -> Any:
            if state.deciding:
                return forward(*args, **kwargs)
            ids, mask = _ids_and_mask(args, kwargs)
            if ids.shape[1] == 1:
                if state.rows is None or state.rows.shape[0] != ids.shape[0]:
                    raise SafetylockError("a one-token call arrived without a prompt to decide on (or with another batch size)")
                return forward(*args, **kwargs)
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            marks = _cache_marks(cache) if one_pass else None
            state.deciding = True  # the shift hooks stand aside while the gate reads the unshifted prompt
            try:
                if marks is None:
                    logits = gate_logits_on_ids(lock, model, ids, mask)
                    state.decide(logits, ids.device)
                else:
                    state.reading = _Reading(ids, mask)
                    try:
                        return forward(*args, **kwargs)
                    except _RunAgainShifted:
                        _rewind(cache, marks)
            finally:
                state.deciding, state.reading = False, None
            return forward(*args, **kwargs)

        return decided

    state.conditional = True
    reads = [o_proj(model, layer).register_forward_pre_hook(read(layer)) for layer in sorted(set(gate.layers))]
    # The decoder (not the CausalLM wrapper) is wrapped: peft calls the wrapper's forward() directly.
    return [*reads, _ForwardWrap(decoder_model(model), wrap)]


def condition_logits(lock: Lock, model: Any, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Return the harmfulness probe's logit per prompt (> 0: the conditional lock would apply)."""
    gate = _installed(lock)
    with gate_reading(lock, model):
        acts = head_activations(model, tokenizer, [(p, None) for p in prompts], "template",
                                layers=sorted(set(gate.layers)))
    return gate.logits(_condition_features(acts, len(prompts), gate.layers, gate.heads))
