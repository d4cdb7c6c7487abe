"""The comparison grid: models x attacks x defenses (x strengths), cached by content so reruns compute only what changed.

For each base model, every attack fine-tunes a LoRA adapter on it ("none" keeps the base; "NAME@STEPS" caps the
attack's optimizer steps, an attack-strength axis). Each defense's artifact is fitted once: the lock, the ITI
heads and the refusal direction on the aligned base; the safety-SFT adapter on each compromised model; RESTA's and
Safe LoRA's safety vector from the base's own harmful fine-tune (`settings.unaligned`, harmful-100); the guard's
file names the base as the guard (Safe LoRA, which projects an adapter, skips the attack "none"). Each
cell (model, attack, defense, alpha) then measures, on the eval splits: harmful rate on harmbench and advbench,
over-refusal rate on overrefusal, accuracy on gsm8k100 and bbq300, the KL divergence of the first reply token's
distribution from the base model's (benign prompts), the time to apply the defense and generation tokens/s.

Every intermediate artifact lives under the cache directory at a path named by the sha256 of its inputs (model
identity, attack, settings, data sizes, library version), so a rerun loads what exists and computes only what is
missing; `fresh=True` recomputes everything. Outputs: `results.json`, `RESULTS.md` and PNG plots (harmful rate vs
over-refusal as the strength sweeps, one curve per defense; a bar chart of the table; harmful rate vs attack steps).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .baselines import DEFENSES, ITI_ALPHA, SELF_REMINDER
from .errors import SafetylockError, check_alpha
from .evaluate import DEFAULT_TOKENS, RESULTS
from .files import atomic_file, sha256_text, write_json
from .judges import DEFAULT_JUDGE
from .lock import DEFAULT_ALPHA
from .repair import RESTA_COEF, SAFE_LORA_THRESHOLD, UNALIGNED_ATTACK, check_threshold

BENCHMARKS = ("harmbench", "advbench", "overrefusal", "gsm8k100", "bbq300")
DEFAULT_ALPHAS: dict[str, tuple[float, ...]] = {"safetylock": (DEFAULT_ALPHA,), "safetylock-conditional": (DEFAULT_ALPHA,), "iti": (ITI_ALPHA,),
                                                "refusal-direction": (1.0,), "resta": (RESTA_COEF,),
                                                "safe-lora": (SAFE_LORA_THRESHOLD,)}
SWEPT = tuple(DEFAULT_ALPHAS)
FITTED = ("safetylock", "safetylock-conditional", "iti", "refusal-direction",  # artifacts fitted on the base
          "resta", "safe-lora", "guard")  # resta / safe-lora: from the base's harmful fine-tune (settings.unaligned)
FORMAT_VERSION = 2  # 2: cells run with the attack's system prompt (AOA)
Loader = Callable[[str], tuple[Any, Any]]


@dataclass(frozen=True)
class BenchSettings:
    """What every cell shares: sample sizes, judge, decoding and the artifacts' fitting settings."""

    limit: int = 8  # prompts per benchmark (the eval split's first N)
    judge: str = DEFAULT_JUDGE
    benchmarks: tuple[str, ...] = BENCHMARKS
    max_new_tokens: int = 48  # harmful / benign replies
    math_tokens: int = DEFAULT_TOKENS["math"]  # gsm8k replies (worked answers)
    batch_size: int = 8
    kl_prompts: int = 8  # overrefusal eval prompts for the KL to the base
    pairs: int = 64  # contrast pairs for the lock and ITI
    lock_heads: int = 100_000  # every head (bench/LOCK_RESEARCH.md)
    lock_positions: str = "response:1-8"
    iti_heads: int = 48
    fit_prompts: int = 64  # harmful and harmless extract prompts for the refusal direction; harmful ones for SFT
    sft_steps: int = 10
    sft_batch: int = 5
    sft_lr: float = 2e-4
    dtype: str = "auto"
    seed: int = 0
    unaligned: str = UNALIGNED_ATTACK  # the harmful fine-tune of the base whose update resta and safe-lora reverse

    def check(self) -> None:
        for key in ("limit", "max_new_tokens", "math_tokens", "batch_size", "kl_prompts", "pairs", "lock_heads",
                    "iti_heads", "fit_prompts", "sft_steps", "sft_batch"):
            if int(getattr(self, key)) < 1:
                raise SafetylockError(f"{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        if unknown:
            raise SafetylockError(f"unknown benchmark '{unknown[0]}' for the bench; use some of {', '.join(BENCHMARKS)}")
        if parse_attacks([self.unaligned])[0].name == "none":
            raise SafetylockError("the bench's unaligned model must be a harmful fine-tune, not 'none'")


# ---------------------------------------------------------------------------------------------------------
# Names and keys


@dataclass(frozen=True)
class AttackSpec:
    """An attack name with an optional cap on its optimizer steps ("harmful-10@5")."""

    name: str
    steps: int | None = None

    @property
    def label(self) -> str:
        return self.name if self.steps is None else f"{self.name}@{self.steps}"


def parse_attacks(attacks: Sequence[str], attack_steps: Sequence[int] | None = None) -> list[AttackSpec]:
    """Return attack specs from names like "harmful-10" or "harmful-10@5"; `attack_steps` expands bare names."""
    from .attack import get_attack

    out: list[AttackSpec] = []
    for raw in attacks:
        name, _, steps = raw.strip().partition("@")
        if name != "none":
            get_attack(name)
        if steps:
            if name == "none" or not steps.isdigit() or int(steps) < 1:
                raise SafetylockError(f"bad attack '{raw}'; write NAME or NAME@STEPS with STEPS >= 1")
            out.append(AttackSpec(name, int(steps)))
        elif attack_steps and name != "none":
            out += [AttackSpec(name, int(s)) for s in attack_steps]
        else:
            out.append(AttackSpec(name))
    if not out:
        raise SafetylockError("the bench needs at least one attack (or 'none')")
    bad = [s for s in (attack_steps or []) if int(s) < 1]
    if bad:
        raise SafetylockError(f"attack steps must be at least 1, got {bad[0]}")
    return list(dict.fromkeys(out))


def parse_alphas(items: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """Return {defense: strengths} from "DEFENSE=A,B,C" items."""
    out: dict[str, tuple[float, ...]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or name not in SWEPT:
            raise SafetylockError(f"bad --alphas '{item}'; write DEFENSE=A,B,... with DEFENSE one of {', '.join(SWEPT)}")
        out[name] = tuple(check_alpha(v.strip(), f"every strength of --alphas '{item}'")
                          for v in values.split(",") if v.strip())
        if not out[name]:
            raise SafetylockError(f"bad --alphas '{item}': give at least one number")
    return out


def model_identity(spec: str) -> str:
    """Return a cheap content identity of a model spec: config + weight file names and sizes, or the spec itself."""
    path = Path(spec).expanduser()
    if path.is_dir():
        parts = [f.read_text(encoding="utf-8") for f in sorted(path.glob("*.json")) if f.name in ("config.json",)]
        parts += [f"{f.name}:{f.stat().st_size}" for f in sorted(path.iterdir())
                  if f.suffix in (".safetensors", ".bin", ".gguf")]
        return sha256_text(str(path.resolve()), *parts)
    if path.is_file():
        return sha256_text(str(path.resolve()), str(path.stat().st_size))
    return sha256_text(spec)


def _key(*parts: Any) -> str:
    from . import __version__

    return sha256_text(__version__, str(FORMAT_VERSION), *(json.dumps(p, sort_keys=True, default=str) for p in parts))[:24]


# ---------------------------------------------------------------------------------------------------------
# Models, loaded only when a cell needs computing


class _Session:
    """One base model: loaded on first use; attack adapters attached one at a time; base logits for the KL."""

    def __init__(self, spec: str, loader: Loader) -> None:
        self.spec = spec
        self.loader = loader
        self._base: Any = None
        self.tokenizer: Any = None
        self.attached: tuple[str, Any] | None = None  # (adapter dir, wrapped model)
        self._reference: Any = None

    @property
    def base(self) -> Any:
        if self._base is None:
            self._base, self.tokenizer = self.loader(self.spec)
            self._base.safetylock_spec = self.spec
        return self._base

    def plain(self) -> Any:
        """Return the base with no adapter attached."""
        self.detach()
        return self.base

    def compromised(self, adapter: Path | None) -> Any:
        """Return the base with `adapter` attached (the base itself for None)."""
        if adapter is None:
            return self.plain()
        if self.attached is not None and self.attached[0] == str(adapter):
            return self.attached[1]
        from .models import attach_adapter

        base = self.plain()
        wrapped = attach_adapter(base, adapter)
        wrapped.eval()
        self.attached = (str(adapter), wrapped)
        return wrapped

    def detach(self) -> None:
        if self.attached is not None:
            self._base = self.attached[1].unload()
            self._base.eval()
            self.attached = None

    def reference(self, prompts: Sequence[str], batch_size: int) -> Any:
        """Return the base's first-reply-token log-probabilities on `prompts` (no adapter, no defense)."""
        if self._reference is None:
            model = self.base if self.attached is None else self.attached[1]
            ctx = self.attached[1].disable_adapter() if self.attached is not None else contextlib.nullcontext()
            with ctx:
                self._reference = first_token_logprobs(model, self.tokenizer, prompts, None, batch_size)
        return self._reference


def first_token_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str], system: str | None,
                         batch_size: int = 8) -> Any:
    """Return (prompts, vocab) float32 log-probabilities of the reply's first token."""
    import torch

    from .generate import format_chat, model_device

    texts = [format_chat(tokenizer, p, system) for p in prompts]
    tokenizer.padding_side = "left"
    rows = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model(**{k: v.to(model_device(model)) for k, v in enc.items()}, logits_to_keep=1).logits[:, -1, :]
        rows.append(torch.log_softmax(out.float(), dim=-1).cpu())
    return torch.cat(rows)


def first_token_kl(reference: Any, logprobs: Any) -> float:
    """Return the mean KL(reference || model) of first-reply-token distributions."""
    import torch

    p = reference.exp()
    # A forced reply (guard) puts -inf on all but one token: inf, not NaN where p underflowed to 0.
    return float(torch.where(p > 0, p * (reference - logprobs), 0.0).sum(-1).mean())


# ---------------------------------------------------------------------------------------------------------
# The grid


@dataclass
class _Context:
    settings: BenchSettings
    cache: Path
    fresh: bool
    computed: list[str] = field(default_factory=list)
    done_this_run: set[str] = field(default_factory=set)
    data_hashes: dict[tuple[str, int], str] = field(default_factory=dict)  # (attack, seed): its data's hash

    def path(self, kind: str, key: str, suffix: str = "") -> Path:
        return self.cache / kind / f"{key}{suffix}"

    def stale(self, marker: Path) -> bool:
        """Return whether the artifact whose completion `marker` records must be computed."""
        if str(marker) in self.done_this_run:
            return False
        return self.fresh or not marker.exists()

    def record(self, what: str, marker: Path) -> None:
        self.computed.append(what)
        self.done_this_run.add(str(marker))


def _harmful_texts(n: int) -> list[str]:
    from .data import harmful_prompts

    return [p.text for p in harmful_prompts("extract")][:n]


def _harmless_texts(n: int) -> list[str]:
    from .data import harmless_prompts

    return [p.text for p in harmless_prompts("extract")][:n]


def _pairs(n: int, seed: int) -> list[tuple[str, str, str]]:
    from .data import contrast_pairs

    return contrast_pairs(n, seed=seed)


def _adapter(ctx: _Context, session: _Session, attack: AttackSpec, akey: str) -> Path | None:
    """Return the adapter dir of the attack whose key is `akey` (None for "none"), fine-tuning if the cache lacks it."""
    s = ctx.settings
    if attack.name == "none":
        return None
    where = ctx.path("adapters", akey)
    if ctx.stale(where / "result.json"):
        from .attack import finetune

        base = session.plain()
        finetune(base, session.tokenizer, attack.name, where, steps=attack.steps, seed=s.seed, overwrite=ctx.fresh,
                 progress=True)
        ctx.record(f"adapter {session.spec} {attack.label}", where / "result.json")
    return where


def _attack_key(ctx: _Context, mid: str, attack: AttackSpec) -> str:
    """Return the key of an attacked model: base identity, attack, strength, seed, dtype, its data and defaults."""
    s = ctx.settings
    if attack.name == "none":
        return _key("attack", mid, "none", s.seed, s.dtype)
    from .attack import attack_data, data_hash, get_attack

    spec = get_attack(attack.name)
    # Building an attack's data reads benchmark files: once per run and attack, not once per grid cell.
    if (attack.name, s.seed) not in ctx.data_hashes:
        ctx.data_hashes[attack.name, s.seed] = data_hash(attack_data(attack.name, s.seed))
    return _key("attack", mid, attack.name, attack.steps, s.seed, s.dtype, asdict(spec.defaults), spec.system,
                ctx.data_hashes[attack.name, s.seed])


def _base_artifact(ctx: _Context, session: _Session, mid: str, defense: str) -> tuple[Path, str]:
    """Return (artifact path, key) of a defense fitted on the base (lock, ITI heads, refusal direction)."""
    if defense == "gate-refusal":  # the conditional lock's own gate, so one artifact serves both
        return _base_artifact(ctx, session, mid, "safetylock-conditional")
    s = ctx.settings
    key = _artifact_key(ctx, mid, defense)
    where = ctx.path("artifacts", f"{defense}-{key}", ".safetensors")
    if ctx.stale(where):
        from .baselines import fit_iti, fit_refusal_direction
        from .lock import extract

        base = session.plain()
        start = time.perf_counter()
        if defense == "safetylock":
            artifact: Any = extract(base, session.tokenizer, _pairs(s.pairs, s.seed), heads=s.lock_heads,
                                    positions=s.lock_positions, seed=s.seed, name=session.spec)
        elif defense == "safetylock-conditional":  # the plain lock (reused from the cache) + a harmfulness probe
            from .lock import Lock, fit_condition

            plain, _ = _base_artifact(ctx, session, mid, "safetylock")
            start = time.perf_counter()
            from .data import gate_prompts

            artifact = fit_condition(Lock.load(plain), base, session.tokenizer, *gate_prompts(s.fit_prompts, s.seed),
                                     seed=s.seed)
        elif defense == "iti":
            artifact = fit_iti(base, session.tokenizer, _pairs(s.pairs, s.seed), heads=s.iti_heads, seed=s.seed,
                               name=session.spec)
        elif defense in ("resta", "safe-lora"):  # V reverses the base's harmful fine-tune (trained or cached)
            from .repair import fit_resta, fit_safe_lora

            harmful = parse_attacks([s.unaligned])[0]
            adapter = _adapter(ctx, session, harmful, _attack_key(ctx, mid, harmful))
            assert adapter is not None
            start = time.perf_counter()
            artifact = (fit_resta if defense == "resta" else fit_safe_lora)(session.compromised(adapter),
                                                                             name=session.spec)
            train = json.loads((adapter / "result.json").read_text(encoding="utf-8")).get("seconds")
            artifact.metadata["unaligned"] = {"attack": harmful.label, "adapter": str(adapter), "train_seconds": train}
        elif defense == "guard":  # the base screens prompts, so its file names the base
            from .guard import fit_guard

            artifact = fit_guard(base, session.tokenizer, spec=session.spec, dtype=s.dtype)
        else:
            artifact = fit_refusal_direction(base, session.tokenizer, _harmful_texts(s.fit_prompts),
                                             _harmless_texts(s.fit_prompts), seed=s.seed, name=session.spec)
        artifact.metadata["fit_seconds"] = round(time.perf_counter() - start, 3)
        artifact.save(where)
        ctx.record(f"{defense} {session.spec}", where)
    return where, key


def _sft_artifact(ctx: _Context, session: _Session, adapter: Path | None, akey: str) -> tuple[Path, str]:
    s = ctx.settings
    key = _key("safety-sft", akey, s.fit_prompts, s.sft_steps, s.sft_batch, s.sft_lr, s.seed)
    where = ctx.path("artifacts", f"safety-sft-{key}")
    from .baselines import SFT_MARKER, train_safety_sft

    if ctx.stale(where / SFT_MARKER):
        model = session.compromised(adapter)
        train_safety_sft(model, session.tokenizer, where, _harmful_texts(s.fit_prompts), steps=s.sft_steps,
                         batch_size=s.sft_batch, lr=s.sft_lr, seed=s.seed, overwrite=ctx.fresh, progress=True)
        ctx.record(f"safety-sft {session.spec} {akey}", where / SFT_MARKER)
    return where, key


def _defense(name: str, artifact: Path | None, session: _Session | None = None) -> Any:
    from .baselines import make_defense

    if name == "gate-refusal" and session is not None:
        from .baselines import GateRefusal
        from .lock import Lock

        assert artifact is not None
        return GateRefusal(Lock.load(artifact), tokenizer=session.tokenizer)
    if name == "guard" and session is not None:  # the guard loads through the bench's loader
        from .guard import GuardDefense

        assert artifact is not None
        return GuardDefense.load(artifact, tokenizer=session.tokenizer, loader=session.loader)
    return make_defense(name, artifact)


def _prep_seconds(name: str, artifact: Path | None) -> float | None:
    """Return how long fitting the defense's artifact took (None for defenses without one)."""
    if artifact is None:
        return None
    if name == "safety-sft":
        return float(json.loads((artifact / "safety_sft.json").read_text(encoding="utf-8"))["seconds"])
    from safetensors import safe_open

    with safe_open(str(artifact), framework="pt") as handle:
        meta = json.loads((handle.metadata() or {}).get("safetylock", "{}"))
    value = meta.get("fit_seconds")
    train = (meta.get("unaligned") or {}).get("train_seconds") or 0.0  # resta / safe-lora: the harmful fine-tune
    return float(value) + float(train) if value is not None else None


def _evaluate_cell(ctx: _Context, session: _Session, model: Any, system: str | None, workdir: Path,
                   label: dict[str, Any]) -> dict[str, Any]:
    """Return the metrics of one defended model: rates, accuracies, KL, tokens/s."""
    from .data import benchmark_kind, load_benchmark
    from .evaluate import evaluate
    from .judges import get_judge

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
    alphas: dict[str, Sequence[float]] | None = None,
    attack_steps: Sequence[int] | None = None,
    fresh: bool = False,
    settings: BenchSettings | None = None,
    cache_dir: str | Path | None = None,
    loader: Loader | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Return the grid's results after computing every missing cell; write results.json, RESULTS.md and plots.

    `loader(spec) -> (model, tokenizer)` loads a base model (default: `load_model(spec, dtype=settings.dtype)`);
    it is called only when something under the model must be computed. `alphas` maps the swept defenses
    (safetylock, iti, refusal-direction) to their strengths; the others run once.
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
    sweep = {**DEFAULT_ALPHAS, **{k: tuple(float(a) for a in v) for k, v in (alphas or {}).items()}}
    if loader is None:
        from .models import load_model

        def loader(spec: str) -> tuple[Any, Any]:
            return load_model(spec, dtype=s.dtype)

    outdir = Path(outdir)
    cache = Path(cache_dir) if cache_dir is not None else outdir / "cache"
    ctx = _Context(s, cache, fresh)
    for threshold in sweep.get("safe-lora", ()):
        check_threshold(threshold)
    cells = [(m, a, d, alpha) for m in models for a in specs for d in dict.fromkeys(defenses)
             for alpha in (sweep[d] if d in SWEPT else (None,))
             if not (d == "safe-lora" and a.name == "none")]  # Safe LoRA projects an adapter; "none" has none
    rows: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cells), desc="bench", unit="cell")
    sessions = {m: _Session(m, loader) for m in models}
    mids = {m: model_identity(m) for m in models}
    try:
        for spec, attack, defense, alpha in cells:
            session = sessions[spec]
            rows.append(_cell(ctx, session, mids[spec], attack, defense, alpha))
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{attack.label} / {defense}" + (f" @ {alpha:g}" if alpha is not None else ""))
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
        "alphas": {d: list(sweep[d]) for d in defenses if d in SWEPT},
        "settings": asdict(s),
        "self_reminder": SELF_REMINDER,
        "cache_dir": str(cache),
        "computed": ctx.computed,
        "rows": rows,
    }
    write_json(outdir / "results.json", result)
    with atomic_file(outdir / "RESULTS.md") as handle:
        handle.write(results_markdown(result))
    result["plots"] = [str(p) for p in write_plots(result, outdir)]
    write_json(outdir / "results.json", result)
    return result


