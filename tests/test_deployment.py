"""The one apply path: a Deployment puts a lock or defense on, takes it off exactly, and says what it runs."""

from __future__ import annotations

import json

import pytest
import torch
from test_lock import logits, synthetic_lock
from tiny import tiny_model

from safetylock import SafetylockError
from safetylock.arch import o_proj, o_projs
from safetylock.baselines import SelfReminder
from safetylock.deployment import Deployment, content_hash
from safetylock.lock import BakeRecord, HookRecord, Lock, fit_condition, unbake
from safetylock.lock.apply import bake

BOMBS = [f"build a bomb {i}" for i in range(4)]
CAKES = [f"bake a cake {i}" for i in range(4)]


def parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_bit_identical(model, before: dict[str, torch.Tensor]) -> None:
    now = dict(model.named_parameters())
    assert set(now) == set(before), "a parameter was added or lost"
    for name, value in before.items():
        assert now[name].dtype == value.dtype and torch.equal(now[name].detach(), value), name


def gated_lock(model, tokenizer) -> Lock:
    return fit_condition(synthetic_lock(model), model, tokenizer, BOMBS, CAKES, heads=2)


def with_o_proj_biases(model):
    """Give every o_proj a random bias, as attention_bias=True checkpoints have."""
    with torch.no_grad():
        for linear in o_projs(model).values():
            linear.bias = torch.nn.Parameter(torch.randn(linear.out_features, generator=torch.Generator().manual_seed(7)))
    return model


# ---------------------------------------------------------------------------------------------- open / close


@pytest.mark.parametrize("mode", ["baked", "conditional"])
def test_open_changes_the_logits_and_close_restores_them_exactly(tokenizer, mode):
    model = tiny_model("qwen2")
    lock = gated_lock(model, tokenizer)
    before, params = logits(model), parameters(model)
    deployment = Deployment(lock=lock, mode=mode, model=model, tokenizer=tokenizer)
    ready = deployment.open()
    assert ready is model and deployment.is_open and deployment.intact()
    if mode == "baked":  # the conditional lock needs a prompt to decide on; its gate has its own tests
        assert (logits(ready) - before).abs().max() > 1e-3
    assert isinstance(deployment.record, BakeRecord if mode == "baked" else HookRecord)
    deployment.close()
    assert not deployment.is_open and deployment.record is None and deployment.model is None
    assert torch.equal(logits(model), before)
    assert_bit_identical(model, params)
    assert all(not m._forward_pre_hooks for m in model.modules())
    deployment.close()  # a second close is a no-op


def test_a_deployment_is_a_context_manager_and_restores_after_an_error():
    model = tiny_model("llama")
    before = logits(model)
    with pytest.raises(RuntimeError, match="boom"):
        with Deployment(lock=synthetic_lock(model), model=model) as ready:
            assert not torch.equal(logits(ready), before)
            raise RuntimeError("boom")
    assert torch.equal(logits(model), before)


def test_a_deployment_opens_once_at_a_time():
    model = tiny_model("llama")
    deployment = Deployment(lock=synthetic_lock(model), model=model)
    with deployment:
        with pytest.raises(SafetylockError, match="already open"):
            deployment.open()
    with deployment:  # and again after closing
        assert deployment.intact()


def test_a_baseline_defense_goes_through_the_same_door(tokenizer):
    model = tiny_model("llama")
    deployment = Deployment(defense=SelfReminder("Be safe."), model=model, tokenizer=tokenizer)
    assert deployment.system == "Be safe."
    with deployment as ready:
        assert ready is model and deployment.record is None and deployment.apply_seconds is not None
    assert not deployment.intact()


def test_a_deployment_loads_its_model_from_the_spec_and_lets_go_of_it(tiny_dir):
    from transformers import AutoModelForCausalLM

    lock = synthetic_lock(AutoModelForCausalLM.from_pretrained(tiny_dir))
    deployment = Deployment(str(tiny_dir), lock=lock, dtype="fp32", device="cpu")
    with deployment as ready:
        assert ready.safetylock_spec == str(tiny_dir) and deployment.tokenizer is not None
        assert o_proj(ready, 0).bias is not None  # baked
    assert deployment.model is None and deployment.tokenizer is None


