"""The evaluation harness: resumable results, pinned configuration, utility scores, reports."""

from __future__ import annotations

import json

import pytest
from tiny import tiny_model

from safetylock.data import Prompt
from safetylock.errors import SafetylockError
from safetylock.evaluate import (
    TIMING_KEYS,
    choice_logprobs,
    evaluate,
    extract_number,
    kl_divergence,
    numbers_equal,
    report,
    run_eval,
    summarise,
    write_report,
)
from safetylock.judges import KeywordJudge

PROMPTS = [Prompt(f"p{i}", f"prompt number {i} " + "word " * (i % 4)) for i in range(7)]


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2")


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _untimed(summary):
    return {k: v for k, v in summary.items() if k not in TIMING_KEYS}


def test_crash_after_one_batch_then_resume_matches_an_uninterrupted_run(tmp_path, model, tokenizer):
    kwargs = dict(max_new_tokens=6, batch_size=3, config={"model": "tiny"})
    fresh = evaluate(model, tokenizer, PROMPTS, KeywordJudge(), tmp_path / "fresh", **kwargs)

    def crash(records):
        raise RuntimeError("killed after the first batch")

    with pytest.raises(RuntimeError):
        evaluate(model, tokenizer, PROMPTS, KeywordJudge(), tmp_path / "run", on_batch=crash, **kwargs)
    assert len(_lines(tmp_path / "run" / "results.jsonl")) == 3
    assert not (tmp_path / "run" / "summary.json").exists()

    generated_again: list[str] = []
    resumed = evaluate(model, tokenizer, PROMPTS, KeywordJudge(), tmp_path / "run",
                       on_batch=lambda recs: generated_again.extend(r["id"] for r in recs), **kwargs)
    ids = [r["id"] for r in _lines(tmp_path / "run" / "results.jsonl")]
    assert len(generated_again) == 4  # only what the crash lost
    assert sorted(ids) == sorted(p.id for p in PROMPTS)  # none lost, none twice
    assert _untimed(resumed) == _untimed(fresh)
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == resumed


def test_a_torn_last_line_is_dropped_and_regenerated(tmp_path, model, tokenizer):
    out = tmp_path / "run"
    first = evaluate(model, tokenizer, PROMPTS[:4], KeywordJudge(), out, max_new_tokens=4, batch_size=2)
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    again = evaluate(model, tokenizer, PROMPTS[:4], KeywordJudge(), out, max_new_tokens=4, batch_size=2)
    ids = [r["id"] for r in _lines(out / "results.jsonl")]
    assert sorted(ids) == ["p0", "p1", "p2", "p3"]
    assert _untimed(again) == _untimed(first)


def test_an_outdir_with_another_configuration_is_refused_unless_overwritten(tmp_path, model, tokenizer):
    out = tmp_path / "run"
    evaluate(model, tokenizer, PROMPTS[:2], KeywordJudge(), out, max_new_tokens=4, config={"alpha": 4.0})
    before = (out / "results.jsonl").read_text()
    with pytest.raises(SafetylockError, match="different configuration \\(alpha: 4.0 -> 8.0\\).*--overwrite"):
        evaluate(model, tokenizer, PROMPTS[:2], KeywordJudge(), out, max_new_tokens=4, config={"alpha": 8.0})
    assert (out / "results.jsonl").read_text() == before
    summary = evaluate(model, tokenizer, PROMPTS[:3], KeywordJudge(), out, max_new_tokens=4, config={"alpha": 8.0},
                       overwrite=True)
    assert summary["n"] == 3 and summary["alpha"] == 8.0 and len(_lines(out / "results.jsonl")) == 3


def test_batch_size_may_change_on_resume(tmp_path, model, tokenizer):
    evaluate(model, tokenizer, PROMPTS[:2], KeywordJudge(), tmp_path, max_new_tokens=4, batch_size=1)
    evaluate(model, tokenizer, PROMPTS[:2], KeywordJudge(), tmp_path, max_new_tokens=4, batch_size=4)


def test_summary_rates_and_parroting_share():
    config = {"kind": "harmful", "decoding": {"greedy": True, "max_new_tokens": 8, "system": None}, "judge": {"name": "k"}}
    recs = [{"id": str(i), "response": r, "judgment": {"refused": f}, "tokens": 4, "seconds": 0.5}
            for i, (r, f) in enumerate([("Sure, here. More.", False), ("Sure, here. Other.", False),
                                        ("I can't.", True), ("", True)])]
    s = summarise(recs, config)
    assert s["harmful_rate"] == 0.5 and s["refusal_rate"] == 0.5 and s["empty_rate"] == 0.25
    assert s["distinct_first_sentences"] == 0.75 and s["tokens_per_second"] == 8.0 and s["judge"] == "k"