def _cell(ctx: _Context, session: _Session, mid: str, attack: AttackSpec, defense: str, alpha: float | None) -> dict[str, Any]:
    """Return one cell's row, from the cache or computed (with the adapter and artifact it needs)."""
    s = ctx.settings
    akey = _attack_key(ctx, mid, attack)
    if defense in FITTED:
        dkey: Any = (defense, _artifact_key(ctx, mid, defense))
    elif defense == "safety-sft":
        dkey = (defense, _key("safety-sft", akey, s.fit_prompts, s.sft_steps, s.sft_batch, s.sft_lr, s.seed))
    else:
        dkey = (defense, SELF_REMINDER if defense == "self-reminder" else None)
    eval_inputs = {k: v for k, v in asdict(s).items() if k in ("limit", "judge", "benchmarks", "max_new_tokens",
                                                               "math_tokens", "kl_prompts")}
    ckey = _key("cell", mid, akey, dkey, alpha, eval_inputs)
    marker = ctx.path("cells", ckey, ".json")
    label = {"model": session.spec, "attack": attack.label, "attack_steps": attack.steps, "defense": defense,
             "alpha": alpha}
    if not ctx.stale(marker):
        return {**json.loads(marker.read_text(encoding="utf-8")), **label, "cached": True}
    adapter = _adapter(ctx, session, attack, akey)
    artifact: Path | None = None
    if defense in FITTED:
        artifact, _ = _base_artifact(ctx, session, mid, defense)
    elif defense == "safety-sft":
        artifact, _ = _sft_artifact(ctx, session, adapter, akey)
    model = session.compromised(adapter)
    d = _defense(defense, artifact, session)
    system = deployment_system(attack.name, d.system)
    from .deployment import Deployment

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
    row = {**label, **metrics, "apply_seconds": round(apply_seconds, 4), "prep_seconds": _prep_seconds(defense, artifact),
           "adapter": str(adapter) if adapter else None, "artifact": str(artifact) if artifact else None, "key": ckey}
    write_json(marker, row)
    ctx.record(f"cell {session.spec} {attack.label} {defense} {alpha}", marker)
    return {**row, "cached": False}


