"""A lock fits a model by descent, judged from a sketch of the base's weights, not by the model's name."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny import tiny_model

from safetylock import SafetylockError
from safetylock.arch import head_geometry
from safetylock.lock import Lock, extract
from safetylock.models import SKETCH_THRESHOLD, fingerprint, load_model, sketch_distance, weight_sketch

PAIRS = [(f"How do I do task {i}?", f"I can't help with task {i}.", f"Sure! Task {i}: first, do it.") for i in range(8)]


def sketched_lock(model, name: str = "some-base") -> Lock:
    """Return a one-head lock whose fingerprint carries the sketch of `model`'s weights, under `name`."""
    return Lock(
        layers=torch.tensor([1]),
        heads=torch.tensor([0]),
        directions=torch.nn.functional.normalize(torch.ones(1, head_geometry(model.config).head_dim), dim=1),
        stds=torch.tensor([1.0]),
        scores=torch.tensor([1.0]),
        metadata={"fingerprint": fingerprint(model, name, sketch=True), "default_alpha": 1.5},
    )


def perturbed(model, relative: float, seed: int = 1):
    """Return a copy with every matrix moved by Gaussian noise of `relative` times its std (a fine-tune's size)."""
    gen = torch.Generator().manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * relative)
    return other


def distance(lock: Lock, model) -> float:
    found = sketch_distance(lock.fingerprint["sketch"], weight_sketch(model))
    assert found is not None
    return found[0]


def test_extract_records_a_small_json_sketch(tokenizer):
    model = tiny_model("qwen2")
    lock = extract(model, tokenizer, PAIRS, heads=4, seed=0)
    sketch = json.loads(json.dumps(lock.fingerprint["sketch"]))
    floats = sum(len(m["rows"]) for m in sketch["matrices"].values())
    assert 0 < floats <= 400
    assert "embed" in sketch["matrices"] and "layer0.self_attn.q_proj" in sketch["matrices"]


def test_sketch_is_reproducible_and_fingerprint_omits_it_unless_asked():
    assert weight_sketch(tiny_model("llama")) == weight_sketch(tiny_model("llama"))
    assert "sketch" not in fingerprint(tiny_model("llama"))


def test_same_weights_under_another_name_are_accepted_without_force():
    model = tiny_model("qwen2")
    lock = sketched_lock(model, name="qwen2.5-coder-1.5b-instruct")
    model.safetylock_spec = "/some/merged/dir"
    assert distance(lock, model) == 0.0
    lock.validate(model)


def test_a_fine_tune_sized_change_is_accepted():
    model = tiny_model("qwen2")
    lock = sketched_lock(model)
    tuned = perturbed(model, 1e-2)
    assert 1e-3 < distance(lock, tuned) < 0.05  # measured 0.0095
    lock.validate(tuned)


def test_another_init_of_the_same_config_is_refused_with_the_distance_unless_forced():
    lock = sketched_lock(tiny_model("qwen2", seed=0))
    other = tiny_model("qwen2", seed=1)
    with pytest.raises(SafetylockError, match=rf"relative distance 1\.\d+ .*> {SKETCH_THRESHOLD:g}") as info:
        lock.validate(other)
    assert "\n" not in str(info.value)
    lock.validate(other, force=True)


def test_the_base_with_shuffled_rows_is_refused():
    model = tiny_model("llama")
    lock = sketched_lock(model)
    shuffled = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in shuffled.parameters():
            if p.dim() == 2:
                p.copy_(p[torch.randperm(p.shape[0], generator=gen)])
    assert distance(lock, shuffled) > 1.0  # measured 1.46
    with pytest.raises(SafetylockError, match="far from"):
        lock.validate(shuffled)


def test_a_bf16_copy_of_the_fp32_base_is_accepted_both_ways():
    model = tiny_model("qwen2")
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert distance(sketched_lock(model), half) < 5e-3  # bf16 rounding: measured 0.0017
    sketched_lock(model).validate(half)
    sketched_lock(half).validate(model)


def test_a_lora_wrapped_fine_tune_is_close_merged_or_not():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("qwen2")
    lock = sketched_lock(model)
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules="all-linear"))
    assert distance(lock, wrapped) == 0.0  # unmerged: the base weights themselves are sketched
    lock.validate(wrapped)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    wrapped.merge_adapter()
    assert 0.0 < distance(lock, wrapped) < 0.1
    lock.validate(wrapped)
    lock.validate(wrapped.merge_and_unload())


def test_a_lock_without_a_sketch_keeps_the_name_check():
    model = tiny_model("qwen2")
    lock = sketched_lock(model)
    del lock.metadata["fingerprint"]["sketch"]
    with pytest.raises(SafetylockError, match="name 'some-base'.*--force"):
        lock.validate(model)
    lock.validate(model, force=True)


def test_a_vocab_mismatch_still_needs_force_even_with_close_weights():
    model = tiny_model("qwen2")
    lock = sketched_lock(model)
    lock.metadata["fingerprint"]["vocab_size"] = 999
    with pytest.raises(SafetylockError, match="vocab_size '999'.*--force"):
        lock.validate(model)
    lock.validate(model, force=True)


def test_a_saved_lock_fits_the_base_saved_by_someone_else_and_loaded_by_path(tmp_path, tiny_dir):
    lock = sketched_lock(tiny_model("qwen2"), name="tiny-alias")  # tiny_dir holds tiny_model("qwen2")
    back = Lock.load(lock.save(tmp_path / "lock.safetensors"))
    model, _ = load_model(str(tiny_dir), dtype="bf16", device="cpu")
    back.validate(model)
    with back.applied(model):
        model(input_ids=torch.tensor([[3, 4, 5]]))


@pytest.mark.slow
def test_real_05b_alias_fits_its_plain_saved_copy_by_path(tmp_path):
    real = "qwen2.5-coder-0.5b-instruct"
    model, tokenizer = load_model(real, dtype="fp32", device="cpu")
    lock = sketched_lock(model, name=real)
    model.save_pretrained(tmp_path / "copy", safe_serialization=True)  # what someone else's script writes
    tokenizer.save_pretrained(tmp_path / "copy")
    del model
    copy_model, _ = load_model(str(tmp_path / "copy"), dtype="bf16", device="cpu")
    assert distance(lock, copy_model) < 5e-3  # same weights read back in bf16
    lock.validate(copy_model)


def test_cli_apply_bakes_into_a_fine_tune_saved_elsewhere_and_refuses_an_unrelated_model(tmp_path, tokenizer):
    import subprocess
    import sys

    base = tiny_model("qwen2")
    lock = sketched_lock(base, name="qwen2.5-coder-1.5b-instruct").save(tmp_path / "lock.safetensors")
    for name, model in (("tuned", perturbed(base, 1e-2)), ("unrelated", tiny_model("qwen2", seed=1))):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)

    def apply(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "safetylock.cli", "apply", "-m", str(tmp_path / name), "--lock",
                               str(lock), "-o", str(tmp_path / f"{name}-locked"), "--dtype", "fp32"],
                              capture_output=True, text=True, timeout=300)

    tuned = apply("tuned")
    assert tuned.returncode == 0, tuned.stderr
    unrelated = apply("unrelated")
    assert unrelated.returncode == 2
    assert "relative distance" in unrelated.stderr and "Traceback" not in unrelated.stderr