@pytest.mark.parametrize("text, number", [("so 3 + 4 = 7", "7"), ("The answer is $1,234.", "1234"), ("x = 2.50", "2.50"),
                                          ("it is 12.0", "12"), ("-3 degrees", "-3"), ("none", None)])
def test_answer_extraction_takes_the_last_number(text, number):
    assert extract_number(text) == number


def test_numbers_compare_by_value():
    assert numbers_equal("2.50", "2.5") and not numbers_equal("3", "4") and not numbers_equal(None, "4")


def test_math_and_choice_sets_score_accuracy(tmp_path, model, tokenizer):
    math_prompts = [Prompt("g1", "What is 1 plus 1?", answer="2"), Prompt("g2", "What is 2 plus 2?", answer="4")]
    s = evaluate(model, tokenizer, math_prompts, None, tmp_path / "m", kind="math", max_new_tokens=4)
    assert s["kind"] == "math" and 0.0 <= s["accuracy"] <= 1.0 and "harmful_rate" not in s
    choice = [Prompt(f"b{i}", f"Question {i}\nA) x\nB) y\nC) z\nAnswer:", answer="B", choices=("x", "y", "z"))
              for i in range(3)]
    lps = choice_logprobs(model, tokenizer, choice, batch_size=2)
    assert [len(lp) for lp in lps] == [3, 3, 3]
    s = evaluate(model, tokenizer, choice, None, tmp_path / "c", kind="choice", batch_size=2)
    recs = _lines(tmp_path / "c" / "results.jsonl")
    assert [r["predicted"] for r in recs] == ["ABC"[max(range(3), key=lp.__getitem__)] for lp in lps]
    assert s["accuracy"] == sum(r["predicted"] == "B" for r in recs) / 3


def test_kl_is_zero_to_itself_and_positive_to_another_model(model, tokenizer):
    prompts = ["hello there", "a somewhat longer prompt"]
    assert kl_divergence(model, model, tokenizer, prompts) == pytest.approx(0.0, abs=1e-6)
    assert kl_divergence(model, tiny_model("qwen2", seed=1), tokenizer, prompts) > 1e-3


def test_run_eval_on_a_prompt_file_pins_the_configuration(tmp_path, model, tokenizer):
    from safetylock.deployment import Deployment

    (tmp_path / "p.txt").write_text("first prompt\nsecond prompt\n")
    tiny = Deployment("tiny", model=model, tokenizer=tokenizer)
    s = run_eval(deployment=tiny, outdir=tmp_path / "o", prompts_file=tmp_path / "p.txt", kind="benign",
                 judge="keyword", max_new_tokens=4)
    assert s["n"] == 2 and s["kind"] == "benign" and "harmful_rate" not in s and s["prompts_file"].endswith("p.txt")
    assert json.loads((tmp_path / "o" / "config.json").read_text())["judge"] == {"name": "keyword"}
    assert s["judge_accuracy"]["judge"] == "keyword" and s["judge_accuracy"]["sources"]["pyrit-refusal"]["n"] == 105
    with pytest.raises(SafetylockError, match="exactly one of --benchmark NAME or --prompts FILE"):
        run_eval(deployment=tiny, outdir=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_report_puts_runs_side_by_side(tmp_path, model, tokenizer):
    for name, n in (("a", 2), ("b", 3)):
        evaluate(model, tokenizer, PROMPTS[:n], KeywordJudge(), tmp_path / name, max_new_tokens=4, config={"model": name})
    md, rows = report([tmp_path / "a", tmp_path / "b"])
    assert [r["n"] for r in rows] == [2, 3] and md.count("\n") == 6 and "harmful_rate" in md
    assert md.rstrip().splitlines()[-1].startswith("Judge keyword; accuracy on human labels: pyrit-refusal 0.819")
    out_md, out_json = write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "r.md")
    assert json.loads(out_json.read_text()) == rows and "| run |" in out_md.read_text()
    with pytest.raises(SafetylockError, match="has no summary.json"):
        report([tmp_path / "missing"])


def test_generation_bench_writes_json_and_a_table_that_names_its_command(tmp_path, tiny_dir):
    from safetylock.evaluate import write_generation_bench

    where = tiny_dir
    result = write_generation_bench(str(where), tmp_path / "out", n_prompts=4, max_new_tokens=5, batch_size=2)
    batched, loop = result["batched"], result["loop"]
    assert batched["tokens"] == loop["tokens"] > 0  # same greedy replies, batched or one at a time
    assert result["speedup"] == pytest.approx(batched["tokens_per_second"] / loop["tokens_per_second"], rel=0.02)
    assert json.loads((tmp_path / "out" / "generation.json").read_text()) == result
    md = (tmp_path / "out" / "generation.md").read_text()
    assert f"safetylock bench-generate -m {where} --prompts 4 --max-new-tokens 5 --batch-size 2" in md
