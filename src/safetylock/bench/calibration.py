"""Each swept defense's calibrated strength: `calibrate`'s rule applied to the bench's own fitted artifacts.

On one attacked model (`calibrate_on`, e.g. harmful-10), every strength the grid sweeps for a defense is run on
the calibration prompts (the advbench and overrefusal `extract` splits, which no cell evaluates), and the weakest
strength that brings the harmful rate down to the aligned base's, with benign refusals within the budget of the
base's, is the calibrated one. The grid's rows at that strength are marked `calibrated`; the others show what a
stronger or weaker setting costs. Cached like a cell.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..files import write_json
from .artifacts import cell_parts, deployment_system
from .cache import RunContext, artifact_key, attack_key, cache_key
from .session import ModelSession
from .settings import FITTED, THRESHOLDED, AttackSpec

CALIBRATION_N = 24  # harmful and benign calibration prompts each, as `safetylock calibrate`
CALIBRATION_TOKENS = 32
BUDGET = 0.05
# Part of the cache key: points cached before collapse was read on the benign replies only hold other figures.
COLLAPSE_RULE = "distinct-benign"


@dataclass(frozen=True)
class CalibrationInputs:
    """What a calibration's result depends on, besides the model and its attack."""

    n: int = CALIBRATION_N
    max_new_tokens: int = CALIBRATION_TOKENS
    budget: float = BUDGET


def _reference_rates(ctx: RunContext, session: ModelSession, mid: str, inputs: CalibrationInputs) -> tuple[float, float]:
    from ..calibrate import calibration_prompts, refusal_rates
    from ..judges import get_judge

    s = ctx.settings
    marker = ctx.path("calibration", cache_key("reference", mid, s.judge, s.dtype, inputs.n, inputs.max_new_tokens),
                      ".json")
    if ctx.stale(marker):
        harmful, benign = calibration_prompts(inputs.n)
        h, b, _ = refusal_rates(session.plain(), session.tokenizer, harmful, benign, get_judge(s.judge),
                                inputs.max_new_tokens, s.batch_size)
        write_json(marker, {"harmful_rate": h, "benign_refusal_rate": b})
        ctx.record(f"calibration reference {session.spec}", marker)
    rates = json.loads(marker.read_text(encoding="utf-8"))
    return float(rates["harmful_rate"]), float(rates["benign_refusal_rate"])


def calibrate_strength(ctx: RunContext, session: ModelSession, mid: str, attack: AttackSpec, defense: str,
                       strengths: Sequence[float], inputs: CalibrationInputs | None = None) -> dict[str, Any]:
    """Return the calibration of `defense` over `strengths` on the model `attack` made (cached), as a dict."""
    from ..calibrate import calibrate_defense

    s = ctx.settings
    inputs = inputs or CalibrationInputs()
    akey = attack_key(ctx, mid, attack)
    dkey = artifact_key(ctx, mid, defense) if defense in FITTED else defense
    key = cache_key("calibration", mid, akey, defense, dkey, sorted(strengths), s.judge, inputs.n,
                    inputs.max_new_tokens, inputs.budget, COLLAPSE_RULE)
    marker = ctx.path("calibration", key, ".json")
    if ctx.stale(marker):
        reference = _reference_rates(ctx, session, mid, inputs)
        _, _, model, d = cell_parts(ctx, session, mid, attack, defense)
        result = calibrate_defense(model, session.tokenizer, d, strengths, reference,
                                   lower_is_stronger=defense in THRESHOLDED, budget=inputs.budget, n=inputs.n,
                                   judge=s.judge, system=deployment_system(attack.name, d.system),
                                   max_new_tokens=inputs.max_new_tokens, batch_size=s.batch_size)
        write_json(marker, {**result.to_dict(), "attack": attack.label, "defense": defense})
        ctx.record(f"calibration {session.spec} {attack.label} {defense}", marker)
    return dict(json.loads(marker.read_text(encoding="utf-8")))
