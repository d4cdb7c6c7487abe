"""Alpha calibration: the choice rule, and a sweep on a tiny model that leaves the model untouched."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from safetylock.calibrate import CalibrationPoint, calibrate, choose_alpha, distinct_share
from safetylock.errors import SafetylockError
from safetylock.judges import Judgment


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


def test_distinct_share():
    assert distinct_share(["a", "a", "b", "c"]) == 0.75 and distinct_share([]) == 0.0


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
