"""The out-of-distribution protocol: fit the gate and the lock on every prompt source but one, measure on that one.

For each source S of `data.OOD_HARMFUL` + `data.OOD_BENIGN` in turn (a fold):
- the lock's directions are extracted from contrast pairs of the harmful sources other than S (extract splits);
- each gate design is fitted on the extract splits of every source other than S (`gates.fit_gate`);
- on S's whole eval split the base, the fine-tune, and the fine-tune under the lock shifting every prompt
  (baked) reply; the gate is read on the fine-tune (what a deployment sees) and on the base.
A conditional lock shifts exactly the prompts its gate flags, and leaves the others computing what the plain
fine-tune computes, so its reply to a prompt is the baked reply when the gate fires and the fine-tune's reply
otherwise; every gate design is scored from the same replies. `verify` prompts per source are re-run through
the real conditional hooks to check that identity. Gate-only refusal (the gate's flag, a fixed refusal message,
no steering) is scored the same way.

Prompt-level attacks (`prompt_attacks`) run on the first `attack_prompts` eval prompts of each harmful source,
with the fold's gate and lock for that source.

The bar, the tables and the plot of a result are `ood_report`'s.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import SafetylockError
from .judges import DEFAULT_JUDGE
from .files import sha256_text, write_json
from .ood_report import asks_base, base_tokens, meets_bar, ood_markdown, reads_base, write_ood_plot
from .screen import REFUSAL_MESSAGE
from .stats import wilson

DESIGNS = ("builtin", "heads:8", "all", "all@deployed:0.05", "refusal:heads:8", "refusal:all", "refusal:all@deployed:0.05",
           "base-refuses")


@dataclass(frozen=True)
class OODSettings:
    """What one protocol run shares; everything here is pinned in the run's config."""

    model: str
    adapter: str | None
    attack: str
    system: str | None = None
    designs: tuple[str, ...] = DESIGNS
    judge: str = DEFAULT_JUDGE  # the best judge on human labels (bench/judges/HUMAN.md)
    max_new_tokens: int = 40
    batch_size: int = 8
    pairs: int = 64
    alpha: float | None = None  # None: the lock's default
    limit: int | None = None  # prompts per source's eval split; None: all of them
    fit_limit: int | None = None  # prompts per source's extract split for gates; None: all of them
    prompt_attacks: tuple[str, ...] = ()
    attack_prompts: int = 8
    verify: int = 8
    verify_design: str | None = None  # None: the first design other than builtin
    cache_dir: str | None = None  # None: OUTDIR/cache; share one across fine-tunes of the same base
    dtype: str = "auto"
    seed: int = 0


@dataclass
class _Pool:
    """Every prompt of the protocol: text, source, split, label (1 harmful), and the chat text the model sees."""

    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    refused: dict[int, int] = field(default_factory=dict)  # extract-split prompt -> 1 if the base refused it

    def where(self, *, source: str | None = None, split: str | None = None, not_source: str | None = None) -> list[int]:
        return [i for i in range(len(self.ids)) if (source is None or self.sources[i] == source)
                and (split is None or self.splits[i] == split) and (not_source is None or self.sources[i] != not_source)]


def _pool(settings: OODSettings) -> _Pool:
    from .data import OOD_BENIGN, OOD_HARMFUL, load_benchmark

    pool = _Pool()
    for names, label in ((OOD_HARMFUL, 1), (OOD_BENIGN, 0)):
        for name in names:
            for split, cap in (("extract", settings.fit_limit), ("eval", settings.limit)):
                for p in load_benchmark(name, split)[:cap]:
                    pool.ids.append(p.id)
                    pool.texts.append(p.text)
                    pool.sources.append(name)
                    pool.splits.append(split)
                    pool.labels.append(label)
    return pool


def _rate(k: int, n: int) -> dict[str, Any]:
    low, high = wilson(k, n)
    return {"k": k, "n": n, "rate": round(k / n, 4) if n else None, "ci95": [round(low, 4), round(high, 4)]}


