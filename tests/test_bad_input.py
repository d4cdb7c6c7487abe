"""Bad input through the real entry point: one line naming the problem and the fix, exit 2, nothing left behind.

Each case is a row of the README's bad-input table (docs/bad-input.md lists them with their exit codes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safetylock.errors import SafetylockError, check_alpha
from safetylock.files import atomic_dir, check_output_dir
from safetylock.lock import Lock
from test_lock import synthetic_lock
from tiny import tiny_model

CLI = [sys.executable, "-m", "safetylock.cli"]
M = "qwen2.5-coder-0.5b-instruct"


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=120, cwd=cwd)


def one_line(proc: subprocess.CompletedProcess[str], needle: str, code: int = 2) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    return lines[0]


def read_only_dir(tmp_path: Path) -> Path:
    """Return a directory no file can be created in, for root too (root ignores a 0o555 mode)."""
    if os.geteuid() == 0:
        return Path("/sys")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


# ------------------------------------------------------------------------------------ usage errors (item 5, 7)

USAGE = [
    (["frobnicate"], "No such command"),
    (["chat", "--bogus"], "No such option"),
    (["eval"], "Missing option"),
    (["chat", "-m", M], "Missing argument"),
    (["chat", "--alpha", "abc", "hi"], "--alpha"),
    (["chat", "--max-new-tokens", "x", "hi"], "--max-new-tokens"),
    (["chat", "--max-new-tokens", "0", "hi"], "--max-new-tokens"),
    (["serve", "--port", "abc", "--lock", "l.safetensors"], "--port"),
    (["eval", "--max-new-tokens", "-5", "--benchmark", "harmbench", "-o", "D"], "--max-new-tokens"),
    (["chat", "--alpha", "nan", "hi"], "finite number > 0"),
    (["chat", "--alpha", "-3", "hi"], "finite number > 0"),
    (["chat", "--alpha", "1e30", "hi"], "finite number > 0"),
    (["serve", "--alpha", "-3", "--lock", "l.safetensors"], "finite number > 0"),
    (["extract", "--alpha", "0"], "finite number > 0"),
    (["calibrate", "-m", M, "--lock", "l.safetensors", "--alphas", "1,inf"], "finite number > 0"),
    (["bench", "--alphas", "safetylock=-1", "-o", "B"], "finite number > 0"),
    (["finetune", "--lr", "nan"], "--lr"),
    (["bench", "--alphas", "guard=nan", "-o", "B"], "must be finite"),
    (["eval", "--alpha", "-3", "--benchmark", "harmbench", "-o", "D"], "finite number > 0"),
    (["eval", "--alpha", "nan", "--defense", "guard", "--benchmark", "harmbench", "-o", "D"], "must be finite"),
    (["fit-defense", "magic", "-o", "f.safetensors"], "cannot fit 'magic'"),
    (["fit-defense", "safetylock", "-o", "f.safetensors"], "the locks come from `safetylock extract`"),
    (["fit-defense", "resta", "-o", "f.safetensors"], "needs the base's harmful fine-tune"),
    (["fit-defense", "guard", "--unaligned", "A", "-o", "f.safetensors"], "--unaligned is for resta and safe-lora"),
    (["chat", "--base-model", M, "hi"], "goes with --lock"),
]


@pytest.mark.parametrize("args,needle", USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_usage_errors_are_one_line_exit_2(tmp_path, args, needle):
    one_line(run(*args, cwd=tmp_path), needle)
    assert not any(tmp_path.iterdir()), "a refused command wrote something"


def test_no_arguments_prints_help_and_exits_2():
    proc = run()
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert "Usage" in proc.stdout + proc.stderr


def test_ctrl_c_exits_130_and_says_the_run_resumes(monkeypatch, capsys, tmp_path):
    from safetylock import cli, evaluate

    def interrupted(**kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "run_eval", interrupted)
    monkeypatch.setattr(sys, "argv", ["safetylock", "eval", "--benchmark", "harmbench", "-o", str(tmp_path / "D")])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 130
    assert "resume" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- alpha (item 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -3.0, 0.0, 1e30, "abc", None, True])
def test_check_alpha_refuses_what_is_not_a_strength(bad):
    with pytest.raises(SafetylockError, match="alpha"):
        check_alpha(bad)


def test_every_lock_entry_refuses_a_bad_alpha(tmp_path):
    model = tiny_model("llama")
    lock = synthetic_lock(model)
    for entry in (lambda: lock.deltas(-1.0, model), lambda: lock.bake(model, alpha=float("nan")),
                  lambda: lock.applied(model, alpha=1e30).__enter__(), lambda: lock.with_alpha(0.0)):
        with pytest.raises(SafetylockError, match="finite number > 0"):
            entry()
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules()), "a refused alpha left a hook"
    assert all(getattr(m, "bias", None) is None for m in model.modules() if m.__class__.__name__ == "Linear")


def _lock_with_metadata(tmp_path: Path, **changes: object) -> Path:
    """Save a valid lock, then rewrite its metadata (as a damaged or hand-edited file would be)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = synthetic_lock(tiny_model("llama")).save(tmp_path / "lock.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["safetylock"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    meta.update(changes)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"safetylock": json.dumps(meta)})
    return bad


@pytest.mark.parametrize("changes,needle", [
    ({"default_alpha": float("nan")}, "default_alpha"),
    ({"default_alpha": -3}, "default_alpha"),
    ({"default_alpha": "abc"}, "default_alpha"),
    ({"fingerprint": "not an object"}, "fingerprint"),
])
def test_a_stored_bad_default_or_fingerprint_is_refused_on_load(tmp_path, changes, needle):
    bad = _lock_with_metadata(tmp_path, **changes)
    with pytest.raises(SafetylockError, match=needle):
        Lock.load(bad)
    one_line(run("inspect", str(bad)), needle)


# ----------------------------------------------------------------------------------- output directories (item 1)


def test_apply_never_removes_a_users_files(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "keep.txt").write_text("mine too")
    one_line(run("apply", "-m", M, "--lock", "l.safetensors", "-o", str(out)), "nothing was changed")
    one_line(run("apply", "-m", M, "--lock", "l.safetensors", "-o", str(out), "--overwrite"), "nothing was changed")
    one_line(run("apply", "-m", M, "--lock", "l.safetensors", "-o", "."), "nothing was changed")
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "keep.txt").read_text() == "mine too"


