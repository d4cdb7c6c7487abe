"""Harmfulness gates fitted on prompt features: which heads they read, how they are fitted, where they fire.

A gate reads each o_proj's input (every head's output) at the prompt's last template tokens, averaged over
those tokens, exactly as the conditional lock's runtime hook does (`lock.applied(conditional=True)`), and
fires when a standardised logistic score passes its threshold. Designs differ in the heads read, the
labels and the threshold:

- `heads:K`: the K heads whose single-head probes separate best on held-out prompts (today's gate, K = 8);
- `all`: every head of every layer, one L2 logistic;
- labels (prefix): the source's harm label (default), or `refusal:`, whether the base itself refuses the prompt
  ("back to the base's standard" means locking exactly where the base would refuse; no harm labels needed);
- threshold `logit` (0), `benign:Q` (the score that a share Q of the fitting benign prompts pass, from
  cross-validated scores, so the benign firing rate is chosen, not found) or `deployed:Q` (the same share set
  on the guarded model's own benign prompts, `recalibrate`).

Every source weighs the same in a fit, whatever its size: a gate must not learn one benchmark's phrasing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .errors import SafetylockError
from .lock.gate_artifact import GATE_READS, Gate, read_heads

GateFit = Gate  # the name the out-of-distribution protocol has used for a fitted gate


@torch.no_grad()
def template_features(model: Any, tokenizer: Any, texts: Sequence[str], *, n_template: int, batch_size: int = 8,
                      progress: bool = False) -> torch.Tensor:
    """Return (n, layers, heads, head_dim): each o_proj input averaged over a chat text's `n_template` template tokens.

    `texts` are whole chat-templated inputs (what the model sees, attacks included); they are left-padded as
    in generation. The template tokens are found as the runtime gate finds them (`template_positions`): the last
    occurrence of the template's ids, so a prefilled reply after them changes nothing.
    """
    from .arch import decoder_layers, head_geometry, o_proj, unwrap
    from .generate import model_device
    from .lock.capture import StopForward, run_until_stopped
    from .lock.positions import template_positions, template_token_ids

    geometry = head_geometry(unwrap(model).config)
    template_ids = template_token_ids(tokenizer)
    if len(template_ids) != n_template:
        template_ids = []  # the caller's count is not this template's: read the last tokens, as before
    rows = where = torch.zeros(0, dtype=torch.long)  # set per batch, read by the hooks
    n_layers = len(decoder_layers(model))
    out = torch.zeros(len(texts), n_layers, geometry.num_heads, geometry.head_dim)
    captured: dict[int, torch.Tensor] = {}

    def hook(layer: int) -> Any:
        def capture(module: Any, args: tuple[Any, ...]) -> None:
            captured[layer] = args[0][rows, where, :].float().cpu()
            if layer == n_layers - 1:
                raise StopForward  # nothing after the last o_proj input is read: skip the last MLP and the LM head

        return capture

    handles = [o_proj(model, layer).register_forward_pre_hook(hook(layer)) for layer in range(n_layers)]
    tokenizer.padding_side = "left"
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc="gate features", unit="prompt", leave=False)
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            enc = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model_device(model)) for k, v in enc.items()}
            where = torch.stack([template_positions(i, m, n_template, template_ids)
                                 for i, m in zip(enc["input_ids"], enc["attention_mask"])])
            rows = torch.arange(len(batch), device=where.device)[:, None]
            run_until_stopped(model, enc["input_ids"], enc["attention_mask"])
            for layer in range(n_layers):
                x = captured[layer].view(len(batch), n_template, geometry.num_heads, geometry.head_dim)
                out[batch, layer] = x.mean(1)
            if bar is not None:
                bar.update(len(batch))
    finally:
        for handle in handles:
            handle.remove()
        if bar is not None:
            bar.close()
    return out


def source_weights(sources: Sequence[str], labels: np.ndarray) -> np.ndarray:
    """Return per-sample weights under which every (source, label) group sums to the same total."""
    keys = [f"{s}|{int(y)}" for s, y in zip(sources, labels)]
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    w = np.array([1.0 / counts[k] for k in keys])
    return np.asarray(w * len(w) / w.sum())


def _logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray, c: float, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=3000, random_state=seed).fit(x, y, sample_weight=w)


def _rank_heads(features: torch.Tensor, y: np.ndarray, w: np.ndarray, k: int, seed: int) -> list[tuple[int, int]]:
    """Return the k (layer, head) pairs whose own probe scores best, by 2-fold cross-validated weighted accuracy."""
    from sklearn.model_selection import StratifiedKFold

    n, n_layers, n_heads, _ = features.shape
    folds = list(StratifiedKFold(2, shuffle=True, random_state=seed).split(np.zeros(n), y))
    acc = np.zeros((n_layers, n_heads))
    for layer in range(n_layers):
        for head in range(n_heads):
            x = features[:, layer, head, :].double().numpy()
            hits = 0.0
            for tr, va in folds:
                mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
                probe = _logistic((x[tr] - mu) / sd, y[tr], w[tr], 1.0, seed)
                hits += float((w[va] * (probe.predict((x[va] - mu) / sd) == y[va])).sum())
            acc[layer, head] = hits / w.sum()
    flat = np.argsort(-acc, axis=None)[:k]
    return [(int(i // n_heads), int(i % n_heads)) for i in flat]


@dataclass(frozen=True)
class Design:
    """A parsed gate design: its labels, the heads it reads and its threshold."""

    labels: str  # "harm": the source's label; "refusal": whether the base refuses the prompt
    heads: str  # "top" (the k best single-head probes) or "all"
    k: int | None
    threshold: str  # "logit", "benign:Q" or "deployed:Q"


def parse_design(design: str) -> Design:
    """Parse '[refusal:]heads:K[@T]' or '[refusal:]all[@T]' (T: logit, benign:Q or deployed:Q)."""
    labels, body = ("refusal", design[len("refusal:"):]) if design.startswith("refusal:") else ("harm", design)
    head_part, _, threshold = body.partition("@")
    threshold = threshold or "logit"
    if threshold != "logit":
        if not threshold.startswith(("benign:", "deployed:")):
            raise SafetylockError(f"bad gate threshold '{threshold}'; use logit, benign:Q or deployed:Q (0 < Q < 1)")
        try:
            q = float(threshold.split(":", 1)[1])
        except ValueError:
            q = -1.0
        if not 0.0 < q < 1.0:
            raise SafetylockError(f"bad gate threshold '{threshold}'; use benign:Q or deployed:Q with 0 < Q < 1, e.g. benign:0.05")
    if head_part == "all":
        return Design(labels, "all", None, threshold)
    if head_part.startswith("heads:") and head_part[6:].isdigit() and int(head_part[6:]) >= 1:
        return Design(labels, "top", int(head_part[6:]), threshold)
    raise SafetylockError(f"bad gate design '{design}'; use [refusal:]heads:K or [refusal:]all, optionally "
                          "@benign:Q or @deployed:Q (e.g. refusal:all@benign:0.05)")


def fit_gate(features: torch.Tensor, labels: Sequence[int], sources: Sequence[str], design: str = "heads:8", *,
             c: float | None = None, seed: int = 0) -> GateFit:
    """Return a gate fitted on per-prompt features (1 = lock this prompt) with every source weighted equally."""
    from sklearn.model_selection import StratifiedKFold

    d = parse_design(design)
    kind, k, threshold = d.heads, d.k, d.threshold
    y = np.asarray(labels, dtype=int)
    if y.min(initial=1) == y.max(initial=0) or len(y) != features.shape[0]:
        raise SafetylockError("a gate needs features and both labels (prompts to lock and prompts to leave)")
    w = source_weights(sources, y)
    n_layers, n_heads = features.shape[1], features.shape[2]
    if kind == "all":
        pairs = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
        c = 0.01 if c is None else c  # thousands of inputs, about a thousand prompts: strong L2
    else:
        pairs = _rank_heads(features, y, w, min(int(k or 1), n_layers * n_heads), seed)
        c = 1.0 if c is None else c
    layers, heads = [p[0] for p in pairs], [p[1] for p in pairs]
    x = read_heads(features, layers, heads)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    probe = _logistic(z, y, w, c, seed)
    bias = float(probe.intercept_[0])
    about: dict[str, Any] = {"design": design, "pairs": len(pairs), "C": c, "n_lock": int(y.sum()),
                             "n_leave": int((1 - y).sum()), "sources": sorted(set(sources))}
    if threshold.startswith("benign:"):
        q = float(threshold.split(":", 1)[1])
        cv = np.zeros(len(y))
        for tr, va in StratifiedKFold(5, shuffle=True, random_state=seed).split(z, y):
            cv[va] = _logistic(z[tr], y[tr], w[tr], c, seed).decision_function(z[va])
        leave = y == 0
        cut = _weighted_cut(cv[leave], w[leave], q)
        bias -= cut
        about["threshold"] = {"benign_share": q, "cut": round(cut, 4)}
    return GateFit(layers, heads, mu, sd, probe.coef_[0].astype(np.float64), bias, about)


def _weighted_cut(scores: np.ndarray, weights: np.ndarray, q: float) -> float:
    """Return the score that a weighted share `q` of `scores` exceeds (each source's prompts weigh the same)."""
    order = np.argsort(scores)
    cum = np.cumsum(weights[order]) / weights.sum()
    return float(scores[order][min(int(np.searchsorted(cum, 1 - q)), len(order) - 1)])


def recalibrate(gate: GateFit, benign_features: torch.Tensor, sources: Sequence[str], q: float) -> GateFit:
    """Return a copy of `gate` whose threshold lets a share `q` of benign prompts fire, read on the model it guards.

    A fine-tune moves the activations a gate reads (a gate fitted on the base fires on every prompt of the
    fine-tuned model); benign prompts through the deployed model, no harm labels needed, put the cut back.
    """
    scores = gate.scores(benign_features)
    cut = _weighted_cut(scores, source_weights(sources, np.zeros(len(sources))), q)
    about = {**gate.about, "threshold": {"deployed_benign_share": q, "cut": round(cut, 4), "benign_prompts": len(scores)}}
    return replace(gate, bias=gate.bias - cut, about=about)


def with_gate(lock: Any, gate: Gate, n_template: int, reads: str = "model",
              template_ids: Sequence[int] | None = None) -> Any:
    """Return a copy of `lock` whose conditional gate is `gate` (directions, stds and alpha unchanged).

    `reads`: 'model' (the gate reads the deployed model) or 'base' (its peft adapter switched off for the
    decision, so a gate fitted on the base reads what it was fitted on; `lock.gate.gate_reading`).
    """
    if reads not in GATE_READS:
        raise SafetylockError(f"bad gate reading '{reads}'; use {' or '.join(GATE_READS)}")
    ids = list(template_ids) if template_ids is not None else None
    return lock.with_gate(replace(gate, about=dict(gate.about), template_tokens=n_template, reads=reads,
                                  template_ids=ids))


def refusal_labels(model: Any, tokenizer: Any, texts: Sequence[str], *, system: str | None = None,
                   judge: str | None = None, max_new_tokens: int = 40, batch_size: int = 8,
                   progress: bool = False) -> list[int]:
    """Return 1 for each prompt the model refuses (its greedy reply, judged), else 0: the labels of a
    `refusal:` gate, run on the aligned base, so the gate locks exactly where the base would refuse."""
    from .generate import generate
    from .judges import DEFAULT_JUDGE, get_judge

    replies = generate(model, tokenizer, texts, system=system, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       progress=progress).texts
    return [int(j.refused) for j in get_judge(judge or DEFAULT_JUDGE).judge_many(list(texts), replies)]


def fit_gate_on_sources(model: Any, tokenizer: Any, design: str, *, harmful: Sequence[str] | None = None,
                        benign: Sequence[str] | None = None, system: str | None = None, limit: int | None = None,
                        seed: int = 0, batch_size: int = 8, progress: bool = False) -> GateFit:
    """Return a gate fitted on the extract splits of every out-of-distribution source (or the ones named).

    Harmful sources are the prompts to lock, benign ones the prompts to leave, or with a `refusal:` design the
    prompts `model` (the aligned base) refuses are the ones to lock; `limit` caps each source.
    """
    from .data import OOD_BENIGN, OOD_HARMFUL, load_benchmark
    from .files import sha256_text
    from .generate import format_chat
    from .lock import template_token_count

    by_refusal = parse_design(design).labels == "refusal"
    texts: list[str] = []
    labels: list[int] = []
    sources: list[str] = []
    for names, label in ((harmful or OOD_HARMFUL, 1), (benign or OOD_BENIGN, 0)):
        for name in names:
            prompts = load_benchmark(name, "extract")[:limit]
            texts += [p.text for p in prompts]
            labels += [label] * len(prompts)
            sources += [name] * len(prompts)
    chats = [format_chat(tokenizer, t, system) for t in texts]
    feats = template_features(model, tokenizer, chats, n_template=template_token_count(tokenizer),
                              batch_size=batch_size, progress=progress)
    if by_refusal:
        labels = refusal_labels(model, tokenizer, texts, system=system, batch_size=batch_size, progress=progress)
    gate = fit_gate(feats, labels, sources, design, seed=seed)
    gate.about.update({"split": "extract", "system": system, "seed": seed,
                       "prompts_sha256": sha256_text("\n".join(texts))})
    return gate


def gate_lock(lock: Any, model: Any, tokenizer: Any, design: str = "builtin", *, reads: str = "model", seed: int = 0,
              batch_size: int = 8, limit: int | None = None, progress: bool = False) -> Any:
    """Return `lock` with a harmfulness gate: `builtin` (the 64 built-in gate prompts, 8 heads) or a design
    fitted on every out-of-distribution source's extract split (`fit_gate_on_sources`, `limit` per source);
    `reads` says what the gate reads at run time (`with_gate`)."""
    from .lock import fit_condition, template_token_count
    from .lock.positions import template_token_ids

    if design == "builtin":
        from .data import gate_prompts

        out = fit_condition(lock, model, tokenizer, *gate_prompts(64, seed), seed=seed, batch_size=batch_size,
                            progress=progress)
        return out if reads == "model" else out.with_gate(replace(installed_gate(out), reads=reads))
    gate = fit_gate_on_sources(model, tokenizer, design, seed=seed, batch_size=batch_size, limit=limit,
                               progress=progress)
    return with_gate(lock, gate, template_token_count(tokenizer), reads=reads, template_ids=template_token_ids(tokenizer))


def installed_gate(lock: Any) -> Gate:
    """Return a copy of a lock's installed gate, its design named (scores identical to `Lock.condition_logits`)."""
    if lock.gate is None:
        raise SafetylockError("this lock has no harmfulness gate; fit one with `safetylock extract --gate`")
    gate: Gate = lock.gate
    return replace(gate, about={"design": "builtin", **gate.about})


__all__ = ["Design", "Gate", "GateFit", "fit_gate", "fit_gate_on_sources", "gate_lock", "installed_gate", "recalibrate", "refusal_labels", "parse_design", "source_weights", "template_features",
           "with_gate"]