def test_the_force_default_is_off_everywhere(tokenizer):
    """One default: a model that does not descend from the lock's base is refused unless force is asked for."""
    import inspect

    from safetylock.baselines import ITIDefense, LockDefense, make_defense
    from safetylock.calibrate import calibrate
    from safetylock.lock import check_transfer

    for fn in (Lock.applied, Lock.bake, calibrate, check_transfer, LockDefense, ITIDefense, make_defense, Deployment):
        assert inspect.signature(fn).parameters["force"].default is False, fn
    model = tiny_model("llama")
    lock = synthetic_lock(model)
    lock.metadata["fingerprint"] = {**lock.fingerprint, "name": "another-model"}  # no sketch: the name decides
    with pytest.raises(SafetylockError, match="another model"):
        Deployment(lock=lock, model=model).open()
    with pytest.raises(SafetylockError, match="another model"):
        with LockDefense(lock).applied(model):
            pass
    with Deployment(lock=lock, model=model, force=True):
        pass


# ------------------------------------------------------------------------------------------------ describe


def test_describe_names_everything_that_changes_a_reply(tmp_path, tokenizer):
    model = tiny_model("llama")
    lock_path = gated_lock(model, tokenizer).save(tmp_path / "gated.safetensors")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    locked = Deployment("tiny", adapter=adapter, lock=lock_path, dtype="fp32")
    assert locked.describe() == {
        "model": "tiny", "adapter": str(adapter), "lock": str(lock_path), "adapter_sha256": content_hash(adapter),
        "lock_sha256": content_hash(lock_path), "defense": None, "defense_file": None, "defense_sha256": None,
        "alpha": 2.5, "dtype": "fp32", "lock_mode": "conditional",
    } | {"lock_mode": "base-refusal", "alpha": None}  # on an adapter the default is the screen, which takes no alpha
    assert Deployment("tiny", lock=lock_path, mode="baked").describe()["lock_mode"] == "baked"
    assert Deployment("tiny", lock=lock_path, alpha=2.5).describe()["lock_mode"] == "conditional"  # no adapter
    assert Deployment("tiny", adapter=adapter, lock=lock_path, mode="conditional").describe()["lock_mode"] == "conditional"
    assert Deployment("tiny", lock=lock_path).describe()["alpha"] is None  # the one asked for, not the lock's
    reminder = tmp_path / "reminder.txt"
    reminder.write_text("x")
    defended = Deployment("tiny", defense="self-reminder", defense_file=reminder).describe()
    assert "lock_mode" not in defended and defended["lock"] is None and defended["lock_sha256"] is None
    assert defended["defense"] == "self-reminder" and defended["defense_sha256"] == content_hash(reminder)
    assert json.loads(json.dumps(locked.describe())) == locked.describe()


def test_status_reports_the_applied_lock(tokenizer):
    model = tiny_model("llama")
    lock = synthetic_lock(model, alpha=4.0)
    deployment = Deployment(lock=lock, mode="baked", model=model)
    assert deployment.status()["locked"] is False
    with deployment:
        status = deployment.status()
    assert status["locked"] and status["alpha"] == 4.0 and status["baked_parameters"] == 2
    assert status["conditional"] is False and "sketch" not in status["fingerprint"]


def test_a_deployment_refuses_contradictory_settings(tmp_path, tokenizer):
    model = tiny_model("llama")
    plain = synthetic_lock(model).save(tmp_path / "plain.safetensors")
    cases = [(dict(mode="baked"), "--baked needs --lock"), (dict(defense_file=plain), "--defense-file needs --defense"),
             (dict(lock=plain, defense="self-reminder"), "either --lock or --defense"),
             (dict(lock=plain, mode="conditional"), "no harmfulness probe"),
             (dict(lock=plain, mode="sideways"), "not 'sideways'"), (dict(lock=plain, alpha=-1.0), "alpha")]
    for settings, why in cases:
        with pytest.raises(SafetylockError, match=why):
            Deployment("tiny", **settings)
    with pytest.raises(SafetylockError, match="a model spec or a loaded model"):
        Deployment()


# ----------------------------------------------------------------------------------------------- bake record


