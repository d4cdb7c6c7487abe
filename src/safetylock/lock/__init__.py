"""SafetyLock: per-head safety directions from the aligned base, applied to its fine-tuned descendants.

Extraction teacher-forces (prompt, safe reply, unsafe reply) triples through the base model, reads every
attention head's output (the head's slice of `o_proj`'s input), fits one logistic probe per head on a split
by pair, keeps the K heads whose probes generalise best, and stores for each the unit mass-mean direction
(mean safe - mean unsafe) and the standard deviation of projections on it.

Applying a lock with strength alpha adds `alpha * std * direction` to each chosen head's output:
at run time through forward pre-hooks on `o_proj` (`Lock.applied`), or permanently as `o_proj.bias += W_o @ delta`
(`Lock.bake`), which is the same function of the input because o_proj is linear. `export_locked` writes a baked
checkpoint that plain `transformers` loads with the bias intact.

Beyond the paper: an optional harmfulness probe (`fit_condition`) on the prompt's post-instruction template
tokens lets `applied(..., conditional=True)` shift only the sequences the probe flags.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .arch import HeadGeometry, decoder_model, head_geometry, o_proj, o_projs, unwrap
from .errors import SafetylockError, check_alpha
from .files import atomic_dir, atomic_file, check_output_dir, read_tagged_safetensors, sha256_text, write_tagged_safetensors

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
    from . import __version__

    return __version__


# ---------------------------------------------------------------------------------------------------------
# Token positions


@dataclass(frozen=True)
class PositionTerm:
    """One part of a positions spec: a segment and a 1-based inclusive range of it (None = all)."""

    segment: str  # response | template | prompt
    first: int | None = None  # 1-based, inclusive
    last: int | None = None  # 1-based, inclusive
    tail: int | None = None  # the last `tail` tokens


_TERM = re.compile(r"^(response|template|prompt)(?::(?:-(\d+)|(\d+)(?:-(\d+))?))?$")


def parse_positions(spec: str) -> tuple[PositionTerm, ...]:
    """Return the terms of a positions spec such as "response:-5", "response:1-8" or "template+response:1-4"."""
    terms = []
    for raw in str(spec).replace(",", "+").split("+"):
        part = raw.strip()
        match = _TERM.match(part)
        if not match:
            raise SafetylockError(
                f"bad positions term '{part}' in '{spec}'; use response[:-N|:N|:A-B], template[:-N], prompt[:-N], joined by +"
            )
        segment, tail, first, last = match.groups()
        if tail is not None:
            terms.append(PositionTerm(segment, tail=int(tail)))
        elif first is not None:
            a = int(first)
            b = int(last) if last is not None else a
            if a < 1 or b < a:
                raise SafetylockError(f"bad range in positions term '{part}'; ranges are 1-based, A <= B")
            terms.append(PositionTerm(segment, first=a, last=b))
        else:
            terms.append(PositionTerm(segment))
    if not terms:
        raise SafetylockError("empty positions spec")
    return tuple(terms)


def _range(term: PositionTerm, start: int, length: int) -> list[int]:
    if term.tail is not None:
        lo = max(0, length - term.tail)
        return list(range(start + lo, start + length))
    if term.first is not None and term.last is not None:
        return [start + i for i in range(term.first - 1, min(term.last, length))]
    return list(range(start, start + length))


def select_positions(terms: Sequence[PositionTerm], n_head: int, n_template: int, n_response: int) -> list[int]:
    """Return sorted absolute token positions for a text of `n_head` prompt tokens then `n_response` reply tokens."""
    out: set[int] = set()
    for term in terms:
        if term.segment == "response":
            out.update(_range(term, n_head, n_response))
        elif term.segment == "template":
            t = min(n_template, n_head)
            out.update(_range(term, n_head - t, t))
        else:
            out.update(_range(term, 0, n_head))
    return sorted(out)


_MARK = "\u2063safetylock-marker\u2063"


def template_token_count(tokenizer: Any) -> int:
    """Return how many tokens the chat template puts between the end of the user's text and the reply."""
    from .generate import format_chat

    text = format_chat(tokenizer, _MARK)
    suffix = text[text.rindex(_MARK) + len(_MARK) :]
    return max(1, len(tokenizer(suffix, add_special_tokens=False)["input_ids"]))