class _Run:
    """The run directory: cached features, fold locks and replies (all under cache/, never committed)."""

    def __init__(self, outdir: Path, settings: OODSettings) -> None:
        self.outdir = outdir
        self.settings = settings
        self.cache = Path(settings.cache_dir) if settings.cache_dir else outdir / "cache"
        # Replies of the fine-tune live under its own name, so one cache serves several fine-tunes of one base.
        self.ft = "ft@" + re.sub(r"[^A-Za-z0-9._-]", "_", Path(settings.adapter).name if settings.adapter else "none")
        self.cache.mkdir(parents=True, exist_ok=True)
        identity = {k: getattr(settings, k) for k in ("model", "dtype", "system", "judge", "max_new_tokens", "pairs", "seed")}
        marker = self.cache / "base.json"
        if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) != identity:
            raise SafetylockError(f"{self.cache} caches another base or setting ({marker.read_text(encoding='utf-8').strip()}); "
                                  "give this run its own --cache-dir")
        write_json(marker, identity)
        self.started = time.perf_counter()

    def log(self, msg: str) -> None:
        print(f"[ood {time.perf_counter() - self.started:7.0f}s] {msg}", file=sys.stderr, flush=True)


def _features(run: _Run, name: str, model: Any, tokenizer: Any, chats: Sequence[str], n_template: int) -> torch.Tensor:
    """Return gate features of `chats`, reusing every row already cached for this model (keyed by chat text)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    of_base = name == "base" or name.startswith("base-")  # the base's features serve every fine-tune of it
    adapter = None if of_base else run.settings.adapter
    key = sha256_text(json.dumps([name, run.settings.model, adapter, run.settings.dtype]))[:16]
    path = run.cache / f"features-{name}-{key}.safetensors"
    rows: dict[str, torch.Tensor] = {}
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            keys = json.loads((f.metadata() or {}).get("chats", "[]"))
            x = f.get_tensor("x")
        rows = {k: x[i] for i, k in enumerate(keys)}
    want = [sha256_text(c) for c in chats]
    todo = [i for i, k in enumerate(want) if k not in rows]
    if todo:
        from .gates import template_features

        run.log(f"gate features on the {name} ({len(todo)} prompts)")
        new = template_features(model, tokenizer, [chats[i] for i in todo], n_template=n_template,
                                batch_size=run.settings.batch_size, progress=True)
        rows.update({want[i]: new[j] for j, i in enumerate(todo)})
        keys = sorted(rows)
        save_file({"x": torch.stack([rows[k] for k in keys]).contiguous()}, str(path), metadata={"chats": json.dumps(keys)})
    return torch.stack([rows[k] for k in want])


def _fold_lock(run: _Run, base: Any, tokenizer: Any, left_out: str | None) -> Any:
    """Return the lock extracted on the harmful sources other than `left_out` (cached)."""
    from .data import OOD_HARMFUL, contrast_pairs
    from .lock import Lock, extract

    s = run.settings
    sources = [b for b in OOD_HARMFUL if b != left_out]
    path = run.cache / f"lock-{'-'.join(sources)}-{s.pairs}-{s.seed}.safetensors"
    if path.is_file():
        return Lock.load(path)
    run.log(f"extracting the lock on {', '.join(sources)}")
    lock = extract(base, tokenizer, contrast_pairs(s.pairs, s.seed, sources), seed=s.seed, name=s.model)
    lock.metadata["fit_sources"] = sources
    lock.save(path)
    return lock


def _replies(run: _Run, tag: str, model: Any, tokenizer: Any, prompts: Sequence[Any], attack: str | None) -> list[dict[str, Any]]:
    """Return judged replies (evaluate's records) for `prompts`, resumable under cache/replies/TAG."""
    from .data import Prompt
    from .evaluate import RESULTS, evaluate
    from .judges import get_judge

    s = run.settings
    outdir = _replies_dir(run, tag, prompts)
    as_prompts = [Prompt(p.id, p.text) if not isinstance(p, Prompt) else p for p in prompts]
    evaluate(model, tokenizer, as_prompts, get_judge(s.judge), outdir, kind="harmful", config={"tag": tag},
             max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, system=s.system, progress=True,
             prompt_attack=attack)
    rows = {r["id"]: r for r in map(json.loads, (outdir / RESULTS).read_text(encoding="utf-8").splitlines())}
    return [rows[p.id] for p in as_prompts]


def _replies_dir(run: _Run, tag: str, prompts: Sequence[Any]) -> Path:
    return run.cache / "replies" / f"{tag}-{sha256_text(json.dumps([p.id for p in prompts]))[:8]}"


def _builtin_gate(base: Any, tokenizer: Any, lock: Any, seed: int) -> Any:
    from .data import gate_prompts
    from .lock import fit_condition

    return fit_condition(lock, base, tokenizer, *gate_prompts(64, seed), seed=seed)


def _gate_scores(design: str, pool: _Pool, fit_idx: list[int], feats: dict[str, torch.Tensor],
                 builtin: Any, seed: int) -> dict[str, np.ndarray]:
    """Return the design's scores on every pool prompt, read on the base and on the fine-tune."""

    if design == "builtin":
        return {k: builtin.scores(v) for k, v in feats.items()}
    gate = _fit(design, pool, fit_idx, feats, seed)
    return {k: gate.scores(v) for k, v in feats.items()}


def _kind_counts(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    from .judges import REPLY_KINDS, Judgment, reply_kind

    counts = dict.fromkeys(REPLY_KINDS, 0)
    for r in rows:
        counts[reply_kind(r["response"], Judgment(**r["judgment"]))] += 1
    return counts


def _cell(rows: Sequence[dict[str, Any]], harmful: bool) -> dict[str, Any]:
    """Return the rate that matters (harmful: complied; benign: refused) with its interval, and the reply kinds."""
    k = sum((not r["judgment"]["refused"]) if harmful else r["judgment"]["refused"] for r in rows)
    return {**_rate(int(k), len(rows)), "kinds": _kind_counts(rows)}


def _refusal_row(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "response": REFUSAL_MESSAGE, "judgment": {"refused": True, "score": None, "reason": "gate refusal"}}


def _compose(ft: list[dict[str, Any]], locked: list[dict[str, Any]], fired: np.ndarray, harmful: bool) -> dict[str, Any]:
    conditional = [lk if f else r for r, lk, f in zip(ft, locked, fired)]
    gate_only = [_refusal_row(r) if f else r for r, f in zip(ft, fired)]
    interventions = [lk for lk, f in zip(locked, fired) if f]
    return {"conditional": _cell(conditional, harmful), "gate-only": _cell(gate_only, harmful),
            "interventions": _kind_counts(interventions), "fired": _rate(int(fired.sum()), len(fired))}


def run_ood(settings: OODSettings, outdir: str | Path) -> dict[str, Any]:
    """Run the protocol into OUTDIR (resumable; replies cached under OUTDIR/cache); return the result."""
    from .baselines import LockDefense
    from .data import OOD_HARMFUL
    from .generate import chat_text, format_chat
    from .lock import template_token_count
    from .models import load_model
    from .prompt_attacks import get_prompt_attack

    from .gates import installed_gate, parse_design

    for design in settings.designs:
        if asks_base(design):
            base_tokens(design)
        elif design != "builtin":
            parse_design(design)
    for name in settings.prompt_attacks:
        get_prompt_attack(name)
    run = _Run(Path(outdir), settings)
    pool = _pool(settings)
    base, tokenizer = load_model(settings.model, dtype=settings.dtype)
    ft, _ = load_model(settings.model, settings.adapter, dtype=settings.dtype) if settings.adapter else (base, tokenizer)
    n_template = template_token_count(tokenizer)
    chats = [format_chat(tokenizer, t, settings.system) for t in pool.texts]
    feats = {"base": _features(run, "base", base, tokenizer, chats, n_template),
             "fine-tune": _features(run, "fine-tune", ft, tokenizer, chats, n_template)}
    if any(parse_design(d).labels == "refusal" for d in settings.designs if d != "builtin" and not asks_base(d)):
        _label_base_refusals(run, pool, base, tokenizer)
    all_lock = _fold_lock(run, base, tokenizer, None)
    builtin = _builtin_gate(base, tokenizer, all_lock, settings.seed) if "builtin" in settings.designs else None
    builtin_fit = installed_gate(builtin) if builtin is not None else None
    sources = sorted(set(pool.sources), key=pool.sources.index)
    result: dict[str, Any] = {"settings": asdict(settings), "sources": {}, "attacks": {}}
    for source in sources:
        harmful = source in OOD_HARMFUL
        fit_idx = pool.where(split="extract", not_source=source)
        eval_idx = pool.where(source=source, split="eval")
        lock = _fold_lock(run, base, tokenizer, source if harmful else None)
        prompts = [_P(pool.ids[i], pool.texts[i]) for i in eval_idx]
        run.log(f"{source}: {len(prompts)} eval prompts")
        rows = {"base": _replies(run, f"base/{source}", base, tokenizer, prompts, None),
                "fine-tune": _replies(run, f"{run.ft}/fine-tune/{source}", ft, tokenizer, prompts, None)}
        with LockDefense(lock).applied(ft, settings.alpha):
            rows["baked"] = _replies(run, f"{run.ft}/baked-{_tag(lock)}/{source}", ft, tokenizer, prompts, None)
        entry: dict[str, Any] = {"kind": "harmful" if harmful else "benign", "n": len(prompts),
                                 **{k: _cell(v, harmful) for k, v in rows.items()}, "gates": {}}
        for design in settings.designs:
            if asks_base(design):
                fired = _base_refuses(design, tokenizer, rows["base"], None)
                entry["gates"][design] = {**_compose(rows["fine-tune"], rows["baked"], fired, harmful),
                                          "fired_on_base": _rate(int(fired.sum()), len(fired)), "in_distribution": False}
                continue
            scores = _gate_scores(design, pool, fit_idx, feats, builtin_fit, settings.seed)
            fired_ft = scores["fine-tune"][eval_idx] > 0
            fired_base = scores["base"][eval_idx] > 0
            entry["gates"][design] = {**_compose(rows["fine-tune"], rows["baked"], fired_ft, harmful),
                                      "fired_on_base": _rate(int(fired_base.sum()), len(eval_idx)),
                                      "in_distribution": design == "builtin" and source in _BUILTIN_SOURCES}
            if reads_base(design):
                entry["gates"][design]["reads-base"] = _compose(rows["fine-tune"], rows["baked"], fired_base, harmful)
        result["sources"][source] = entry
        write_json(run.outdir / "ood.json", result)
    if settings.verify:
        result["verify"] = _verify(run, pool, feats, ft, tokenizer, settings)
    for name in settings.prompt_attacks:
        attack = get_prompt_attack(name)
        result["attacks"][name] = {}
        for source in [s for s in sources if s in OOD_HARMFUL]:
            idx = pool.where(source=source, split="eval")[: settings.attack_prompts]
            prompts = [_P(pool.ids[i], pool.texts[i]) for i in idx]
            lock = _fold_lock(run, base, tokenizer, source)
            attacked = [chat_text(tokenizer, attack.messages(pool.texts[i], settings.system), attack.prefill) for i in idx]
            a_feats = {model: _features(run, f"{model}-{name.replace(':', '-')}-{source}", m, tokenizer, attacked,
                                        n_template) for model, m in (("fine-tune", ft), ("base", base))}
            rows = {"base": _replies(run, f"{name}/base/{source}", base, tokenizer, prompts, name),
                    "fine-tune": _replies(run, f"{run.ft}/{name}/fine-tune/{source}", ft, tokenizer, prompts, name)}
            with LockDefense(lock).applied(ft, settings.alpha):
                rows["baked"] = _replies(run, f"{run.ft}/{name}/baked-{_tag(lock)}/{source}", ft, tokenizer, prompts, name)
            cell: dict[str, Any] = {"n": len(prompts), **{k: _cell(v, True) for k, v in rows.items()}, "gates": {}}
            fit_idx = pool.where(split="extract", not_source=source)
            for design in settings.designs:
                if asks_base(design):
                    fired = _base_refuses(design, tokenizer, rows["base"], attack)
                    cell["gates"][design] = _compose(rows["fine-tune"], rows["baked"], fired, True)
                    continue
                gate = builtin_fit if design == "builtin" else _fit(design, pool, fit_idx, feats, settings.seed)
                assert gate is not None
                fired = gate.scores(a_feats["fine-tune"]) > 0
                cell["gates"][design] = _compose(rows["fine-tune"], rows["baked"], fired, True)
                if reads_base(design):
                    fired_base = gate.scores(a_feats["base"]) > 0
                    cell["gates"][design]["reads-base"] = _compose(rows["fine-tune"], rows["baked"], fired_base, True)
            result["attacks"][name][source] = cell
            write_json(run.outdir / "ood.json", result)
    result["seconds"] = round(time.perf_counter() - run.started, 1)
    write_json(run.outdir / "ood.json", result)
    (run.outdir / "OOD.md").write_text(ood_markdown(result), encoding="utf-8")
    write_ood_plot(result, run.outdir / "ood.png", settings.verify_design)
    return result


_BUILTIN_SOURCES = ("advbench", "harmbench", "overrefusal")  # what data.gate_prompts draws on


@dataclass(frozen=True)
class _P:
    id: str
    text: str


def _tag(lock: Any) -> str:
    return sha256_text(json.dumps(lock.metadata.get("fit_sources", []))).__str__()[:10]


def _base_refuses(design: str, tokenizer: Any, base_rows: Sequence[dict[str, Any]], attack: Any) -> np.ndarray:
    """Return where the base-refusal screen fires: the base's own reply (its continuation after any prefill,
    which the runtime screen generates) opens with a refusal marker within the design's token count."""
    from .base_refusal import refusal_flags

    prefill = getattr(attack, "prefill", None) or ""
    replies = [r["response"][len(prefill):] if prefill and r["response"].startswith(prefill) else r["response"]
               for r in base_rows]
    return np.asarray(refusal_flags(tokenizer, replies, base_tokens(design)), dtype=bool)


_FIT_CACHE: dict[tuple[str, tuple[int, ...]], Any] = {}


def _fit(design: str, pool: _Pool, fit_idx: list[int], feats: dict[str, torch.Tensor], seed: int) -> Any:
    """Return the design's gate fitted on the base's features of `fit_idx`; a `@deployed:Q` threshold is then set
    on the fine-tune's features of the same benign prompts (what a deployer can run without harm labels)."""
    from .gates import fit_gate, parse_design, recalibrate

    key = (design, tuple(fit_idx))
    if key not in _FIT_CACHE:
        heads, _, threshold = design.partition("@")
        base_design = heads if threshold.startswith("deployed:") else design
        by_refusal = parse_design(design).labels == "refusal"
        labels = [pool.refused[i] if by_refusal else pool.labels[i] for i in fit_idx]
        gate = fit_gate(feats["base"][fit_idx], labels, [pool.sources[i] for i in fit_idx], base_design, seed=seed)
        if threshold.startswith("deployed:"):
            benign = [i for i in fit_idx if pool.labels[i] == 0]
            gate = recalibrate(gate, feats["fine-tune"][benign], [pool.sources[i] for i in benign],
                               float(threshold.split(":", 1)[1]))
            gate.about["design"] = design
        _FIT_CACHE[key] = gate
    return _FIT_CACHE[key]


def _label_base_refusals(run: _Run, pool: _Pool, base: Any, tokenizer: Any) -> None:
    """Label every extract-split prompt by whether the base refuses it (its judged reply, cached)."""
    for source in sorted(set(pool.sources), key=pool.sources.index):
        idx = pool.where(source=source, split="extract")
        rows = _replies(run, f"base-fit/{source}", base, tokenizer, [_P(pool.ids[i], pool.texts[i]) for i in idx], None)
        pool.refused.update({i: int(r["judgment"]["refused"]) for i, r in zip(idx, rows)})


def _verify(run: _Run, pool: _Pool, feats: dict[str, torch.Tensor], ft: Any, tokenizer: Any,
            settings: OODSettings) -> dict[str, Any]:
    """Re-run `verify` prompts per harmful source through the real conditional hooks, with the gate reading the
    fine-tune and (where the design allows) the base with the adapter off; return the agreement per reading."""
    from .lock.positions import template_token_ids
    from .baselines import LockDefense
    from .data import OOD_HARMFUL
    from .gates import with_gate

    design = settings.verify_design or next((d for d in settings.designs if d != "builtin" and not asks_base(d)), None)
    if design is None or design == "builtin" or asks_base(design):
        return {}
    readings: dict[str, Any] = {}
    for reads, feats_of in (("model", "fine-tune"), ("base", "base")):
        if reads == "base" and not (reads_base(design) and settings.adapter):
            continue
        same = total = flagged = 0
        for source in OOD_HARMFUL:
            evaluated = [_P(pool.ids[i], pool.texts[i]) for i in pool.where(source=source, split="eval")]
            idx = pool.where(source=source, split="eval")[: settings.verify]
            gate = _fit(design, pool, pool.where(split="extract", not_source=source), feats, settings.seed)
            lock = with_gate(_fold_lock(run, None, tokenizer, source), gate, _n_template(tokenizer), reads=reads,
                             template_ids=template_token_ids(tokenizer))
            prompts = [_P(pool.ids[i], pool.texts[i]) for i in idx]
            with LockDefense(lock, conditional=True).applied(ft, settings.alpha):
                real = _replies(run, f"{run.ft}/verify-{design}-{reads}-{_tag(lock)}/{source}", ft, tokenizer, prompts, None)
            fired = gate.scores(feats[feats_of][idx]) > 0
            composed = {r["id"]: r for r in _composed_rows(run, source, lock, evaluated, prompts, fired)}
            total += len(real)
            same += sum(int(r["response"] == composed[r["id"]]["response"]) for r in real)
            flagged += int(fired.sum())
        readings[reads] = {"prompts": total, "identical_replies": same, "share": round(same / max(total, 1), 4),
                           "flagged": flagged}
    return {"design": design, "readings": readings}


def _n_template(tokenizer: Any) -> int:
    from .lock import template_token_count

    return template_token_count(tokenizer)


def _composed_rows(run: _Run, source: str, lock: Any, evaluated: Sequence[_P], prompts: Sequence[_P],
                   fired: np.ndarray) -> list[dict[str, Any]]:
    """Return the composed conditional replies to `prompts` from the cached fine-tune and baked replies."""
    from .evaluate import RESULTS

    def read(tag: str) -> dict[str, dict[str, Any]]:
        path = _replies_dir(run, tag, evaluated) / RESULTS
        return {r["id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}

    ft = read(f"{run.ft}/fine-tune/{source}")
    baked = read(f"{run.ft}/baked-{_tag(lock)}/{source}")
    return [baked[p.id] if f else ft[p.id] for p, f in zip(prompts, fired)]


__all__ = ["DESIGNS", "OODSettings", "REFUSAL_MESSAGE", "meets_bar", "ood_markdown", "run_ood", "write_ood_plot"]
