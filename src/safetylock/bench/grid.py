"""The grid itself: `run_bench` measures every cell (model, attack, defense, alpha), from the cache or computed."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..baselines import DEFENSES, SELF_REMINDER
from ..errors import SafetylockError
from ..files import atomic_file, write_json
from ..repair import check_threshold
from .artifacts import cell_parts, deployment_system, prep_seconds
from .cache import FORMAT_VERSION, RunContext, artifact_key, attack_key, cache_key, cell_eval_dir, model_identity
from .report import results_markdown, write_plots
from .session import Loader, ModelSession, first_token_kl, first_token_logprobs
from .settings import DEFAULT_ALPHAS, FITTED, AttackSpec, BenchSettings, parse_attacks


def _evaluate_cell(ctx: RunContext, session: ModelSession, model: Any, system: str | None, workdir: Path,
                   label: dict[str, Any]) -> dict[str, Any]:
    """Return the metrics of one defended model: rates, accuracies, KL, tokens/s."""
    from ..data import benchmark_kind, load_benchmark
    from ..evaluate import evaluate
    from ..judges import get_judge

    s = ctx.settings
    judge = get_judge(s.judge)
    metrics: dict[str, Any] = {}
    tokens, seconds = 0, 0.0
    for name in s.benchmarks:
        kind = benchmark_kind(name)
        prompts = load_benchmark(name, "eval")[: s.limit]
        summary = evaluate(model, session.tokenizer, prompts, judge if kind in ("harmful", "benign") else None,
                           workdir / name, kind=kind, config={**label, "benchmark": name, "split": "eval"},
                           max_new_tokens=s.math_tokens if kind == "math" else s.max_new_tokens,
                           batch_size=s.batch_size, system=system, overwrite=ctx.fresh)
        key = {"harmful": "harmful_rate", "benign": "refusal_rate"}.get(kind, "accuracy")
        metrics[name] = summary[key]
        metrics[f"{name}_n"] = summary["n"]
        if kind != "choice":
            tokens += int(summary["tokens"])
            seconds += float(summary["seconds"])
    metrics["tokens_per_second"] = round(tokens / seconds, 3) if seconds > 0 else None
    return metrics


def run_bench(
    models: Sequence[str],
    attacks: Sequence[str],
    defenses: Sequence[str],
    outdir: str | Path,
    *,
    limit: int | None = None,
    alphas: Mapping[str, Sequence[float]] | None = None,
    attack_steps: Sequence[int] | None = None,
    fresh: bool = False,
    settings: BenchSettings | None = None,
    cache_dir: str | Path | None = None,
    loader: Loader | None = None,
    progress: bool = True,
    calibrate_on: str | None = None,
) -> dict[str, Any]:
    """Return the grid's results after computing every missing cell; write results.json, RESULTS.md and plots.

    `loader(spec) -> (model, tokenizer)` loads a base model (default: `load_model(spec, dtype=settings.dtype)`);
    it is called only when something under the model must be computed. `alphas` maps the swept defenses
    (safetylock, iti, refusal-direction) to their strengths; the others run once. `calibrate_on` (an attack,
    e.g. "harmful-10") picks, for each defense with a strength, the calibrated one among those swept, by
    `calibrate`'s rule on that attacked model (`bench.calibration`); its rows are marked `calibrated`.
    """
    s = settings or BenchSettings()
    if limit is not None:
        s = replace(s, limit=int(limit))
    s.check()
    if not models:
        raise SafetylockError("the bench needs at least one model")
    unknown = [d for d in defenses if d not in DEFENSES]
    if unknown or not defenses:
        raise SafetylockError(f"unknown defense '{unknown[0] if unknown else ''}'; known: {', '.join(DEFENSES)}")
    specs = parse_attacks(attacks, attack_steps)
    if calibrate_on is not None:
        parse_attacks([calibrate_on])  # a bad name fails before any cell runs
    sweep = {**DEFAULT_ALPHAS, **{k: tuple(float(a) for a in v) for k, v in (alphas or {}).items()}}
    if loader is None:
        from ..models import load_model

        def loader(spec: str) -> tuple[Any, Any]:
            return load_model(spec, dtype=s.dtype)

    outdir = Path(outdir)
    cache = Path(cache_dir) if cache_dir is not None else outdir / "cache"
    ctx = RunContext(s, cache, fresh)
    for threshold in sweep.get("safe-lora", ()):
        check_threshold(threshold)
    cells = [(m, a, d, alpha) for m in models for a in specs for d in dict.fromkeys(defenses)
             for alpha in sweep.get(d, (None,))
             if not (d == "safe-lora" and a.name == "none")]  # Safe LoRA projects an adapter; "none" has none
    rows: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cells), desc="bench", unit="cell")
    sessions = {m: ModelSession(m, loader) for m in models}
    mids = {m: model_identity(m) for m in models}
    try:
        for spec, attack, defense, alpha in cells:
            session = sessions[spec]
            rows.append(_cell(ctx, session, mids[spec], attack, defense, alpha))
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{attack.label} / {defense}" + (f" @ {alpha:g}" if alpha is not None else ""))
        calibration = _calibrations(ctx, sessions, mids, calibrate_on, defenses, sweep, rows)
    finally:
        if bar is not None:
            bar.close()
        for session in sessions.values():
            session.detach()
    _ratios(rows)
    result = {
        "format_version": FORMAT_VERSION,
        "models": list(models),
        "attacks": [a.label for a in specs],
        "defenses": list(dict.fromkeys(defenses)),
        "alphas": {d: list(sweep[d]) for d in defenses if d in sweep},
        "settings": asdict(s),
        "self_reminder": SELF_REMINDER,
        "cache_dir": str(cache),
        "computed": ctx.computed,
        "calibration": calibration,
        "rows": rows,
    }
    write_json(outdir / "results.json", result)
    with atomic_file(outdir / "RESULTS.md") as handle:
        handle.write(results_markdown(result))
    result["plots"] = [str(p) for p in write_plots(result, outdir)]
    write_json(outdir / "results.json", result)
    return result


def _calibrations(ctx: RunContext, sessions: dict[str, ModelSession], mids: dict[str, str], attack: str | None,
                  defenses: Sequence[str], sweep: dict[str, tuple[float, ...]],
                  rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Return {model: {defense: calibration}} on `attack`'s model; mark the rows at each chosen strength."""
    if attack is None:
        return {}
    from .calibration import calibrate_strength

    spec = parse_attacks([attack])[0]
    out: dict[str, dict[str, Any]] = {}
    for model, session in sessions.items():
        out[model] = {}
        for defense in dict.fromkeys(defenses):
            if defense not in sweep or (defense == "safe-lora" and spec.name == "none"):
                continue
            found = calibrate_strength(ctx, session, mids[model], spec, defense, sweep[defense])
            out[model][defense] = found
            for row in rows:
                if row["model"] == model and row["defense"] == defense:
                    row["calibrated"] = found["chosen_alpha"] is not None and row["alpha"] == found["chosen_alpha"]
    return out