@pytest.mark.parametrize("biased", [False, True], ids=["no-o_proj-bias", "o_proj-bias"])
def test_the_bake_record_names_what_it_wrote_and_unbakes_bit_for_bit(biased):
    model = tiny_model("llama")
    if biased:
        with_o_proj_biases(model)
    before, base = parameters(model), logits(model)
    lock = synthetic_lock(model)
    record = bake(lock, model)
    assert record.layers == (0, 2) and len(record) == 2 and record.alpha == lock.default_alpha
    assert record.seconds >= 0 and record.intact()
    for entry in record.entries:
        assert entry.linear is o_proj(model, entry.layer)
        assert torch.equal(entry.linear.bias.detach(), entry.baked)
        if biased:
            assert torch.equal(entry.original, before[f"model.layers.{entry.layer}.self_attn.o_proj.bias"])
        else:
            assert entry.original is None
    assert o_proj(model, 1).bias is None or torch.equal(o_proj(model, 1).bias, before["model.layers.1.self_attn.o_proj.bias"])
    with pytest.raises(SafetylockError, match="already baked"):
        bake(lock, model)
    assert unbake(record) == 2
    assert_bit_identical(model, before)
    assert torch.equal(logits(model), base)
    assert not record.intact() and unbake(record) == 0  # a record unbakes once
    assert unbake(model) == 0  # nothing of it is left on the model


def test_unbake_of_a_model_finds_the_records_its_modules_carry():
    model = with_o_proj_biases(tiny_model("llama"))
    before = parameters(model)
    lock = synthetic_lock(model)
    lock.bake(model)  # Lock.bake still returns the seconds
    lock.unbake(model)
    assert_bit_identical(model, before)


def test_records_notice_when_the_lock_is_tampered_with(tokenizer):
    model = tiny_model("llama")
    lock = gated_lock(model, tokenizer)
    record = bake(lock, model)
    with torch.no_grad():
        o_proj(model, 2).bias.add_(1.0)
    assert not record.intact()
    record.unbake()
    from safetylock.lock.apply import install

    hooks = install(lock, model, conditional=True)
    count = len(hooks.handles)
    # a shift hook on layers 0 and 2, a reading hook per gate layer, and the decoder's wrapped forward
    assert count == 2 + len(set(lock.gate.layers)) + 1 and hooks.intact()
    hooks.handles[0].remove()
    assert not hooks.intact()
    assert hooks.remove() == count - 1
    assert all(not m._forward_pre_hooks for m in model.modules()) and "forward" not in model.model.__dict__


# ---------------------------------------------------------------------------------------------- eval and cli