def encode_item(tokenizer: Any, prompt: str, response: str | None) -> tuple[list[int], int]:
    """Return (token ids, number of prompt tokens) of a chat-templated prompt followed by a teacher-forced reply."""
    from .generate import format_chat

    head = tokenizer(format_chat(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    tail = tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
    return list(head) + list(tail), len(head)


# ---------------------------------------------------------------------------------------------------------
# Activation capture


class _StopForward(Exception):
    """Raised by a capture hook once the deepest needed layer is read, to skip the rest of the model."""


@dataclass
class Activations:
    """Head outputs at chosen positions: `values` (samples, layers, heads, head_dim) float32, `owner` item index."""

    values: torch.Tensor
    owner: torch.Tensor
    layers: list[int]
    positions: str


def _run_quietly(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass


@torch.no_grad()
def head_activations(
    model: Any,
    tokenizer: Any,
    items: Sequence[Item],
    positions: str = DEFAULT_POSITIONS,
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> Activations:
    """Return every head's output at the `positions` of each (prompt, reply) item, as float32 on the CPU.

    Items are teacher-forced (chat template, then the reply's tokens) with right padding, so positions are
    absolute. Each selected position is one sample; `owner[i]` says which item sample i came from.
    """
    terms = parse_positions(positions)
    geometry = head_geometry(unwrap(model).config)
    wanted = sorted(set(range(geometry.num_layers) if layers is None else (int(x) for x in layers)))
    n_template = template_token_count(tokenizer)
    encoded = [encode_item(tokenizer, p, r) for p, r in items]
    picks = [select_positions(terms, n_head, n_template, len(ids) - n_head) for ids, n_head in encoded]
    empty = [i for i, p in enumerate(picks) if not p]
    if empty:
        raise SafetylockError(
            f"positions '{positions}' select no token of item {empty[0]} (prompt: {items[empty[0]][0][:60]!r}); "
            "check the spec against the replies"
        )
    device = model.get_input_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    store: dict[int, list[torch.Tensor]] = {layer: [] for layer in wanted}
    state: dict[str, torch.Tensor] = {}
    deepest = wanted[-1]

    def make_hook(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            store[layer].append(x[state["rows"], state["cols"]].float().cpu())
            if layer == deepest:
                raise _StopForward

        return hook

    handles = [o_proj(model, layer).register_forward_pre_hook(make_hook(layer)) for layer in wanted]
    owner: list[int] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="activations", unit="text", leave=False)
    try:
        for start in range(0, len(items), max(1, batch_size)):
            batch = list(range(start, min(len(items), start + batch_size)))
            width = max(len(encoded[i][0]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            rows, cols = [], []
            for r, i in enumerate(batch):
                seq = encoded[i][0]
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
                rows += [r] * len(picks[i])
                cols += picks[i]
                owner += [i] * len(picks[i])
            state["rows"] = torch.tensor(rows, device=device)
            state["cols"] = torch.tensor(cols, device=device)
            _run_quietly(model, ids.to(device), mask.to(device))
            if bar is not None:
                bar.update(len(batch))
    finally:
        for handle in handles:
            handle.remove()
        if bar is not None:
            bar.close()
    per_layer = [torch.cat(store[layer]) for layer in wanted]
    values = torch.stack(per_layer, dim=1).view(len(owner), len(wanted), geometry.num_heads, geometry.head_dim)
    return Activations(values, torch.tensor(owner, dtype=torch.long), wanted, positions)


# ---------------------------------------------------------------------------------------------------------
# Probe maths (pure)


def split_pairs(n: int, val_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return (train, val) pair indices: a seeded split of range(n), so no pair lands on both sides."""
    if n < 2:
        raise SafetylockError(f"need at least 2 pairs to hold some out for validation, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, int(round(n * val_fraction))))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@dataclass
class HeadFit:
    """Per-head results of fitting probes: maps (layers, heads) and per-head direction statistics."""

    accuracy: torch.Tensor  # (L, H) validation accuracy of the logistic probe
    separation: torch.Tensor  # (L, H) Cohen's d of validation projections on the mass-mean direction
    directions: torch.Tensor  # (L, H, D) unit mass-mean directions (positive minus negative), from train
    stds: torch.Tensor  # (L, H) std of train projections on the direction
    midpoints: torch.Tensor  # (L, H) midpoint of the class means of train projections
    projection_accuracy: torch.Tensor  # (L, H) validation accuracy of thresholding at the midpoint


def fit_heads(
    values: torch.Tensor,
    labels: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    *,
    seed: int = 0,
    progress: bool = False,
) -> HeadFit:
    """Return per-head probe accuracy, separation and mass-mean directions for samples `values` (S, L, H, D).

    `labels` is 1 for the positive (safe) class; `train` / `val` are boolean or index masks over samples.
    """
    from sklearn.linear_model import LogisticRegression

    S, L, H, D = values.shape
    y = np.asarray(labels).astype(int)
    tr = np.zeros(S, bool)
    tr[train] = True
    va = np.zeros(S, bool)
    va[val] = True
    if len(set(y[tr])) < 2 or len(set(y[va])) < 2:
        raise SafetylockError("train and validation sets each need both classes; give more pairs")
    acc = torch.zeros(L, H)
    sep = torch.zeros(L, H)
    dirs = torch.zeros(L, H, D)
    stds = torch.zeros(L, H)
    mids = torch.zeros(L, H)
    pacc = torch.zeros(L, H)
    data = values.numpy().astype(np.float64, copy=False)
    heads = [(layer, head) for layer in range(L) for head in range(H)]
    if progress:
        from tqdm.auto import tqdm

        heads = tqdm(heads, desc="probes", unit="head", leave=False)
    for layer, head in heads:
        x = data[:, layer, head, :]
        xt, yt = x[tr], y[tr]
        mu, sd = xt.mean(0), xt.std(0) + 1e-6
        probe = LogisticRegression(C=1.0, max_iter=1000, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe.fit((xt - mu) / sd, yt)
        acc[layer, head] = float((probe.predict((x[va] - mu) / sd) == y[va]).mean())
        diff = xt[yt == 1].mean(0) - xt[yt == 0].mean(0)
        norm = float(np.linalg.norm(diff))
        if not math.isfinite(norm) or norm == 0.0:
            continue
        direction = diff / norm
        proj_t = xt @ direction
        proj_v = x[va] @ direction
        pos, neg = proj_v[y[va] == 1], proj_v[y[va] == 0]
        pooled = math.sqrt((pos.var() + neg.var()) / 2) + 1e-12
        mid = (proj_t[yt == 1].mean() + proj_t[yt == 0].mean()) / 2
        dirs[layer, head] = torch.from_numpy(direction).float()
        stds[layer, head] = float(proj_t.std())
        sep[layer, head] = float((pos.mean() - neg.mean()) / pooled)
        mids[layer, head] = float(mid)
        pacc[layer, head] = float(((proj_v > mid).astype(int) == y[va]).mean())
    return HeadFit(acc, sep, dirs, stds, mids, pacc)


def rank_heads(accuracy: torch.Tensor, separation: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """Return the top-k (layer, head) by validation accuracy, ties broken by separation (accuracy saturates)."""
    L, H = accuracy.shape
    cells = [(layer, head) for layer in range(L) for head in range(H)]
    cells.sort(key=lambda c: (-float(accuracy[c]), -float(separation[c]), c))
    return cells[: max(1, min(k, len(cells)))]


def _hash_rows(rows: Sequence[Sequence[str | None]]) -> str:
    return sha256_text(*("\x1f".join(str(v) for v in row) for row in rows))


# ---------------------------------------------------------------------------------------------------------
# The lock


@dataclass
class Lock:
    """Chosen heads, their unit directions and projection stds, plus the metadata that says what they fit.

    Optional: the full layer x head validation-accuracy map (`accuracy`), and a harmfulness probe for
    conditional application (`cond_*`: heads, feature standardisation, logistic weights).
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
    cond_layers: torch.Tensor | None = None  # (M,)
    cond_heads: torch.Tensor | None = None  # (M,)
    cond_mean: torch.Tensor | None = None  # (M * head_dim,)
    cond_scale: torch.Tensor | None = None  # (M * head_dim,)
    cond_weight: torch.Tensor | None = None  # (M * head_dim,)
    cond_bias: torch.Tensor | None = None  # (1,)

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
        return self.cond_weight is not None

    def __len__(self) -> int:
        return int(self.layers.numel())

    # -- files ----------------------------------------------------------------------------------------

    _TENSORS = ("layers", "heads", "directions", "stds", "scores", "midpoints", "accuracy", "separation",
                "cond_layers", "cond_heads", "cond_mean", "cond_scale", "cond_weight", "cond_bias")

    def save(self, path: str | Path) -> Path:
        """Write the lock as safetensors with its metadata as JSON in the header, atomically; return the path."""
        path = Path(path)
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in self._TENSORS
                   if getattr(self, name) is not None}
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **self.metadata}
        return write_tagged_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> Lock:
        """Read a lock file written by `save`; refuse anything else with a one-line reason."""
        path = Path(path).expanduser()
        tensors, meta = read_tagged_safetensors(path, FORMAT, "lock file", "run `safetylock extract` to make one")
        version = meta.pop("format_version", None)
        meta.pop("format", None)
        if version != FORMAT_VERSION:
            raise SafetylockError(f"{path} has lock format version {version}; this safetylock reads version {FORMAT_VERSION}")
        missing = [k for k in ("layers", "heads", "directions", "stds", "scores") if k not in tensors]
        if missing:
            raise SafetylockError(f"{path} lacks tensor(s) {', '.join(missing)}; the file is damaged, extract it again")
        if not isinstance(meta.get("fingerprint", {}), dict):
            raise SafetylockError(f"{path}: its metadata's fingerprint is not a JSON object; the file is damaged, extract it again")
        lock = cls(metadata=meta, **{k: v for k, v in tensors.items() if k in cls._TENSORS})
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
        from .models import SKETCH_THRESHOLD, fingerprint, sketch_distance, weight_sketch

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
            fp = self.fingerprint
            geometry = HeadGeometry(int(fp["num_hidden_layers"]), int(fp["num_attention_heads"]),
                                    int(fp.get("num_key_value_heads") or fp["num_attention_heads"]),
                                    int(fp["head_dim"]), int(fp["hidden_size"]))
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

    @contextlib.contextmanager
    def applied(
        self,
        model: Any,
        alpha: float | None = None,
        positions: str = "all",
        conditional: bool = False,
        force: bool = False,
    ) -> Iterator[Any]:
        """Shift the lock's heads inside the block through o_proj forward pre-hooks; yield the model.

        positions="all" shifts every token. positions="generation" shifts only positions whose output
        predicts a generated token: the last position of a multi-token (prefill) call, and every position
        of a one-token (cached decoding) call. The prefill rule assumes left padding, as `generate` uses.
        conditional=True first runs each prompt (a multi-token call) through the model unshifted, reads the
        lock's harmfulness probe at the prompt's last template tokens, and shifts only the flagged rows,
        for that call and the one-token calls that follow it.
        Hooks are removed on exit, so the model afterwards computes exactly what it did before.
        """
        if positions not in ("all", "generation"):
            raise SafetylockError(f"positions must be 'all' or 'generation', got '{positions}'")
        if conditional and not self.has_condition:
            raise SafetylockError("this lock has no harmfulness probe; fit one with fit_condition (extract --conditional)")
        self.validate(model, force=force)
        state = _HookState()
        handles: list[Any] = []
        try:
            for layer, delta in self.deltas(alpha, model).items():
                linear = o_proj(model, layer)
                shift = delta.to(device=linear.weight.device, dtype=linear.weight.dtype)
                handles.append(linear.register_forward_pre_hook(_shift_hook(shift, positions, state)))
            if conditional:
                handles += self._condition_hooks(model, state)
            yield model
        finally:
            for handle in handles:
                handle.remove()

    apply = applied

    def _condition_hooks(self, model: Any, state: _HookState) -> list[Any]:
        assert self.cond_layers is not None and self.cond_heads is not None
        assert self.cond_mean is not None and self.cond_scale is not None
        assert self.cond_weight is not None and self.cond_bias is not None
        geometry = head_geometry(unwrap(model).config)
        n_template = int(self.metadata.get("condition", {}).get("template_tokens", 1))
        cond_layers = [int(x) for x in self.cond_layers.tolist()]
        cond_heads = [int(x) for x in self.cond_heads.tolist()]
        wanted = sorted(set(cond_layers))
        captured: dict[int, torch.Tensor] = {}
        D = geometry.head_dim
        mean, scale = self.cond_mean.double(), self.cond_scale.double()
        weight, bias = self.cond_weight.double(), float(self.cond_bias.reshape(-1)[0])

        def capture(layer: int) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                if state.deciding:
                    captured[layer] = args[0].detach()
                    if layer == wanted[-1]:
                        raise _StopForward

            return hook

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
            state.deciding = True
            captured.clear()
            try:
                with torch.no_grad():
                    _run_quietly(module, ids, mask)
            finally:
                state.deciding = False
            feats = []
            for b in range(ids.shape[0]):
                real = torch.nonzero(mask[b], as_tuple=False).flatten()[-n_template:]
                parts = [captured[layer][b, real, head * D : (head + 1) * D].double().mean(0).cpu()
                         for layer, head in zip(cond_layers, cond_heads)]
                feats.append(torch.cat(parts))
            logits = ((torch.stack(feats) - mean) / scale) @ weight + bias
            state.rows = (logits > 0).to(ids.device)
            state.last_logits = logits

        handles = [o_proj(model, layer).register_forward_pre_hook(capture(layer)) for layer in wanted]
        # The decoder (not the CausalLM wrapper) is hooked: peft calls the wrapper's forward() directly.
        handles.append(decoder_model(model).register_forward_pre_hook(decide, with_kwargs=True))
        state.conditional = True
        return handles

    def condition_logits(self, model: Any, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
        """Return the harmfulness probe's logit per prompt (> 0: the conditional lock would apply)."""
        if not self.has_condition:
            raise SafetylockError("this lock has no harmfulness probe; fit one with fit_condition")
        assert self.cond_layers is not None and self.cond_heads is not None and self.cond_weight is not None
        assert self.cond_mean is not None and self.cond_scale is not None and self.cond_bias is not None
        acts = head_activations(model, tokenizer, [(p, None) for p in prompts], "template",
                                layers=sorted(set(self.cond_layers.tolist())))
        feats = _condition_features(acts, len(prompts), self.cond_layers.tolist(), self.cond_heads.tolist())
        logits = ((feats - self.cond_mean.double()) / self.cond_scale.double()) @ self.cond_weight.double()
        return logits + float(self.cond_bias.reshape(-1)[0])

    def flagged(self, model: Any, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
        """Return, per prompt, whether the harmfulness probe flags it (True: the conditional lock applies)."""
        return self.condition_logits(model, tokenizer, prompts) > 0

    # -- baking ---------------------------------------------------------------------------------------

    def bake(self, model: Any, alpha: float | None = None, force: bool = False) -> float:
        """Add `W_o @ delta` to each locked layer's o_proj bias in place; return the seconds it took.

        Every new bias is computed and checked for NaN/inf before any is written. A missing bias becomes a
        zero Parameter of the weight's dtype and device. With an unmerged LoRA adapter the bias goes into
        the adapter's base layer, matching the runtime hooks (the shift passes through the base weights).
        """
        self.validate(model, force=force)
        start = time.perf_counter()
        geometry = head_geometry(unwrap(model).config)
        deltas = self.deltas(alpha, geometry=geometry)
        slices = self.head_slices(geometry.head_dim)
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

    def unbake(self, model: Any) -> None:
        """Restore every o_proj bias a bake changed, exactly (see `unbake`)."""
        unbake(model)


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


# ---------------------------------------------------------------------------------------------------------
# Extraction


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
    from .models import fingerprint

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
    items: list[Item] = [(p, s) for p, s, _ in pairs] + [(p, u) for p, _, u in pairs]
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


def extract_prompt_contrast(
    model: Any,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    heads: int = DEFAULT_HEADS,
    positions: str = "template",
    seed: int = 0,
    val_fraction: float = 0.25,
    alpha: float = DEFAULT_ALPHA,
    batch_size: int = 8,
    progress: bool = False,
    name: str | None = None,
) -> Lock:
    """Return a lock whose directions point from harmless to harmful prompts (a baseline: "this is harmful")."""
    from .models import fingerprint

    if len(harmful) < 2 or len(harmless) < 2:
        raise SafetylockError("prompt contrast needs at least 2 harmful and 2 harmless prompts")
    acts = head_activations(model, tokenizer, [(p, None) for p in [*harmful, *harmless]], positions,
                            batch_size=batch_size, progress=progress)
    labels, train, val = _prompt_split(acts, len(harmful), len(harmless), val_fraction, seed)
    fit = fit_heads(acts.values, labels, train, val, seed=seed, progress=progress)
    chosen = rank_heads(fit.accuracy, fit.separation, heads)
    idx = tuple(torch.tensor(v) for v in zip(*chosen))
    metadata = {
        "library": "safetylock",
        "version": _library_version(),
        "method": "prompt contrast: per-head probes, unit mass-mean directions (harmful - harmless prompts)",
        "fingerprint": fingerprint(model, name, sketch=True),
        "default_alpha": float(alpha),
        "extraction": {"positions": positions, "heads": len(chosen), "seed": seed, "val_fraction": val_fraction,
                       "harmful": len(harmful), "harmless": len(harmless),
                       "prompts_sha256": _hash_rows([[*harmful], [*harmless]]),
                       "template_tokens": template_token_count(tokenizer)},
    }
    return Lock(idx[0].long(), idx[1].long(), fit.directions[idx].float().contiguous(), fit.stds[idx].float(),
                fit.accuracy[idx].float(), metadata, fit.midpoints[idx].float(), fit.accuracy.float(),
                fit.separation.float())


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


# ---------------------------------------------------------------------------------------------------------
# Transfer check


@dataclass
class TransferReport:
    """Per-head accuracy of the lock's directions (threshold at the base's midpoint) on two models."""

    layers: list[int]
    heads: list[int]
    base_accuracy: list[float]
    target_accuracy: list[float]
    threshold: float

    @property
    def mean_base(self) -> float:
        return float(np.mean(self.base_accuracy)) if self.base_accuracy else float("nan")

    @property
    def mean_target(self) -> float:
        return float(np.mean(self.target_accuracy)) if self.target_accuracy else float("nan")

    @property
    def weak(self) -> bool:
        return self.mean_target < self.threshold

    def summary(self) -> str:
        return (f"{len(self.layers)} heads: mean accuracy {self.mean_target:.3f} on the target vs "
                f"{self.mean_base:.3f} on the base" + (" (WEAK: the directions do not transfer)" if self.weak else ""))


def projection_accuracy(lock: Lock, acts: Activations, labels: np.ndarray) -> list[float]:
    """Return per lock head the accuracy of `projection > midpoint` against labels (1 = safe)."""
    if lock.midpoints is None:
        raise SafetylockError("this lock has no projection midpoints; extract it again with this version")
    col = {layer: i for i, layer in enumerate(acts.layers)}
    out = []
    for k, (layer, head) in enumerate(zip(lock.layers.tolist(), lock.heads.tolist())):
        proj = acts.values[:, col[layer], head, :] @ lock.directions[k]
        out.append(float(((proj > lock.midpoints[k]).numpy().astype(int) == labels).mean()))
    return out


def check_transfer(
    lock: Lock,
    model: Any,
    tokenizer: Any,
    pairs: Sequence[Pair],
    *,
    base: Any = None,
    threshold: float = 0.7,
    force: bool = True,
    batch_size: int = 8,
    progress: bool = False,
) -> TransferReport:
    """Return how well the lock's stored directions still separate safe from unsafe replies on `model`.

    Compared with the same measure on `base` when given, else with the projection accuracy recorded at
    extraction (on held-out pairs). Warns when the mean target accuracy falls below `threshold`.
    """
    lock.validate(model, force=force)
    positions = str(lock.metadata.get("extraction", {}).get("positions", DEFAULT_POSITIONS))
    layers = sorted(set(lock.layers.tolist()))
    items: list[Item] = [(p, s) for p, s, _ in pairs] + [(p, u) for p, _, u in pairs]

    def measure(m: Any) -> list[float]:
        acts = head_activations(m, tokenizer, items, positions, layers=layers, batch_size=batch_size, progress=progress)
        return projection_accuracy(lock, acts, (acts.owner.numpy() < len(pairs)).astype(int))

    target = measure(model)
    if base is not None:
        base_acc = measure(base)
    else:
        base_acc = [float(v) for v in lock.metadata.get("extraction", {}).get("projection_accuracy", [])]
    report = TransferReport(lock.layers.tolist(), lock.heads.tolist(), base_acc, target, threshold)
    if report.weak:
        warnings.warn(f"lock transfer is weak: {report.summary()}", stacklevel=2)
    return report


# ---------------------------------------------------------------------------------------------------------
# Export


EXPORT_KIND = "apply"  # the manifest kind of a locked checkpoint directory (files.check_output_dir)

EXPORT_LAYOUT = {
    "llama": "native",
    "gemma": "native",
    "gemma2": "native",
    "gemma3_text": "native",
    "qwen2": "llama",
    "mistral": "llama",
    "phi3": "llama",
}
_LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
               "tie_word_embeddings", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id")


def _export_refusal(config: Any) -> str | None:
    """Return why a model cannot be written as a bias-carrying checkpoint exactly, or None."""
    kind = config.model_type
    if kind not in EXPORT_LAYOUT:
        return f"exporting a {kind} model is not supported"
    if EXPORT_LAYOUT[kind] != "llama":
        return None
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    if kind == "qwen2" and "sliding_attention" in layer_types:
        return "this qwen2 model uses sliding-window layers, which the Llama layout cannot express"
    if kind in ("mistral", "phi3") and window is not None and window < config.max_position_embeddings:
        return f"this {kind} model uses a {window}-token sliding window, which the Llama layout cannot express"
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if kind == "phi3" and (rope.get("rope_type", "default") != "default" or float(rope.get("partial_rotary_factor", 1.0) or 1.0) != 1.0):
        return "this phi3 model uses long or partial rotary embeddings, which the Llama layout cannot express"
    return None


def _llama_config(config: Any, geometry: HeadGeometry) -> Any:
    from transformers import LlamaConfig

    values = {k: getattr(config, k) for k in _LLAMA_KEYS if hasattr(config, k)}
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope.pop("partial_rotary_factor", None)
    out = LlamaConfig(**values, head_dim=geometry.head_dim, attention_bias=True, mlp_bias=False, rope_parameters=rope or None)
    out.architectures = ["LlamaForCausalLM"]
    return out


def _export_state(model: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Return (config, state dict) of a bias-carrying checkpoint equivalent to the baked, merged `model`."""
    config = model.config
    geometry = head_geometry(config)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if EXPORT_LAYOUT[config.model_type] == "native":
        out = copy.deepcopy(config)
        out.attention_bias = True
        out.architectures = [type(model).__name__]
    else:
        out = _llama_config(config, geometry)
    if config.model_type == "phi3":
        q_size, kv_size = geometry.width, geometry.num_kv_heads * geometry.head_dim
        for key in [k for k in state if k.endswith("self_attn.qkv_proj.weight")]:
            prefix = key.removesuffix("qkv_proj.weight")
            q, k_, v = state.pop(key).split([q_size, kv_size, kv_size], dim=0)
            state[prefix + "q_proj.weight"], state[prefix + "k_proj.weight"], state[prefix + "v_proj.weight"] = q, k_, v
        for key in [k for k in state if k.endswith("mlp.gate_up_proj.weight")]:
            prefix = key.removesuffix("gate_up_proj.weight")
            gate, up = state.pop(key).chunk(2, dim=0)
            state[prefix + "gate_proj.weight"], state[prefix + "up_proj.weight"] = gate, up
    # attention_bias=True gives q, k, v and o a bias each: the ones the model lacks are zeros.
    for key in [k for k in state if re.search(r"self_attn\.(q|k|v|o)_proj\.weight$", k)]:
        bias_key = key.removesuffix("weight") + "bias"
        if bias_key not in state:
            weight = state[key]
            state[bias_key] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    if getattr(out, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return out, {k: v.contiguous().cpu() for k, v in state.items()}


def export_locked(
    model: Any,
    tokenizer: Any,
    lock: Lock,
    alpha: float | None,
    outdir: str | Path,
    *,
    force: bool = False,
    verify: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Bake the lock, merge any LoRA adapter, and write a checkpoint plain transformers loads; return a summary.

    The model is changed in place (baked, and merged when it carries an adapter). Qwen2, Mistral and Phi3
    have no o_proj bias, so they are written in the Llama layout, which computes the same function with
    `attention_bias=True` (their q/k/v biases kept or zero). With `verify`, the written checkpoint is
    loaded back with `AutoModelForCausalLM.from_pretrained` and its logits are compared with the model's.
    `outdir` must be new, empty, or (with `overwrite`) an earlier export holding only what it wrote.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    check_output_dir(Path(outdir), EXPORT_KIND, overwrite)
    inner = unwrap(model)
    why = _export_refusal(inner.config)
    if why:
        raise SafetylockError(f"{why}; apply the lock at run time instead (`--lock` on chat/eval/serve, or Lock.applied)")
    a = lock.default_alpha if alpha is None else check_alpha(alpha, "alpha")
    seconds = lock.bake(model, alpha=a, force=force)
    merged = model.merge_and_unload() if inner is not model else model
    config, state = _export_state(merged)
    dtype = next(iter(merged.parameters())).dtype
    config.dtype = dtype
    outdir = Path(outdir)
    summary: dict[str, Any] = {
        "outdir": str(outdir),
        "alpha": a,
        "bake_seconds": seconds,
        "source_model_type": inner.config.model_type,
        "layout": config.model_type,
        "lock": lock.metadata,
    }
    with atomic_dir(outdir, EXPORT_KIND, overwrite) as tmp:
        config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        generation_config = getattr(merged, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if verify:
            summary["max_logit_diff"] = _verify_export(merged, tmp, dtype, AutoModelForCausalLM)
        (tmp / "safetylock.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


@torch.no_grad()
def _verify_export(model: Any, directory: Path, dtype: torch.dtype, auto: Any) -> float:
    reloaded = auto.from_pretrained(directory, dtype=dtype)
    reloaded.eval()
    device = model.get_input_embeddings().weight.device
    reloaded.to(device)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    want = model(input_ids=ids).logits.float()
    got = reloaded(input_ids=ids).logits.float()
    diff = float((want - got).abs().max())
    scale = 1e-4 if dtype == torch.float32 else 2e-2
    if not diff <= scale * (1.0 + float(want.abs().max())):
        raise SafetylockError(
            f"the exported {reloaded.config.model_type} checkpoint does not reproduce the locked model "
            f"(max logit difference {diff:.3g}); nothing was written; apply the lock at run time instead"
        )
    del reloaded
    return diff


# ---------------------------------------------------------------------------------------------------------
# Inspection


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
    if lock.has_condition:
        cond = lock.metadata.get("condition", {})
        lines.append(f"harmfulness probe: {cond.get('heads')} heads, val accuracy {cond.get('val_accuracy')}")
    return "\n".join(lines)
