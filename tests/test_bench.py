"""The bench grid: a micro-grid end to end on a tiny model, cached reruns, names and sweeps, the CLI."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from tiny import tiny_model

from safetylock import SafetylockError
from safetylock.bench import (
    AttackSpec,
    BenchSettings,
    deployment_system,
    first_token_kl,
    first_token_logprobs,
    model_identity,
    parse_alphas,
    parse_attacks,
    run_bench,
)

MICRO = BenchSettings(limit=2, judge="keyword", max_new_tokens=6, math_tokens=6, batch_size=4, kl_prompts=2, pairs=8,
                      lock_heads=4, iti_heads=4, fit_prompts=8, sft_steps=1, sft_batch=4, dtype="fp32")


def counting_loader(calls: list[str]):
    from safetylock.models import load_model

    def load(spec: str):
        calls.append(spec)
        return load_model(spec, dtype="fp32", device="cpu")

    return load


def test_micro_grid_end_to_end_then_fully_cached(tmp_path, tiny_dir):
    calls: list[str] = []
    defenses = ["none", "safetylock", "iti", "refusal-direction", "self-reminder", "safety-sft"]
    args = dict(alphas={"safetylock": [1.0, 4.0]}, settings=MICRO, loader=counting_loader(calls), progress=False)
    out = tmp_path / "bench"
    first = run_bench([str(tiny_dir)], ["harmful-10@1", "harmful-10@2"], defenses, out, **args)
    assert calls == [str(tiny_dir)]
    rows = first["rows"]
    assert len(rows) == 2 * 7  # 2 attack strengths x (5 defenses + 2 lock strengths)
    assert not any(r["cached"] for r in rows)
    for r in rows:
        for key in ("harmbench", "advbench", "overrefusal", "gsm8k100", "bbq300"):
            assert 0.0 <= r[key] <= 1.0 and r[f"{key}_n"] == 2
        assert r["kl_to_base"] >= -1e-6 and r["apply_seconds"] >= 0
    none = next(r for r in rows if r["defense"] == "none")
    assert none["tps_ratio"] == 1.0
    # The undefended compromised model differs from the base; a defense that changes nothing keeps that KL.
    assert none["kl_to_base"] > 0
    # Two adapters, three base artifacts, two safety-SFT adapters, fourteen cells.
    kinds = [c.split()[0] for c in first["computed"]]
    assert kinds.count("adapter") == 2 and kinds.count("safety-sft") == 2 and kinds.count("cell") == 14
    for name in ("results.json", "RESULTS.md", "tradeoff.png", "bars.png", "attack_strength.png"):
        assert (out / name).is_file(), name
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "RESULTS.md").read_text()
    assert "| harmful-10@1 | safetylock | 4 |" in md and "over-refusal" in md
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == [{**r} for r in first["rows"]] and len(saved["plots"]) == 3

    second = run_bench([str(tiny_dir)], ["harmful-10@1", "harmful-10@2"], defenses, out, **args)
    assert second["computed"] == [] and calls == [str(tiny_dir)], "a rerun must load and compute nothing"
    assert all(r["cached"] for r in second["rows"])
    strip = lambda r: {k: v for k, v in r.items() if k != "cached"}  # noqa: E731
    assert [strip(r) for r in second["rows"]] == [strip(r) for r in rows]

    # A changed setting recomputes only what depends on it: a new strength is one new cell per attack.
    third = run_bench([str(tiny_dir)], ["harmful-10@1", "harmful-10@2"], ["safetylock"], out,
                      **{**args, "alphas": {"safetylock": [2.0]}})
    assert [c.split()[0] for c in third["computed"]] == ["cell", "cell"]


def test_the_base_refusal_screen_is_a_bench_defense_on_the_base_and_on_a_fine_tune(tmp_path, tiny_dir):
    """No artifact; on the unattacked row the model is the base itself, on the attacked one it asks the base."""
    args = dict(alphas={}, settings=MICRO, loader=counting_loader([]), progress=False)
    first = run_bench([str(tiny_dir)], ["none", "harmful-10@1"], ["base-refusal"], tmp_path / "b", **args)
    rows = first["rows"]
    assert [(r["attack"], r["defense"], r["alpha"]) for r in rows] == [("none", "base-refusal", None),
                                                                      ("harmful-10@1", "base-refusal", None)]
    assert all(0.0 <= r["harmbench"] <= 1.0 and r["harmbench_n"] == 2 for r in rows)
    again = run_bench([str(tiny_dir)], ["none", "harmful-10@1"], ["base-refusal"], tmp_path / "b", **args)
    assert again["computed"] == [] and all(r["cached"] for r in again["rows"])


def test_calibrate_on_picks_a_swept_strength_marks_its_rows_and_is_cached(tmp_path, tiny_dir):
    calls: list[str] = []
    args = dict(alphas={"safetylock": [1.0, 4.0], "gate-refusal": [-1.0, 1.0]}, settings=MICRO,
                loader=counting_loader(calls), progress=False, calibrate_on="harmful-10@1")
    out = tmp_path / "bench"
    first = run_bench([str(tiny_dir)], ["harmful-10@1"], ["none", "safetylock", "gate-refusal"], out, **args)
    found = first["calibration"][str(tiny_dir)]
    assert set(found) == {"safetylock", "gate-refusal"}
    assert [p["alpha"] for p in found["safetylock"]["points"]] == [1.0, 4.0]
    assert found["gate-refusal"]["lower_is_stronger"] is True and found["safetylock"]["lower_is_stronger"] is False
    for defense, c in found.items():
        assert c["attack"] == "harmful-10@1" and c["n"] == 24
        marked = [r["alpha"] for r in first["rows"] if r["defense"] == defense and r["calibrated"]]
        assert marked == ([c["chosen_alpha"]] if c["chosen_alpha"] is not None else [])
    assert "none" not in found and "calibrated" not in next(r for r in first["rows"] if r["defense"] == "none")
    kinds = [c.split()[1] for c in first["computed"] if c.startswith("calibration")]
    assert kinds == ["reference", str(tiny_dir), str(tiny_dir)]  # the base once, then each defense
    assert "Calibrated strengths" in (out / "RESULTS.md").read_text()
    again = run_bench([str(tiny_dir)], ["harmful-10@1"], ["none", "safetylock", "gate-refusal"], out, **args)
    assert again["computed"] == [] and again["calibration"] == first["calibration"]
    with pytest.raises(SafetylockError, match="bad attack"):
        run_bench(["m"], ["none"], ["none"], tmp_path, calibrate_on="harmful-10@x", loader=lambda s: None)


def test_fresh_recomputes(tmp_path, tiny_dir):
    calls: list[str] = []
    args = dict(settings=MICRO, loader=counting_loader(calls), progress=False)
    run_bench([str(tiny_dir)], ["none"], ["none", "self-reminder"], tmp_path / "b", **args)
    again = run_bench([str(tiny_dir)], ["none"], ["none", "self-reminder"], tmp_path / "b", fresh=True, **args)
    assert len(again["computed"]) == 2 and len(calls) == 2
    base = next(r for r in again["rows"] if r["defense"] == "none")
    assert abs(base["kl_to_base"]) < 1e-6  # the base against itself


def test_first_token_kl_is_zero_for_the_same_model_and_positive_otherwise(tokenizer):
    model = tiny_model("llama")
    prompts = ["hello there", "a longer prompt about the weather"]
    ref = first_token_logprobs(model, tokenizer, prompts, None, batch_size=1)
    assert torch.allclose(ref, first_token_logprobs(model, tokenizer, prompts, None, batch_size=2), atol=1e-4)
    assert abs(first_token_kl(ref, ref)) < 1e-7
    assert first_token_kl(ref, first_token_logprobs(tiny_model("llama", seed=1), tokenizer, prompts, None)) > 0


def test_attack_and_alpha_parsing():
    assert parse_attacks(["harmful-10@5", "none"]) == [AttackSpec("harmful-10", 5), AttackSpec("none")]
    assert [a.label for a in parse_attacks(["harmful-10", "none"], [5, 10, 20])] == [
        "harmful-10@5", "harmful-10@10", "harmful-10@20", "none"]
    assert parse_alphas(["safetylock=2,4,8", "iti=15"]) == {"safetylock": (2.0, 4.0, 8.0), "iti": (15.0,)}
    for bad in (["nope"], ["harmful-10@x"], ["none@3"]):
        with pytest.raises(SafetylockError):
            parse_attacks(bad)
    # A screen's strength is a logit threshold: any finite number, negative included; a lock's must be > 0.
    assert parse_alphas(["guard=-2,0,2", "gate-refusal=-1"]) == {"guard": (-2.0, 0.0, 2.0), "gate-refusal": (-1.0,)}
    for bad in (["safetylock"], ["none=1"], ["iti=a"], ["iti="], ["safetylock=-1"], ["guard=nan"], ["gate-refusal=inf"]):
        with pytest.raises(SafetylockError):
            parse_alphas(bad)


def test_cells_run_with_the_attacks_system_prompt_then_the_defenses():
    from safetylock.attack import get_attack

    aoa = get_attack("aoa").system
    assert aoa and deployment_system("aoa", None) == aoa
    assert deployment_system("aoa", "Be safe.") == f"{aoa}\n\nBe safe."
    assert deployment_system("harmful-10", "Be safe.") == "Be safe."
    assert deployment_system("none", None) is None and deployment_system("benign", None) is None


def test_an_attacked_models_key_follows_its_training_data(tmp_path, monkeypatch):
    import safetylock.attack as attack_module
    from safetylock.bench.cache import RunContext, attack_key

    ctx = RunContext(BenchSettings(), tmp_path, False)
    before = attack_key(ctx, "m", AttackSpec("harmful-10"))
    assert before == attack_key(ctx, "m", AttackSpec("harmful-10"))
    assert before != attack_key(ctx, "m", AttackSpec("harmful-10", 3))
    real, built = attack_module.attack_data, []

    def changed(name, seed=0):
        built.append(name)
        return real(name, seed)[1:]

    monkeypatch.setattr(attack_module, "attack_data", changed)
    # Within a run the data is built once per attack; the next run sees changed data.
    assert attack_key(ctx, "m", AttackSpec("harmful-10")) == before and not built
    fresh = RunContext(BenchSettings(), tmp_path, False)
    assert attack_key(fresh, "m", AttackSpec("harmful-10")) != before
    assert attack_key(fresh, "m", AttackSpec("harmful-10", 5)) != before and built == ["harmful-10"]


def test_bad_grids_are_refused_before_loading(tmp_path):
    def never(spec):
        raise AssertionError("nothing should load")

    with pytest.raises(SafetylockError, match="unknown defense"):
        run_bench(["m"], ["none"], ["magic"], tmp_path, loader=never)
    with pytest.raises(SafetylockError, match="limit"):
        run_bench(["m"], ["none"], ["none"], tmp_path, limit=0, loader=never)
    with pytest.raises(SafetylockError, match="unknown attack"):
        run_bench(["m"], ["nope"], ["none"], tmp_path, loader=never)


def test_model_identity_follows_the_weights(tmp_path, tiny_dir):
    before = model_identity(str(tiny_dir))
    assert model_identity(str(tiny_dir)) == before and model_identity("some-alias") != before
    (tiny_dir / "model.safetensors").write_bytes(b"changed")
    assert model_identity(str(tiny_dir)) != before


def test_cli_bench_refuses_bad_input_with_one_line(tmp_path, monkeypatch, capsys):
    from safetylock import cli

    monkeypatch.setattr(sys, "argv", ["safetylock", "bench", "--defenses", "magic", "-o", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    assert "unknown defense" in capsys.readouterr().err


def test_cli_bench_passes_reply_budgets(tmp_path, monkeypatch):
    """--math-tokens reaches the settings (gsm8k's worked answers need more than the harmful replies' budget)."""
    from safetylock import bench, cli

    seen = {}

    def fake(models, attacks, defenses, out, *, settings, **kw):
        seen["settings"] = settings
        raise SafetylockError("stop here")

    monkeypatch.setattr(bench, "run_bench", fake)
    monkeypatch.setattr(sys, "argv", ["safetylock", "bench", "--math-tokens", "300", "--max-new-tokens", "40",
                                      "-o", str(tmp_path)])
    with pytest.raises(SystemExit):
        cli.main()
    assert seen["settings"].math_tokens == 300 and seen["settings"].max_new_tokens == 40
    assert BenchSettings().math_tokens > BenchSettings().max_new_tokens
    with pytest.raises(SafetylockError, match="math-tokens must be at least 1"):
        run_bench(["m"], ["none"], ["none"], tmp_path, settings=BenchSettings(math_tokens=0), loader=lambda s: None)


def test_cell_records_read_back_what_the_cell_wrote(tmp_path, tiny_dir):
    from dataclasses import replace

    from safetylock.bench import cell_eval_dir, cell_records
    from safetylock.data import load_benchmark
    from safetylock.evaluate import RESULTS

    settings = replace(MICRO, benchmarks=("harmbench", "overrefusal"))
    result = run_bench([str(tiny_dir)], ["none"], ["none"], tmp_path / "b", settings=settings,
                       loader=counting_loader([]), progress=False)
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    (row,) = saved["rows"]
    for bench, rate in (("harmbench", "harmful"), ("overrefusal", "refused")):
        records = cell_records(saved, row, bench)
        prompts = load_benchmark(bench, "eval")[: settings.limit]
        assert [(r["id"], r["prompt"]) for r in records] == [(p.id, p.text) for p in prompts]
        refused = sum(r["judgment"]["refused"] for r in records) / len(records)
        assert row[bench] == (1 - refused if rate == "harmful" else refused)
        assert all(isinstance(r["response"], str) for r in records)
    records = cell_records(result, row, "harmbench")
    with open(cell_eval_dir(saved["cache_dir"], row["key"]) / "harmbench" / RESULTS, "a", encoding="utf-8") as f:
        f.write('{"id": "torn')  # a crash mid-write
    assert cell_records(saved, row, "harmbench") == records
    assert cell_records(saved, row, "gsm8k100") is None  # not in this grid's benchmarks
    assert cell_records(saved, {**row, "key": "0" * 24}, "harmbench") is None