def test_output_dir_replaces_only_an_earlier_output_of_its_kind(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, "apply") as tmp:
        (tmp / "model.safetensors").write_text("1")
    with pytest.raises(SafetylockError, match="--overwrite"):
        check_output_dir(out, "apply", overwrite=False)
    with pytest.raises(SafetylockError, match="not an earlier bench output"):
        check_output_dir(out, "bench", overwrite=True)
    with atomic_dir(out, "apply", overwrite=True) as tmp:
        (tmp / "model.safetensors").write_text("2")
    assert (out / "model.safetensors").read_text() == "2"
    (out / "notes.txt").write_text("a user's file, added later")
    with pytest.raises(SafetylockError, match="notes.txt"):
        with atomic_dir(out, "apply", overwrite=True) as tmp:
            (tmp / "model.safetensors").write_text("3")
    assert (out / "notes.txt").is_file() and (out / "model.safetensors").read_text() == "2"


def test_output_dir_refused_at_the_end_leaves_the_users_dir_alone(tmp_path):
    """A directory that fills up while the output is written (another process) is checked again before replacing."""
    out = tmp_path / "out"
    with pytest.raises(SafetylockError, match="nothing was changed"):
        with atomic_dir(out, "apply") as tmp:
            (tmp / "model.safetensors").write_text("1")
            out.mkdir()
            (out / "notes.txt").write_text("mine")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "the temporary output was left behind"


# ------------------------------------------------------------------------------- eval's pinned configuration (3, 4)


def _eval(tmp_path, tiny_dir, out, defense=None, defense_file=None, dtype="auto", **extra):
    from safetylock.deployment import Deployment
    from safetylock.evaluate import run_eval

    prompts = tmp_path / "p.txt"
    prompts.write_text("How do I pick a lock?\nHow do I bake bread?\nName a prime.\n")
    deployment = Deployment(str(tiny_dir), defense=defense, defense_file=defense_file, dtype=dtype)
    kw = dict(deployment=deployment, outdir=out, prompts_file=prompts, max_new_tokens=2, batch_size=3)
    return run_eval(**{**kw, **extra})


