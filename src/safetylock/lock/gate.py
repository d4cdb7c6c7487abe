"""The harmfulness gate: a probe on the prompt's post-instruction template tokens that decides which
sequences a conditional lock shifts (`fit_condition`, `Lock.applied(..., conditional=True)`, `Lock.flagged`).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..arch import decoder_model, head_geometry, o_proj, unwrap
from ..errors import SafetylockError
from .artifact import Lock, _hash_rows
from .capture import Activations, _run_quietly, _StopForward, head_activations
from .method import fit_heads, rank_heads, split_pairs
from .positions import template_token_count

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
    out = replace(lock, metadata=copy.deepcopy(lock.metadata))
    out.cond_layers = torch.tensor(layers, dtype=torch.long)
    out.cond_heads = torch.tensor(hs, dtype=torch.long)
    out.cond_mean = torch.from_numpy(mu).float()
    out.cond_scale = torch.from_numpy(sd).float()
    out.cond_weight = torch.from_numpy(probe.coef_[0]).float()
    out.cond_bias = torch.tensor([float(probe.intercept_[0])], dtype=torch.float32)
    out.metadata["condition"] = {
        "template_tokens": template_token_count(tokenizer),
        "heads": len(chosen),
        "val_accuracy": round(val_acc, 4),
        "harmful": len(harmful),
        "harmless": len(harmless),
        "prompts_sha256": _hash_rows([[*harmful], [*harmless]]),
        "seed": seed,
    }
    return out


GATE_READS = ("model", "base")


def gate_reads(lock: Lock) -> str:
    """Return what the gate reads: 'model' (the deployed model as it is) or 'base' (its adapter switched off)."""
    reads = str(lock.metadata.get("condition", {}).get("reads", "model"))
    if reads not in GATE_READS:
        raise SafetylockError(f"this lock's gate reads '{reads}'; this version knows {', '.join(GATE_READS)}")
    return reads


@contextlib.contextmanager
def gate_reading(lock: Lock, model: Any) -> Iterator[None]:
    """Inside the block the model computes what the gate should read.

    A gate that reads the base switches a peft adapter off for the decision (the fine-tune's own reply is
    unchanged): a fine-tune moves the features a gate fitted on the base reads. A model without an adapter is
    read as it is (a merged fine-tune cannot be told from its base here: give it a `deployed:` threshold).
    """
    if gate_reads(lock) == "base" and hasattr(model, "disable_adapter") and getattr(model, "peft_config", None):
        with model.disable_adapter():
            yield
    else:
        yield


def gate_logits_on_ids(lock: Lock, model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return the gate's logit per row of a (left-padded) batch of token ids (> 0: the gate fires).

    The batch runs through the model up to the deepest layer the gate reads, as it is (any shift hooks the
    caller installed act, so callers that want the unshifted reading switch them off first); the gate reads
    each row's last template tokens.
    """
    assert lock.cond_layers is not None and lock.cond_heads is not None
    assert lock.cond_mean is not None and lock.cond_scale is not None
    assert lock.cond_weight is not None and lock.cond_bias is not None
    D = head_geometry(unwrap(model).config).head_dim
    n_template = int(lock.metadata.get("condition", {}).get("template_tokens", 1))
    cond_layers = [int(x) for x in lock.cond_layers.tolist()]
    cond_heads = [int(x) for x in lock.cond_heads.tolist()]
    wanted = sorted(set(cond_layers))
    captured: dict[int, torch.Tensor] = {}

    def capture(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            captured[layer] = args[0].detach()
            if layer == wanted[-1]:
                raise _StopForward

        return hook

    handles = [o_proj(model, layer).register_forward_pre_hook(capture(layer)) for layer in wanted]
    try:
        with torch.no_grad(), gate_reading(lock, model):
            _run_quietly(decoder_model(model), ids, mask)
    finally:
        for handle in handles:
            handle.remove()
    feats = []
    for b in range(ids.shape[0]):
        real = torch.nonzero(mask[b], as_tuple=False).flatten()[-n_template:]
        parts = [captured[layer][b, real, head * D : (head + 1) * D].double().mean(0).cpu()
                 for layer, head in zip(cond_layers, cond_heads)]
        feats.append(torch.cat(parts))
    logits = ((torch.stack(feats) - lock.cond_mean.double()) / lock.cond_scale.double()) @ lock.cond_weight.double()
    return logits + float(lock.cond_bias.reshape(-1)[0])


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


def condition_hooks(lock: Lock, model: Any, state: _HookState) -> list[Any]:
    """Return the hook handles that decide, per prompt, whether `state` lets the shift hooks act.

    Each multi-token call is first run unshifted up to the deepest probe layer; the probe reads the
    prompt's last template tokens and sets `state.rows`, which the one-token calls that follow reuse.
    """
    _warn_if_base_unreachable(lock, model)
    def decide(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if state.deciding:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise SafetylockError("conditional locks need input_ids (inputs_embeds are not supported)")
        if ids.shape[1] == 1:
            if state.rows is None or state.rows.shape[0] != ids.shape[0]:
                raise SafetylockError("a one-token call arrived without a prompt to decide on (or with another batch size)")
            return
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            mask = torch.ones_like(ids)
        state.deciding = True  # the shift hooks stand aside while the gate reads the unshifted prompt
        try:
            logits = gate_logits_on_ids(lock, model, ids, mask)
        finally:
            state.deciding = False
        state.rows = (logits > 0).to(ids.device)
        state.last_logits = logits

    # The decoder (not the CausalLM wrapper) is hooked: peft calls the wrapper's forward() directly.
    state.conditional = True
    return [decoder_model(model).register_forward_pre_hook(decide, with_kwargs=True)]


def condition_logits(lock: Lock, model: Any, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Return the harmfulness probe's logit per prompt (> 0: the conditional lock would apply)."""
    if not lock.has_condition:
        raise SafetylockError("this lock has no harmfulness probe; fit one with fit_condition")
    assert lock.cond_layers is not None and lock.cond_heads is not None and lock.cond_weight is not None
    assert lock.cond_mean is not None and lock.cond_scale is not None and lock.cond_bias is not None
    with gate_reading(lock, model):
        acts = head_activations(model, tokenizer, [(p, None) for p in prompts], "template",
                                layers=sorted(set(lock.cond_layers.tolist())))
    feats = _condition_features(acts, len(prompts), lock.cond_layers.tolist(), lock.cond_heads.tolist())
    logits = ((feats - lock.cond_mean.double()) / lock.cond_scale.double()) @ lock.cond_weight.double()
    return logits + float(lock.cond_bias.reshape(-1)[0])