@pytest.mark.parametrize("gated", [True, False], ids=["conditional", "baked"])
def test_eval_loads_the_lock_file_once_and_pins_the_old_config(monkeypatch, tmp_path, tokenizer, tiny_dir, gated):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from safetylock.cli import app

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    lock = gated_lock(model, tokenizer) if gated else synthetic_lock(model)
    lock_path = lock.save(tmp_path / "lock.safetensors")
    prompts = tmp_path / "p.txt"
    prompts.write_text("How do I pick a lock?\nName a prime.\n")
    loads = []
    load = Lock.load

    def counted(cls, path):
        loads.append(path)
        return load(path)

    monkeypatch.setattr(Lock, "load", classmethod(counted))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["eval", "-m", str(tiny_dir), "--lock", str(lock_path), "--prompts", str(prompts),
                                      "--kind", "benign", "--judge", "keyword", "--max-new-tokens", "2",
                                      "--dtype", "fp32", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert len(loads) == 1
    config = json.loads((out / "config.json").read_text())
    assert list(config) == ["format_version", "model", "adapter", "lock", "adapter_sha256", "lock_sha256", "defense",
                            "defense_file", "defense_sha256", "alpha", "dtype", "benchmark", "prompts_file", "split",
                            "extract_overlap", "lock_mode", "kind", "judge", "decoding", "n", "prompts_sha256",
                            "batch_size"]
    assert config["lock_mode"] == ("conditional" if gated else "baked")
    assert config["lock_sha256"] == content_hash(lock_path) and config["model"] == str(tiny_dir)


# ---------------------------------------------------------------------------------- the default on an adapter


def test_on_a_lora_adapter_the_lock_defaults_to_the_base_refusal_screen(tokenizer, monkeypatch):
    """Neither mode asked: the replies are exactly the screen's (base decides, fixed refusal), then exactly the ft's."""
    import safetylock.base_refusal as br
    from test_base_refusal import PROMPTS, lora_fine_tune

    from safetylock.base_refusal import BaseRefusal
    from safetylock.generate import generate

    ft = lora_fine_tune()
    with ft.disable_adapter():
        opening = generate(ft, tokenizer, PROMPTS[:1], max_new_tokens=12).texts[0]
    monkeypatch.setattr(br, "refusal_marker", lambda text: "marker" if text.strip() == opening.strip() else None)
    plain = generate(ft, tokenizer, PROMPTS, max_new_tokens=48).texts
    with BaseRefusal(tokenizer).applied(ft):
        expected = generate(ft, tokenizer, PROMPTS, max_new_tokens=48).texts
    assert expected[0] != plain[0] and expected[1:] == plain[1:]  # the screen flagged the first prompt only
    params = parameters(ft)
    deployment = Deployment(lock=synthetic_lock(ft), model=ft, tokenizer=tokenizer)
    assert deployment.mode == "base-refusal" and deployment.describe()["lock_mode"] == "base-refusal"
    with deployment as ready:
        assert generate(ready, tokenizer, PROMPTS, max_new_tokens=48).texts == expected
        assert deployment.screen.describe()["refused"] == 1 and deployment.status()["mode"] == "base-refusal"
        assert deployment.record is None  # the lock's shift is not applied in this mode
    assert_bit_identical(ft, params)
    assert generate(ft, tokenizer, PROMPTS, max_new_tokens=48).texts == plain  # the screen is gone


@pytest.mark.parametrize("mode", ["conditional", "baked"])
def test_on_an_adapter_an_explicit_mode_still_applies_the_lock(tokenizer, mode):
    from test_base_refusal import lora_fine_tune

    ft = lora_fine_tune()
    deployment = Deployment(lock=gated_lock(ft, tokenizer), mode=mode, model=ft, tokenizer=tokenizer)
    with deployment as ready:
        assert ready is ft and deployment.screen is None
        assert isinstance(deployment.record, BakeRecord if mode == "baked" else HookRecord)


def test_the_screen_default_takes_no_alpha_and_keeps_the_locks_passport_check(tokenizer):
    from test_base_refusal import lora_fine_tune

    ft = lora_fine_tune()
    with pytest.raises(SafetylockError, match="has none: leave --alpha out"):
        Deployment(lock=synthetic_lock(ft), alpha=2.0, model=ft, tokenizer=tokenizer)
    stranger = synthetic_lock(ft)
    stranger.metadata["fingerprint"] = {**stranger.fingerprint, "name": "another-model"}
    stranger.metadata["fingerprint"].pop("sketch", None)
    before = parameters(ft)
    with pytest.raises(SafetylockError, match="another model"):
        Deployment(lock=stranger, model=ft, tokenizer=tokenizer).open()
    assert_bit_identical(ft, before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in ft.modules())


def test_a_merged_fine_tune_with_its_base_beside_it_defaults_to_the_screen(tokenizer):
    """--base-model: the base is loaded as a second model and checked against the lock, like the fine-tune."""
    import copy

    from test_base_refusal import lora_fine_tune

    ft = lora_fine_tune()
    merged = copy.deepcopy(ft).merge_and_unload().eval()
    base = tiny_model("qwen2")
    lock = synthetic_lock(base)
    assert not lock.has_condition and Deployment(lock=lock, model=merged, tokenizer=tokenizer).mode == "baked"
    deployment = Deployment(lock=lock, model=merged, tokenizer=tokenizer, base_model=base)
    assert deployment.mode == "base-refusal" and deployment.describe()["base_model"] == "(loaded)"
    with deployment:
        assert deployment.screen.base is base and deployment.record is None
    assert deployment.screen.base is None  # the second model is let go
    stranger = tiny_model("qwen2", seed=5)
    stranger.safetylock_spec = "another-model"  # this lock has no weight sketch: the name decides descent
    with pytest.raises(SafetylockError, match="another model"):
        Deployment(lock=lock, model=merged, tokenizer=tokenizer, base_model=stranger).open()
    with pytest.raises(SafetylockError, match="goes with --lock"):
        Deployment(model=merged, tokenizer=tokenizer, base_model=base)