def _cell(ctx: RunContext, session: ModelSession, mid: str, attack: AttackSpec, defense: str,
          alpha: float | None) -> dict[str, Any]:
    """Return one cell's row, from the cache or computed (with the adapter and artifact it needs)."""
    s = ctx.settings
    akey = attack_key(ctx, mid, attack)
    if defense in FITTED:
        dkey: Any = (defense, artifact_key(ctx, mid, defense))
    elif defense == "safety-sft":
        dkey = (defense, cache_key("safety-sft", akey, s.fit_prompts, s.sft_steps, s.sft_batch, s.sft_lr, s.seed))
    elif defense in ("base-refusal", "base-refusal-restore"):
        from ..base_refusal import BASE_REFUSAL_TOKENS
        from ..screen import REFUSAL_MESSAGE

        dkey = (defense, BASE_REFUSAL_TOKENS, REFUSAL_MESSAGE)
    else:
        dkey = (defense, SELF_REMINDER if defense == "self-reminder" else None)
    eval_inputs = {k: v for k, v in asdict(s).items() if k in ("limit", "judge", "benchmarks", "max_new_tokens",
                                                               "math_tokens", "kl_prompts")}
    ckey = cache_key("cell", mid, akey, dkey, alpha, eval_inputs)
    marker = ctx.path("cells", ckey, ".json")
    label = {"model": session.spec, "attack": attack.label, "attack_steps": attack.steps, "defense": defense,
             "alpha": alpha}
    if not ctx.stale(marker):
        return {**json.loads(marker.read_text(encoding="utf-8")), **label, "cached": True}
    adapter, artifact, model, d = cell_parts(ctx, session, mid, attack, defense)
    system = deployment_system(attack.name, d.system)
    from ..deployment import Deployment

    workdir = cell_eval_dir(ctx.cache, ckey)
    kl_to_base = _kl_reference(ctx, session)  # reads the base before any defense touches the model
    deployment = Deployment(session.spec, defense=d, alpha=alpha, model=model, tokenizer=session.tokenizer)
    with deployment as defended:
        apply_seconds = deployment.apply_seconds or 0.0
        metrics = _evaluate_cell(ctx, session, defended, system, workdir,
                                 {k: v for k, v in label.items() if k != "attack_steps"})
        metrics["kl_to_base"] = kl_to_base(defended, system)
    screening = d.describe().get("seconds_per_prompt")  # the guard's cost per screened request
    if screening is not None:
        metrics["seconds_per_prompt"] = screening
    row = {**label, **metrics, "apply_seconds": round(apply_seconds, 4), "prep_seconds": prep_seconds(defense, artifact),
           "adapter": str(adapter) if adapter else None, "artifact": str(artifact) if artifact else None, "key": ckey}
    write_json(marker, row)
    ctx.record(f"cell {session.spec} {attack.label} {defense} {alpha}", marker)
    return {**row, "cached": False}


def _kl_reference(ctx: RunContext, session: ModelSession) -> Callable[[Any, str | None], float]:
    """Return a function of (defended model, system) giving its KL to the base (the base is read now)."""
    from ..data import load_benchmark

    s = ctx.settings
    prompts = [p.text for p in load_benchmark("overrefusal", "eval")[: s.kl_prompts]]
    reference = session.reference(prompts, s.batch_size)

    def measure(model: Any, system: str | None) -> float:
        return round(first_token_kl(reference, first_token_logprobs(model, session.tokenizer, prompts, system,
                                                                    s.batch_size)), 6)

    return measure


def _ratios(rows: list[dict[str, Any]]) -> None:
    """Set each row's tokens/s ratio to the undefended cell of the same model and attack."""
    plain = {(r["model"], r["attack"]): r.get("tokens_per_second") for r in rows if r["defense"] == "none"}
    for r in rows:
        ref = plain.get((r["model"], r["attack"]))
        tps = r.get("tokens_per_second")
        r["tps_ratio"] = round(tps / ref, 3) if ref and tps else None
