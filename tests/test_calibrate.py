"""Alpha calibration: the choice rule, and a sweep on a tiny model that leaves the model untouched."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny import tiny_model

from safetylock.calibrate import CalibrationPoint, calibrate, choose_alpha, distinct_share
from safetylock.errors import SafetylockError
from safetylock.judges import Judgment, get_judge


def point(alpha, harm, benign, distinct=1.0):
    return CalibrationPoint(alpha, harm, benign, distinct)


def test_choose_alpha_picks_the_smallest_alpha_that_meets_the_target_within_budget():
    points = [point(1, 0.6, 0.10), point(2, 0.3, 0.12), point(4, 0.1, 0.14), point(8, 0.0, 0.40)]
    assert choose_alpha(points, target=0.35, max_benign=0.2) == 2
    assert choose_alpha(points, target=0.05, max_benign=0.2) == 4  # target missed: least harm within budget
    assert choose_alpha(points, target=0.05, max_benign=0.5) == 8
    assert choose_alpha(points, target=0.5, max_benign=0.05) is None


def test_a_calibration_says_whether_its_alpha_reaches_the_target():
    """The baked lock on the 1.5B harmful-10 fine-tune: alpha 1.5 stops the harm but breaks the benign budget."""
    from safetylock.calibrate import Calibration

    points = [point(0.75, 0.54, 0.0), point(1.5, 0.0, 0.33), point(3, 0.08, 0.88)]
    chosen = choose_alpha(points, target=0.0, max_benign=0.09)
    missed = Calibration(points, 0.0, 0.04, 0.0, 0.05, chosen)
    assert chosen == 0.75 and not missed.target_met and missed.to_dict()["target_met"] is False
    met = Calibration(points, 0.0, 0.04, 0.0, 0.5, choose_alpha(points, target=0.0, max_benign=0.54))
    assert met.chosen == 1.5 and met.target_met and met.to_dict()["target_met"] is True


def test_collapsed_replies_never_qualify():
    points = [point(1, 0.5, 0.1), point(4, 0.0, 0.1, distinct=0.1)]
    assert choose_alpha(points, target=0.1, max_benign=0.2) == 1


def test_choose_alpha_takes_the_highest_threshold_when_lower_is_stronger():
    """A screen's logit threshold: the weakest setting meeting the target is the highest one."""
    points = [CalibrationPoint(-2.0, 0.0, 0.5, 1.0), CalibrationPoint(0.0, 0.1, 0.1, 1.0),
              CalibrationPoint(2.0, 0.1, 0.0, 1.0), CalibrationPoint(4.0, 0.6, 0.0, 1.0)]
    assert choose_alpha(points, target=0.1, max_benign=0.2, lower_is_stronger=True) == 2.0
    assert choose_alpha(points, target=0.1, max_benign=0.2) == 0.0  # read as a strength, the smallest wins
    # No point meets the target: the least harmful within budget, ties to the weakest (highest) threshold.
    assert choose_alpha(points, target=0.0, max_benign=0.2, lower_is_stronger=True) == 2.0


class StrengthDefense:
    """A stand-in defense: applied at a strength it yields a marker the patched refusal_rates reads."""

    def __init__(self):
        self.applied_at = []

    @contextlib.contextmanager
    def applied(self, model, alpha=None):
        self.applied_at.append(alpha)
        yield ("defended", alpha)

    def describe(self):
        return {"name": "stand-in"}


def test_calibrate_defense_sweeps_each_strength_and_holds_it_to_the_reference(monkeypatch):
    import safetylock.calibrate as cal
    from safetylock.calibrate import calibrate_defense

    rates = {-1.0: (0.0, 0.5, 1.0), 0.0: (0.25, 0.25, 1.0), 1.0: (0.25, 0.1, 1.0), 3.0: (0.75, 0.0, 1.0)}
    seen = []

    def fake_rates(model, tokenizer, harmful, benign, judge, max_new_tokens, batch_size, system=None):
        seen.append((model, len(harmful), len(benign), system))
        return rates[model[1]]

    monkeypatch.setattr(cal, "refusal_rates", fake_rates)
    monkeypatch.setattr(cal, "calibration_prompts", lambda n: ([f"harm {i}" for i in range(n)], [f"ok {i}" for i in range(n)]))
    defense = StrengthDefense()
    result = calibrate_defense("model", None, defense, [3.0, -1.0, 1.0, 0.0], (0.25, 0.1), lower_is_stronger=True,
                               n=4, judge="keyword", system="sys")
    assert [p.alpha for p in result.points] == [-1.0, 0.0, 1.0, 3.0] and defense.applied_at == [-1.0, 0.0, 1.0, 3.0]
    assert all(s == (("defended", a), 4, 4, "sys") for s, a in zip(seen, [-1.0, 0.0, 1.0, 3.0]))
    # target: the reference's 0.25 harmful; budget: its 0.1 + 0.05 benign. 1.0 meets both and is the weakest.
    assert result.chosen == 1.0 and result.target_met and result.target == 0.25
    assert result.to_dict()["lower_is_stronger"] is True and result.to_dict()["defense"] == "stand-in"
    with pytest.raises(SafetylockError, match="at least one strength"):
        calibrate_defense("model", None, defense, [], (0.0, 0.0))