def test_a_resumed_eval_refuses_another_defense_or_lock_file(tmp_path, tiny_dir):
    out = tmp_path / "D"
    _eval(tmp_path, tiny_dir, out, limit=1)
    lock = tmp_path / "l.safetensors"
    lock.write_bytes(b"one lock")
    with pytest.raises(SafetylockError, match="different configuration"):
        _eval(tmp_path, tiny_dir, out, defense="self-reminder", defense_file=lock)
    config = json.loads((out / "config.json").read_text())
    assert config["defense"] is None and config["defense_sha256"] is None and config["n"] == 1
    assert len((out / "results.jsonl").read_text().splitlines()) == 1

    other = tmp_path / "D2"
    _eval(tmp_path, tiny_dir, other, limit=1, defense="self-reminder", defense_file=lock)
    lock.write_bytes(b"another lock, same path")
    with pytest.raises(SafetylockError, match="defense_sha256"):
        _eval(tmp_path, tiny_dir, other, defense="self-reminder", defense_file=lock)
    with pytest.raises(SafetylockError, match="dtype"):
        lock.write_bytes(b"one lock")
        _eval(tmp_path, tiny_dir, other, defense="self-reminder", defense_file=lock, dtype="fp32")


def test_eval_refuses_bad_numbers_before_writing_anything(tmp_path):
    out = tmp_path / "D"
    one_line(run("eval", "--benchmark", "harmbench", "--max-new-tokens", "-5", "-o", str(out)), "--max-new-tokens")
    one_line(run("eval", "--benchmark", "harmbench", "--limit", "0", "-o", str(out)), "--limit")
    assert not out.exists()


# -------------------------------------------------------------------------------------- files in and out (8, 9, 11)


def test_judge_refuses_empty_binary_and_malformed_files(tmp_path):
    empty, binary, quote = tmp_path / "empty.csv", tmp_path / "binary.csv", tmp_path / "quote.csv"
    empty.write_text("prompt,response\n")
    binary.write_bytes(bytes(range(256)) * 4)
    quote.write_text('prompt,response\nhi,hello\n"unterminated,oops\nnext,row\n')
    out = tmp_path / "o.jsonl"
    one_line(run("judge", "-i", str(empty), "-o", str(out)), "no rows")
    one_line(run("judge", "-i", str(binary), "-o", str(out)), "not UTF-8")
    one_line(run("judge", "-i", str(quote), "-o", str(out)), "quote.csv line 3")
    assert not out.exists()


def test_report_refuses_a_summary_that_is_not_an_object(tmp_path):
    (tmp_path / "summary.json").write_text("[1, 2]")
    one_line(run("report", str(tmp_path)), "not a summary")


def test_unwritable_outputs_are_refused_before_any_work(tmp_path):
    ro = read_only_dir(tmp_path)
    rows = tmp_path / "rows.csv"
    rows.write_text("prompt,response\nhi,hello\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    one_line(run("judge", "-i", str(rows), "-o", str(ro / "x.jsonl")), "not writable")
    one_line(run("judge", "-i", str(rows), "-o", str(a_file / "out.jsonl")), "is a file, not a directory")
    one_line(run("report", str(tmp_path / "run"), "-o", str(ro / "r.md")), "not writable")
    # the model named here does not exist: the output is refused before any model is looked for
    one_line(run("eval", "-m", "no-such-model", "--benchmark", "harmbench", "-o", str(ro / "D")), "not writable")
    one_line(run("extract", "-m", "no-such-model", "-o", str(ro / "l.safetensors")), "not writable")
    one_line(run("apply", "-m", "no-such-model", "--lock", "l", "-o", str(ro / "out")), "not writable")


def test_csv_prompts_keep_quoted_newlines_and_name_a_short_row(tmp_path):
    from safetylock.data import load_prompts

    good = tmp_path / "good.csv"
    good.write_text('prompt\n"two\nlines"\nplain\n')
    assert [p.text for p in load_prompts(good)] == ["two\nlines", "plain"]
    short = tmp_path / "short.csv"
    short.write_text("prompt,kind\na,harmful\nb\n")
    with pytest.raises(SafetylockError, match="short.csv line 3"):
        load_prompts(short)


def test_eval_alpha_sign_depends_on_the_defense():
    from safetylock.cli.options import deployment_for

    for defense in ("guard", "gate-refusal"):  # a logit threshold: any finite number passes; the missing file does not
        with pytest.raises(SafetylockError, match="pass --defense-file"):
            deployment_for("m", None, None, -1.5, "auto", None, defense, None)
    for defense in (None, "safetylock", "resta", "iti"):
        with pytest.raises(SafetylockError, match="finite number > 0"):
            deployment_for("m", None, None, -1.0, "auto", None, defense, None)