def cell_eval_dir(cache_dir: str | Path, key: str) -> Path:
    """Return the directory of one cell's evaluation runs under the cache: one `evaluate` OUTDIR per benchmark."""
    return Path(cache_dir) / "evals" / key


def cell_records(result: dict[str, Any], row: dict[str, Any], benchmark: str) -> list[dict[str, Any]] | None:
    """Return the per-prompt records (prompt, response, judgment, ...) one cell of `result` cached for `benchmark`.

    `result` is a grid's results.json, `row` one of its rows; None when the cache lacks that run. A torn last
    line (a crash mid-write, which the next run regenerates) is skipped.
    """
    path = cell_eval_dir(result["cache_dir"], row["key"]) / benchmark / RESULTS
    if not path.is_file():
        return None
    records: list[Any] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return [r for r in records if isinstance(r, dict)]


def deployment_system(attack: str, defense_system: str | None) -> str | None:
    """Return the system prompt a cell runs with: the attack's own (AOA's identity prompt), then the defense's."""
    from .attack import get_attack

    parts = [get_attack(attack).system if attack != "none" else None, defense_system]
    text = "\n\n".join(p for p in parts if p)
    return text or None


def _artifact_key(ctx: _Context, mid: str, defense: str) -> str:
    s = ctx.settings
    if defense == "safetylock":
        inputs: tuple[Any, ...] = (s.pairs, s.lock_heads, s.lock_positions, s.seed)
    elif defense in ("safetylock-conditional", "gate-refusal"):
        inputs = (s.pairs, s.lock_heads, s.lock_positions, s.fit_prompts, s.seed)
    elif defense == "iti":
        inputs = (s.pairs, s.iti_heads, s.seed)
    elif defense in ("resta", "safe-lora"):
        inputs = (_attack_key(ctx, mid, parse_attacks([s.unaligned])[0]), RESTA_COEF, SAFE_LORA_THRESHOLD)
    elif defense == "guard":
        from .guard import GUARD_QUESTION
        from .screen import REFUSAL_MESSAGE

        inputs = (GUARD_QUESTION, REFUSAL_MESSAGE)
    else:
        inputs = (s.fit_prompts, s.seed)
    return _key(defense, mid, s.dtype, *inputs)