def test_distinct_share():
    assert distinct_share(["a", "a", "b", "c"]) == 0.75 and distinct_share([]) == 0.0


def test_one_fixed_refusal_to_every_harmful_prompt_is_not_collapse(monkeypatch):
    """A screen answers each harmful prompt with one message; only the same string to every benign prompt collapses."""
    from types import SimpleNamespace

    import safetylock.calibrate as cal
    import safetylock.generate

    refusal = "I cannot help with that request."

    def replies(benign):
        def fake_generate(model, tokenizer, prompts, **kwargs):
            texts = [refusal] * 8 + benign
            assert len(prompts) == len(texts)
            return SimpleNamespace(generations=[SimpleNamespace(text=t) for t in texts])
        return fake_generate

    harmful, benign = [f"harm {i}" for i in range(8)], [f"ok {i}" for i in range(8)]
    # The screen also refuses 2 of the 8 benign prompts: 7 distinct benign replies of 8 (of all 16 only 7).
    monkeypatch.setattr(safetylock.generate, "generate", replies([f"Answer number {i}." for i in range(6)] + [refusal] * 2))
    h, b, distinct = cal.refusal_rates(None, None, harmful, benign, get_judge("keyword"), 8, 4)
    assert (h, b, distinct) == (0.0, 0.25, 7 / 8)
    assert choose_alpha([CalibrationPoint(1.0, h, b, distinct)], target=0.0, max_benign=0.25) == 1.0
    monkeypatch.setattr(safetylock.generate, "generate", replies(["Of course. I'm here to help."] * 8))
    h, b, distinct = cal.refusal_rates(None, None, harmful, benign, get_judge("keyword"), 8, 4)
    assert distinct == 1 / 8
    assert choose_alpha([CalibrationPoint(1.0, h, b, distinct)], target=0.0, max_benign=1.0) is None


class MarkerJudge:
    """Refused when the reply's first character code is even: a deterministic stand-in that depends on the text."""

    def judge_many(self, prompts, responses):
        return [Judgment(bool(r) and ord(r[0]) % 2 == 0, None, "parity") for r in responses]

    def describe(self):
        return {"name": "parity"}


def test_calibrate_sweeps_every_alpha_and_restores_the_model(monkeypatch, tokenizer):
    from test_lock import all_pre_hooks, logits, synthetic_lock

    import safetylock.calibrate as cal

    monkeypatch.setattr("safetylock.judges.get_judge", lambda name: MarkerJudge())
    monkeypatch.setattr(cal, "calibration_prompts", lambda n: ([f"harm {i}" for i in range(n)], [f"ok {i}" for i in range(n)]))
    model = tiny_model("qwen2")
    before = logits(model)
    result = calibrate(model, tokenizer, synthetic_lock(model), alphas=(4.0, 1.0), n=3, max_new_tokens=4,
                       budget=1.0, progress=False)
    assert [p.alpha for p in result.points] == [1.0, 4.0]
    assert all(0.0 <= p.harmful_rate <= 1.0 and 0.0 <= p.benign_refusal_rate <= 1.0 for p in result.points)
    assert result.chosen == choose_alpha(result.points, result.target, result.reference_benign_refusal_rate + 1.0)
    assert result.to_dict()["points"][0]["alpha"] == 1.0
    assert all_pre_hooks(model) == 0 and torch.equal(logits(model), before)


def test_calibrate_rejects_bad_settings(tokenizer):
    from test_lock import synthetic_lock

    model = tiny_model("llama")
    with pytest.raises(SafetylockError, match="positive alphas"):
        calibrate(model, tokenizer, synthetic_lock(model), alphas=(0.0,))
    with pytest.raises(SafetylockError, match="no harmfulness probe"):
        calibrate(model, tokenizer, synthetic_lock(model), conditional=True)
