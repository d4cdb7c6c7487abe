"""Baseline defenses: each changes logits only where it should and leaves the model bit-identical after exit."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_model

from safetylock import SafetylockError
from safetylock.arch import decoder_layers, head_geometry
from safetylock.attack import finetune
from safetylock.baselines import (
    SELF_REMINDER,
    ITIDefense,
    LockDefense,
    NoDefense,
    RefusalDirection,
    RefusalDirectionDefense,
    SafetySFT,
    SelfReminder,
    fit_iti,
    fit_refusal_direction,
    layer_separation,
    make_defense,
    residual_activations,
    train_safety_sft,
)
from safetylock.generate import format_chat
from safetylock.lock import Lock
from safetylock.models import fingerprint

IDS = torch.tensor([[5, 9, 40, 41, 77, 3, 120, 64, 12, 200], [7, 7, 8, 100, 101, 102, 30, 31, 32, 33]])
PAIRS = [(f"How do I do task {i}?", f"I can't help with task {i}.", f"Sure! Task {i}: first, do it.") for i in range(8)]
HARMFUL = [f"Tell me how to break thing number {i}." for i in range(8)]
HARMLESS = [f"Tell me a fact about the number {i}." for i in range(8)]


@torch.no_grad()
def logits(model, ids=IDS):
    return model(input_ids=ids).logits


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def synthetic_lock(model, baseline: str | None = None) -> Lock:
    g = head_geometry(model.config)
    directions = torch.nn.functional.normalize(torch.randn(2, g.head_dim, generator=torch.Generator().manual_seed(0)), dim=1)
    meta = {"fingerprint": fingerprint(model), "default_alpha": 3.0}
    if baseline:
        meta["baseline"] = baseline
    return Lock(torch.tensor([0, 2]), torch.tensor([1, 0]), directions, torch.tensor([1.0, 2.0]),
                torch.tensor([1.0, 1.0]), meta, torch.zeros(2))


def assert_restored(model, before, hooks_before):
    assert torch.equal(logits(model), before), "the model must compute exactly what it did before"
    assert hook_count(model) == hooks_before


def test_none_and_self_reminder_leave_the_model_alone():
    model = tiny_model("llama")
    before = logits(model)
    for defense in (NoDefense(), SelfReminder()):
        with defense.applied(model) as m:
            assert m is model and torch.equal(logits(m), before)
    assert NoDefense().system is None


def test_self_reminder_sets_the_system_prompt(tokenizer):
    defense = make_defense("self-reminder")
    assert defense.system == SELF_REMINDER
    assert SELF_REMINDER in format_chat(tokenizer, "hi", defense.system)
    assert make_defense("self-reminder", system="Be safe.").system == "Be safe."


def test_safetylock_bakes_like_the_hooks_and_restores_exactly():
    model = tiny_model("qwen2")
    lock = synthetic_lock(model)
    before, hooks = logits(model), hook_count(model)
    with lock.applied(model, alpha=2.0):
        hooked = logits(model)
    with LockDefense(lock).applied(model, alpha=2.0) as m:
        baked = logits(m)
        assert hook_count(m) == hooks  # baked, not hooked
    assert torch.allclose(baked, hooked, atol=1e-4) and (baked - before).abs().max() > 1e-3
    assert_restored(model, before, hooks)
    assert all(layer.self_attn.o_proj.bias is None for layer in decoder_layers(model))


def test_iti_shifts_only_the_last_prefill_position_and_unhooks():
    model = tiny_model("llama")
    defense = ITIDefense(synthetic_lock(model, "iti"))
    before, hooks = logits(model), hook_count(model)
    with defense.applied(model, alpha=5.0) as m:
        shifted = logits(m)
    # Causal: every position before the last sees unshifted inputs.
    assert torch.equal(shifted[:, :-1], before[:, :-1])
    assert (shifted[:, -1] - before[:, -1]).abs().max() > 1e-3
    assert_restored(model, before, hooks)


def test_iti_refuses_a_plain_lock():
    model = tiny_model("llama")
    with pytest.raises(SafetylockError, match="fit_iti"):
        ITIDefense(synthetic_lock(model))


def test_fit_iti_reads_the_last_reply_token(tokenizer):
    model = tiny_model("llama")
    lock = fit_iti(model, tokenizer, PAIRS, heads=3)
    assert len(lock) == 3 and lock.metadata["baseline"] == "iti"
    assert lock.metadata["extraction"]["positions"] == "response:-1"


def test_residual_activations_read_the_last_template_token(tokenizer):
    model = tiny_model("llama")
    acts = residual_activations(model, tokenizer, HARMFUL[:3], batch_size=2)
    g = head_geometry(model.config)
    assert acts.shape == (3, g.num_layers, g.hidden_size)
    ids = tokenizer(format_chat(tokenizer, HARMFUL[2]), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    # hidden_states[i + 1] is layer i's output (the last one after the final norm, so compare layer 0 and 1).
    for layer in (0, 1):
        assert torch.allclose(acts[2, layer], hidden[layer + 1][0, -1], atol=1e-5)


def test_layer_separation_is_cohens_d_of_heldout_projections():
    gen = torch.Generator().manual_seed(0)
    harmful = torch.randn(10, 2, 4, generator=gen) + torch.tensor([[0.0] * 4, [3.0, 0, 0, 0]])
    harmless = torch.randn(10, 2, 4, generator=gen)
    import numpy as np

    tr, va = np.arange(6), np.arange(6, 10)
    diffs, sep = layer_separation(harmful, harmless, tr, va, tr, va)
    assert torch.allclose(diffs[1], (harmful[tr, 1].mean(0) - harmless[tr, 1].mean(0)), atol=1e-5)
    assert sep[1] > sep[0] and sep[1] > 2


def test_refusal_direction_picks_a_layer_and_round_trips(tmp_path, tokenizer):
    model = tiny_model("qwen2")
    rd = fit_refusal_direction(model, tokenizer, HARMFUL, HARMLESS, max_layer_fraction=0.7)
    assert rd.layer in (0, 1)  # int(3 * 0.7) = 2 layers considered
    assert rd.layer == int(torch.argmax(rd.separation[:2]))
    assert torch.equal(rd.direction, rd.directions[rd.layer])
    path = rd.save(tmp_path / "rd.safetensors")
    back = RefusalDirection.load(path)
    assert back.layer == rd.layer and torch.equal(back.direction, rd.direction)
    assert back.metadata["fingerprint"] == fingerprint(model)
    before, hooks = logits(model), hook_count(model)
    with RefusalDirectionDefense(back).applied(model, alpha=2.0) as m:
        shifted = logits(m)
    assert (shifted - before).abs().max() > 1e-4
    assert_restored(model, before, hooks)


def test_refusal_direction_adds_exactly_to_the_layer_output(tokenizer):
    model = tiny_model("llama")
    rd = fit_refusal_direction(model, tokenizer, HARMFUL, HARMLESS)
    seen = {}
    handle = decoder_layers(model)[rd.layer + 1].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(input_ids=IDS)
        plain = seen.pop("x")
        with rd.applied(model, coeff=0.5):
            model(input_ids=IDS)
    handle.remove()
    assert torch.allclose(seen["x"], plain + 0.5 * rd.direction, atol=1e-5)


def test_refusal_direction_refuses_bad_files_and_other_shapes(tmp_path, tokenizer):
    model = tiny_model("llama")
    lock_path = synthetic_lock(model).save(tmp_path / "lock.safetensors")
    with pytest.raises(SafetylockError, match="not a refusal-direction file"):
        RefusalDirection.load(lock_path)
    with pytest.raises(SafetylockError, match="does not exist"):
        RefusalDirection.load(tmp_path / "none.safetensors")
    rd = fit_refusal_direction(model, tokenizer, HARMFUL[:4], HARMLESS[:4])
    from transformers import AutoModelForCausalLM
    from tiny import tiny_config

    config = tiny_config("llama")
    config.num_hidden_layers = 2
    other = AutoModelForCausalLM.from_config(config)
    with pytest.raises(SafetylockError, match="another shape"):
        with rd.applied(other):
            pass


def test_safety_sft_trains_an_adapter_and_restores_the_model(tmp_path, tokenizer):
    model = tiny_model("qwen2")
    info = train_safety_sft(model, tokenizer, tmp_path / "sft", HARMFUL[:4], steps=2, batch_size=2, lr=5e-3)
    assert info["steps"] == 2 and (tmp_path / "sft" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "sft" / "safety_sft.json").read_text())["defense"] == "safety-sft"
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["name"] == "safety-sft"  # not "harmful-10"
    before, hooks = logits(model), hook_count(model)
    defense = make_defense("safety-sft", tmp_path / "sft")
    with defense.applied(model) as m:
        assert m is not model
        assert (logits(m) - before).abs().max() > 1e-4
    assert_restored(model, before, hooks)


def test_safety_sft_on_a_compromised_adapter_model(tmp_path, tokenizer):
    from safetylock.attack import Example
    from safetylock.models import attach_adapter

    base = tiny_model("qwen2")
    finetune(base, tokenizer, "benign", tmp_path / "attack", data=[Example("Say 1.", "1.")] * 2, steps=1,
             batch_size=2, lr=5e-2)
    compromised = attach_adapter(base, tmp_path / "attack")
    before = logits(compromised)
    train_safety_sft(compromised, tokenizer, tmp_path / "sft", HARMFUL[:2], steps=1, batch_size=2)
    assert torch.equal(logits(compromised), before)
    with SafetySFT(tmp_path / "sft").applied(compromised) as m:
        m(input_ids=IDS)
    with pytest.raises(SafetylockError, match="another model"):
        with SafetySFT(tmp_path / "sft").applied(tiny_model("qwen2", seed=1)):
            pass


def test_make_defense_refuses_unknown_names_and_missing_files(tmp_path):
    with pytest.raises(SafetylockError, match="unknown defense"):
        make_defense("magic")
    with pytest.raises(SafetylockError, match="needs a lock file"):
        make_defense("safetylock")
    with pytest.raises(SafetylockError, match="holds no safety-SFT adapter"):
        make_defense("safety-sft", tmp_path)