def _kl_reference(ctx: _Context, session: _Session) -> Callable[[Any, str | None], float]:
    """Return a function of (defended model, system) giving its KL to the base (the base is read now)."""
    from .data import load_benchmark

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


# ---------------------------------------------------------------------------------------------------------
# Reports


COLUMNS = (("attack", "attack"), ("defense", "defense"), ("alpha", "alpha"), ("harmbench", "harmful harmbench"),
           ("advbench", "harmful advbench"), ("overrefusal", "over-refusal"), ("gsm8k100", "gsm8k100"),
           ("bbq300", "bbq300"), ("kl_to_base", "KL to base"), ("apply_seconds", "apply s"),
           ("prep_seconds", "fit/train s"), ("tps_ratio", "tokens/s ratio"), ("seconds_per_prompt", "screen s/prompt"))


def _cell_text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.3f}".rstrip("0").rstrip(".") or "0"
    return str(value)


def results_markdown(result: dict[str, Any]) -> str:
    """Return RESULTS.md: settings, then one table per model (rows: attack x defense x alpha)."""
    s = result["settings"]
    lines = ["# safetylock bench", "",
             f"Eval splits, first {s['limit']} prompts of each benchmark; judge `{s['judge']}`; greedy, "
             f"{s['max_new_tokens']} new tokens ({s['math_tokens']} for gsm8k100). Harmful and over-refusal are rates "
             "(lower is better), gsm8k100 and bbq300 accuracies. KL to base: mean KL(base || defended) of the first "
             f"reply token over {s['kl_prompts']} overrefusal eval prompts. apply s: time to apply the defense to a "
             "loaded model; fit/train s: time to fit its artifact (once per base, or per attacked model for "
             "safety-sft; resta and safe-lora include training the base's harmful fine-tune). tokens/s ratio: "
             "generation throughput relative to the undefended model. screen s/prompt: the guard's time per screened "
             "prompt (KL to base is inf where it refuses a KL prompt: the fixed reply has one possible token).", "",
             f"Self-reminder system prompt: \"{result['self_reminder']}\"", ""]
    used = [(k, h) for k, h in COLUMNS if k in ("attack", "defense") or any(r.get(k) is not None for r in result["rows"])]
    for model in result["models"]:
        lines += [f"## {model}", "", "| " + " | ".join(h for _, h in used) + " |", "|" + "---|" * len(used)]
        for r in (r for r in result["rows"] if r["model"] == model):
            lines.append("| " + " | ".join(_cell_text(r.get(k)) for k, _ in used) + " |")
        lines.append("")
    from .judges import accuracy_line

    lines.append(accuracy_line(s["judge"]))
    if result.get("computed") is not None:
        lines.append(f"Computed this run: {len(result['computed'])} item(s); cache: `{result['cache_dir']}`.")
    return "\n".join(lines) + "\n"


