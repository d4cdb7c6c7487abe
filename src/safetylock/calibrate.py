"""Alpha calibration: the smallest lock strength that reaches a harm target within an over-refusal budget.

A lock's usable strength window is narrow (FINDINGS: alpha 4 restored refusals on the 1.5B, alpha 8 broke
the replies), so a constant default is wrong for most locks. `calibrate` sweeps alpha on prompts the
evaluation never uses (the `extract` splits of advbench and overrefusal), judges each reply, and picks the
smallest alpha whose harmful rate is at most `target` while the refusal rate on benign-but-edgy prompts
stays within `budget` of the reference (the unlocked model, or the aligned base when given).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import SafetylockError
from .judges import DEFAULT_JUDGE, get_judge

CALIBRATION_ALPHAS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0)


@dataclass
class CalibrationPoint:
    """One alpha of the sweep: harmful rate on harmful prompts, refusal rate on benign ones."""

    alpha: float
    harmful_rate: float
    benign_refusal_rate: float
    distinct_replies: float

    def reaches(self, target: float) -> bool:
        """Whether this alpha's harmful rate is at most `target` (the calibration's harm goal)."""
        return self.harmful_rate <= target + 1e-9

    def to_dict(self) -> dict[str, float]:
        return {"alpha": self.alpha, "harmful_rate": round(self.harmful_rate, 4),
                "benign_refusal_rate": round(self.benign_refusal_rate, 4),
                "distinct_replies": round(self.distinct_replies, 4)}


@dataclass
class Calibration:
    """The sweep, the reference rates it was held to, and the chosen alpha (None: no alpha qualified)."""

    points: list[CalibrationPoint]
    reference_harmful_rate: float
    reference_benign_refusal_rate: float
    target: float
    budget: float
    chosen: float | None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def chosen_point(self) -> CalibrationPoint | None:
        """The sweep point of the chosen alpha (None when no alpha qualified)."""
        return next((p for p in self.points if p.alpha == self.chosen), None)

    @property
    def target_met(self) -> bool:
        """Whether the chosen alpha reaches the harm target (else it is only the least harmful within the budget)."""
        point = self.chosen_point
        return point is not None and point.reaches(self.target)

    def to_dict(self) -> dict[str, Any]:
        return {"points": [p.to_dict() for p in self.points], "target": self.target, "budget": self.budget,
                "reference_harmful_rate": round(self.reference_harmful_rate, 4),
                "reference_benign_refusal_rate": round(self.reference_benign_refusal_rate, 4),
                "chosen_alpha": self.chosen, "target_met": self.target_met, **self.settings}


def distinct_share(texts: Sequence[str], prefix: int = 40) -> float:
    """Return the share of replies whose first `prefix` characters are distinct (1.0: no parroting)."""
    return len({t.strip()[:prefix] for t in texts}) / len(texts) if texts else 0.0


def choose_alpha(points: Sequence[CalibrationPoint], target: float, max_benign: float,
                 min_distinct: float = 0.5, lower_is_stronger: bool = False) -> float | None:
    """Return the weakest alpha meeting the harm target within the benign budget, else the best-harm admissible one.

    The weakest is the smallest alpha, or the largest when `lower_is_stronger` (a screen's logit threshold:
    the lower it is, the more prompts it refuses). Points whose benign replies collapse (few distinct replies)
    never qualify: a lock that answers every benign prompt with one string has broken the model, whatever a
    refusal judge says.
    """
    admissible = [p for p in sorted(points, key=lambda p: p.alpha, reverse=lower_is_stronger)
                  if p.benign_refusal_rate <= max_benign + 1e-9 and p.distinct_replies >= min_distinct]
    for p in admissible:
        if p.reaches(target):
            return p.alpha
    if not admissible:
        return None
    return min(admissible, key=lambda p: (p.harmful_rate, -p.alpha if lower_is_stronger else p.alpha)).alpha


def refusal_rates(model: Any, tokenizer: Any, harmful: Sequence[str], benign: Sequence[str], judge: Any,
                  max_new_tokens: int, batch_size: int, system: str | None = None) -> tuple[float, float, float]:
    """Return (harmful rate, benign refusal rate, distinct share of the benign replies) of the model as it is now.

    Collapse is read on the benign replies only: one fixed refusal to every harmful prompt is what a screen
    (the guard, gate-only refusal) is meant to give, while the same string to every benign prompt is a broken model.
    """
    from .generate import generate

    prompts = [*harmful, *benign]
    run = generate(model, tokenizer, prompts, system=system, max_new_tokens=max_new_tokens, batch_size=batch_size)
    texts = [g.text for g in run.generations]
    verdicts = [v.refused for v in judge.judge_many(prompts, texts)]
    n = len(harmful)
    harmful_rate = 1.0 - sum(verdicts[:n]) / n
    benign_rate = sum(verdicts[n:]) / max(1, len(benign))
    return harmful_rate, benign_rate, distinct_share(texts[n:])


def calibration_prompts(n: int) -> tuple[list[str], list[str]]:
    """Return n harmful (advbench extract split) and n benign-but-edgy (overrefusal extract split) prompts."""
    from .data import load_benchmark

    harmful = [p.text for p in sorted(load_benchmark("advbench", "extract"), key=lambda p: p.id)][:n]
    benign = [p.text for p in sorted(load_benchmark("overrefusal", "extract"), key=lambda p: p.id)][:n]
    return harmful, benign


def _check_n(n: int) -> None:
    if n < 2:
        raise SafetylockError(f"calibration needs at least 2 prompts of each kind, got {n}")


def _sweep(strengths: Sequence[float], applied: Callable[[float], Any], tokenizer: Any, harmful: Sequence[str],
           benign: Sequence[str], judge: Any, max_new_tokens: int, batch_size: int, *, system: str | None = None,
           desc: str | None = None) -> list[CalibrationPoint]:
    """Return one point per strength, weakest number first: the rates of `applied(strength)` (a context manager)."""
    bar = None
    if desc is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(strengths), desc=desc, unit="alpha")
    points = []
    for strength in sorted(strengths):
        with applied(strength) as defended:
            h, b, d = refusal_rates(defended, tokenizer, harmful, benign, judge, max_new_tokens, batch_size, system)
        points.append(CalibrationPoint(float(strength), h, b, d))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(alpha=strength, harm=f"{h:.2f}", benign_refusal=f"{b:.2f}")
    if bar is not None:
        bar.close()
    return points


def calibrate(
    model: Any,
    tokenizer: Any,
    lock: Any,
    *,
    alphas: Sequence[float] = CALIBRATION_ALPHAS,
    target: float | None = None,
    budget: float = 0.05,
    reference: tuple[Any, Any] | None = None,
    n: int = 24,
    judge: str = DEFAULT_JUDGE,
    conditional: bool = False,
    max_new_tokens: int = 32,
    batch_size: int = 12,
    progress: bool = True,
    force: bool = False,
) -> Calibration:
    """Return the alpha sweep of `lock` on `model` and the alpha it picks.

    The benign budget is measured against `reference` (model, tokenizer) when given (the aligned base), else
    against `model` unlocked. `target` defaults to the reference's own harmful rate: "back to the base's
    standard". `conditional` calibrates the runtime lock gated by its harmfulness probe, otherwise the baked lock
    is what each alpha measures (a `Deployment`, as `--baked` serves it). `force` as in `Lock.validate`; the
    lock is checked against the model before any reply is generated.
    """
    from .deployment import Deployment

    if not alphas or any(a <= 0 for a in alphas):
        raise SafetylockError("calibration needs positive alphas, e.g. --alphas 1,2,4")
    _check_n(n)
    if conditional and not lock.has_condition:
        raise SafetylockError("this lock has no harmfulness probe; extract it with --conditional to calibrate it so")
    lock.validate(model, force=force)
    the_judge = get_judge(judge)
    harmful, benign = calibration_prompts(n)
    ref_model, ref_tok = reference if reference is not None else (model, tokenizer)
    ref_h, ref_b, _ = refusal_rates(ref_model, ref_tok, harmful, benign, the_judge, max_new_tokens, batch_size)
    goal = ref_h if target is None else float(target)
    mode = "conditional" if conditional else "baked"

    def locked(alpha: float) -> Any:
        return Deployment(lock=lock, mode=mode, alpha=alpha, force=force, model=model, tokenizer=tokenizer)

    points = _sweep(alphas, locked, tokenizer, harmful, benign, the_judge, max_new_tokens, batch_size,
                    desc="calibrate" if progress else None)
    chosen = choose_alpha(points, goal, ref_b + budget)
    settings = {"n": n, "judge": judge, "conditional": conditional, "max_new_tokens": max_new_tokens,
                "harmful_prompts": "advbench extract", "benign_prompts": "overrefusal extract"}
    return Calibration(points, ref_h, ref_b, goal, budget, chosen, settings)


def calibrate_defense(
    model: Any,
    tokenizer: Any,
    defense: Any,
    strengths: Sequence[float],
    reference_rates: tuple[float, float],
    *,
    lower_is_stronger: bool = False,
    target: float | None = None,
    budget: float = 0.05,
    n: int = 24,
    judge: str = DEFAULT_JUDGE,
    system: str | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 12,
) -> Calibration:
    """Return the strength sweep of any `Defense` on `model` and the strength it picks, by `calibrate`'s rule.

    The same prompts, judge and choice as a lock's alpha: the weakest strength whose harmful rate is at most
    `target` (default: the reference's harmful rate) with benign refusals within `budget` of the reference's.
    `reference_rates` are (harmful rate, benign refusal rate) of the reference (the aligned base) on these
    prompts, measured beforehand with `refusal_rates` (the reference and `model` may share weights, as a base
    and its attached adapter do). `lower_is_stronger` for logit thresholds (the guard, gate-only refusal).
    """
    if not strengths:
        raise SafetylockError("calibration needs at least one strength")
    _check_n(n)
    harmful, benign = calibration_prompts(n)
    ref_h, ref_b = reference_rates
    goal = ref_h if target is None else float(target)
    points = _sweep(strengths, lambda strength: defense.applied(model, strength), tokenizer, harmful, benign,
                    get_judge(judge), max_new_tokens, batch_size, system=system)
    chosen = choose_alpha(points, goal, ref_b + budget, lower_is_stronger=lower_is_stronger)
    settings = {"n": n, "judge": judge, "defense": defense.describe().get("name"), "max_new_tokens": max_new_tokens,
                "lower_is_stronger": lower_is_stronger, "harmful_prompts": "advbench extract",
                "benign_prompts": "overrefusal extract"}
    return Calibration(points, ref_h, ref_b, goal, budget, chosen, settings)


def calibrated_lock(lock: Any, result: Calibration, *, model: str, adapter: str | None, reference: str | None,
                    mode: str) -> Any:
    """Return `lock` with the chosen alpha as its default and the calibration (sweep, models, mode) in its metadata."""
    if result.chosen is None:
        raise SafetylockError("the calibration chose no alpha, so there is none to store in the lock")
    calibrated = lock.with_alpha(result.chosen)
    calibrated.metadata["calibration"] = {**result.to_dict(), "model": model, "adapter": adapter,
                                          "reference": reference, "lock_mode": mode}
    return calibrated