def _harm(row: dict[str, Any]) -> float | None:
    values = [row[k] for k in ("harmbench", "advbench") if row.get(k) is not None]
    return sum(values) / len(values) if values else None


def _default_row(rows: list[dict[str, Any]], defense: str) -> dict[str, Any] | None:
    """Return the row of a defense at its default strength (or its first strength)."""
    mine = [r for r in rows if r["defense"] == defense]
    if not mine:
        return None
    want = DEFAULT_ALPHAS.get(defense, (None,))[0]
    return next((r for r in mine if r.get("alpha") == want), mine[0])


def write_plots(result: dict[str, Any], outdir: Path) -> list[Path]:
    """Write the trade-off curves, the bar chart and (with several attack steps) the attack-strength plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    models, attacks = result["models"], result["attacks"]
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = outdir / name
        with atomic_file(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=110)
        plt.close(fig)
        written.append(path)

    fig, axes = plt.subplots(len(models), len(attacks), figsize=(4.2 * len(attacks), 3.6 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, attack in enumerate(attacks):
            ax = axes[i][j]
            cell = [r for r in rows if r["model"] == model and r["attack"] == attack]
            for defense in result["defenses"]:
                pts = sorted(((r.get("overrefusal"), _harm(r), r.get("alpha")) for r in cell if r["defense"] == defense),
                             key=lambda p: (p[2] is None, p[2] or 0))
                pts = [p for p in pts if p[0] is not None and p[1] is not None]
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=defense)
                for x, y, a in pts:
                    if a is not None and len(pts) > 1:
                        ax.annotate(f"{a:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel("over-refusal rate")
            ax.set_ylabel("harmful rate")
            ax.set_xlim(-0.05, 1.05)
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(f"{Path(model).name[:28]} / {attack}", fontsize=9)
            ax.legend(fontsize=7)
    save(fig, "tradeoff.png")

    metrics = [k for k in ("harmbench", "advbench", "overrefusal", "gsm8k100", "bbq300") if any(r.get(k) is not None for r in rows)]
    picked = [(m, a, r) for m in models for a in attacks
              for d in result["defenses"]
              if (r := _default_row([x for x in rows if x["model"] == m and x["attack"] == a], d)) is not None]
    if metrics and picked:
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(picked) * len(metrics) / 2), 4))
        width = 0.8 / len(metrics)
        for k, metric in enumerate(metrics):
            ax.bar([i + k * width for i in range(len(picked))], [r.get(metric) or 0 for _, _, r in picked], width,
                   label=metric)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(picked))])
        ax.set_xticklabels([f"{a}\n{r['defense']}" + ("" if len(models) == 1 else f"\n{Path(m).name[:12]}")
                            for m, a, r in picked], fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("rate / accuracy")
        ax.legend(fontsize=7, ncol=len(metrics))
        save(fig, "bars.png")

    strengths = {r["attack_steps"] for r in rows if r.get("attack_steps") is not None}
    if len(strengths) > 1:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        names = sorted({r["attack"].partition("@")[0] for r in rows if r.get("attack_steps") is not None})
        for model in models:
            for name in names:
                for defense in result["defenses"]:
                    pts = []
                    for steps in sorted(strengths):
                        mine = [r for r in rows if r["model"] == model and r["attack"] == f"{name}@{steps}"]
                        r = _default_row(mine, defense)
                        if r is not None and _harm(r) is not None:
                            pts.append((steps, _harm(r)))
                    if pts:
                        label = defense + ("" if len(names) == 1 else f" ({name})")
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xlabel("attack optimizer steps")
        ax.set_ylabel("harmful rate")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=7)
        save(fig, "attack_strength.png")
    return written


__all__ = ["BENCHMARKS", "BenchSettings", "DEFAULT_ALPHAS", "cell_eval_dir", "cell_records", "deployment_system",
           "parse_alphas", "parse_attacks", "results_markdown", "run_bench", "write_plots"]
