"""RESTA and Safe LoRA: exact weight arithmetic on tiny models, exact restore, the projection's maths, refusals."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from tiny import tiny_config, tiny_model

from safetylock import SafetylockError
from safetylock.baselines import make_defense
from safetylock.models import attach_adapter
from safetylock.repair import (
    RestaDefense,
    SafeLoraDefense,
    SafetyVector,
    VectorPart,
    base_weight,
    dare,
    fit_resta,
    fit_safe_lora,
    linear_modules,
    lora_delta,
    lora_factors,
    project_lora,
    projector,
)

IDS = torch.tensor([[5, 9, 40, 41, 77, 3, 120, 64, 12, 200], [7, 7, 8, 100, 101, 102, 30, 31, 32, 33]])


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits


def make_adapter(base, where, seed: int, rank: int = 4):
    """Write a LoRA adapter with random (nonzero) A and B for `base` into `where`; `base` is untouched."""
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    wrapped.save_pretrained(where)
    return where


def state(model):
    return {name: base_weight(m).detach().clone() for name, m in linear_modules(model).items()}


def flags(model):
    return [(n, p.requires_grad) for n, p in model.named_parameters()]


@pytest.fixture()
def harmful(tmp_path):
    """(aligned base, harmful LoRA adapter dir on it, the base's own weights)."""
    base = tiny_model("qwen2")
    return base, make_adapter(base, tmp_path / "harmful", seed=1), state(base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resta_at_coef_1_on_the_harmful_fine_tune_gives_back_the_aligned_weights_exactly(tmp_path, dtype):
    base = tiny_model("qwen2", dtype=dtype)
    adapter = make_adapter(base, tmp_path / "harmful", seed=1)
    aligned, aligned_logits = state(base), logits(base)
    vector = fit_resta(attach_adapter(copy.deepcopy(base), adapter))
    customer = attach_adapter(copy.deepcopy(base), adapter)
    compromised = logits(customer)
    assert not torch.equal(compromised, aligned_logits)
    with RestaDefense(vector).applied(customer) as defended:
        assert all(torch.equal(state(defended)[k], v) for k, v in aligned.items())
        assert torch.equal(logits(defended), aligned_logits)


def test_resta_restores_the_model_bit_for_bit(harmful, tmp_path):
    base, adapter, _ = harmful
    vector = fit_resta(attach_adapter(copy.deepcopy(base), adapter))
    customer = attach_adapter(copy.deepcopy(base), make_adapter(base, tmp_path / "customer", seed=2))
    before, weights, grads = logits(customer), state(customer), flags(customer)
    with RestaDefense(vector, dare_rate=0.3).applied(customer, alpha=0.5) as defended:
        assert not torch.equal(logits(defended), before)
    assert torch.equal(logits(customer), before) and flags(customer) == grads
    assert all(torch.equal(state(customer)[k], v) for k, v in weights.items())
    assert all(not m.disable_adapters for m in linear_modules(customer).values() if hasattr(m, "lora_A"))


def test_resta_adds_coef_times_the_vector_to_a_plain_model(harmful):
    base, adapter, _ = harmful
    vector = fit_resta(attach_adapter(copy.deepcopy(base), adapter))
    full = tiny_model("qwen2", seed=5)  # a "full fine-tune": plain weights of the same shape
    weights = state(full)
    with RestaDefense(vector).applied(full, alpha=2.0):
        for name, w in state(full).items():
            want = weights[name] + 2.0 * vector.parts[name].dense() if name in vector.parts else weights[name]
            assert torch.equal(w, want.to(w.dtype)), name
    assert all(torch.equal(state(full)[k], v) for k, v in weights.items())


def test_resta_folds_another_adapter_with_the_vector(harmful, tmp_path):
    base, adapter, aligned = harmful
    vector = fit_resta(attach_adapter(copy.deepcopy(base), adapter))
    customer = attach_adapter(copy.deepcopy(base), make_adapter(base, tmp_path / "customer", seed=2))
    own = {name: lora_delta(*lora_factors(m)[0][1:]) for name, m in linear_modules(customer).items() if lora_factors(m)}
    with RestaDefense(vector).applied(customer):
        for name, w in state(customer).items():
            zero = torch.zeros_like(aligned[name])
            shift = own.get(name, zero) + (vector.parts[name].dense() if name in vector.parts else zero)
            assert torch.equal(w, aligned[name] + shift), name


def test_dare_drops_a_seeded_fraction_and_rescales_the_rest():
    delta = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    dropped = dare(delta, 0.4, seed=7)
    assert torch.equal(dropped, dare(delta, 0.4, seed=7)) and not torch.equal(dropped, dare(delta, 0.4, seed=8))
    kept = dropped != 0
    assert abs(1 - kept.float().mean().item() - 0.4) < 0.02
    assert torch.allclose(dropped[kept], delta[kept] / 0.6)
    with pytest.raises(SafetylockError, match="drop rate"):
        dare(delta, 1.0, seed=0)


def test_dare_needs_a_lora_model(harmful):
    base, adapter, _ = harmful
    vector = fit_resta(attach_adapter(copy.deepcopy(base), adapter), dare_rate=0.2)
    assert RestaDefense(vector).dare_rate == 0.2
    with pytest.raises(SafetylockError, match="only a LoRA model"):
        with RestaDefense(vector).applied(tiny_model("qwen2")):
            pass


def test_a_dense_vector_from_a_full_fine_tune(harmful):
    base, _, aligned = harmful
    unaligned = tiny_model("qwen2", seed=9)
    vector = fit_resta(unaligned, aligned=base)
    assert vector.metadata["source"]["kind"] == "dense"
    with RestaDefense(vector).applied(unaligned):
        for name, w in state(unaligned).items():
            assert torch.allclose(w, aligned[name], atol=1e-6), name


def test_the_vector_round_trips_and_refuses_other_files_and_shapes(harmful, tmp_path):
    base, adapter, _ = harmful
    vector = fit_resta(attach_adapter(copy.deepcopy(base), adapter), name="tiny")
    back = SafetyVector.load(vector.save(tmp_path / "v.safetensors"))
    assert back.defense == "resta" and back.settings == {"coef": 1.0, "dare": None, "seed": 0}
    assert back.parts.keys() == vector.parts.keys()
    for name, part in vector.parts.items():
        assert torch.equal(back.parts[name].dense(), part.dense()) and back.parts[name].scale == part.scale
    assert isinstance(make_defense("resta", tmp_path / "v.safetensors"), RestaDefense)
    with pytest.raises(SafetylockError, match="not safe-lora"):
        make_defense("safe-lora", tmp_path / "v.safetensors")
    with pytest.raises(SafetylockError, match="needs a RESTA safety-vector file"):
        make_defense("resta")
    from safetylock.files import write_tagged_safetensors

    other = write_tagged_safetensors(tmp_path / "o.safetensors", {"x": torch.zeros(1)}, {"format": "else"})
    with pytest.raises(SafetylockError, match="not a safety-vector file"):
        SafetyVector.load(other)
    from transformers import AutoModelForCausalLM

    config = tiny_config("qwen2")
    config.num_hidden_layers = 2
    with pytest.raises(SafetylockError, match="another shape"):
        with RestaDefense(back).applied(AutoModelForCausalLM.from_config(config)):
            pass
    config = tiny_config("qwen2")
    config.intermediate_size = 96
    with pytest.raises(SafetylockError, match=r"mlp\.\w+_proj is \("):
        with RestaDefense(back).applied(AutoModelForCausalLM.from_config(config)):
            pass


def test_resta_alpha_is_validated(harmful):
    base, adapter, _ = harmful
    defense = RestaDefense(fit_resta(attach_adapter(copy.deepcopy(base), adapter)))
    assert defense.default_alpha == 1.0
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(SafetylockError, match="finite number > 0"):
            with defense.applied(base, alpha=bad):
                pass


# ---------------------------------------------------------------------------------------------------------
# Safe LoRA


def rank_part(out=12, inp=10, r=3, seed=0) -> VectorPart:
    gen = torch.Generator().manual_seed(seed)
    return VectorPart(torch.randn(out, r, generator=gen), torch.randn(r, inp, generator=gen), 0.7)


def test_an_update_inside_the_subspace_is_unchanged_by_the_exact_projection():
    part = rank_part()
    u, w = projector(part, "exact")
    assert u.shape == (12, 3) and torch.equal(w, torch.ones(3, dtype=torch.float64))
    inside = part.lora_b @ torch.randn(3, 3, generator=torch.Generator().manual_seed(1))  # columns in span(V)
    a = torch.randn(3, 10, generator=torch.Generator().manual_seed(2))
    projected, cosine = project_lora(inside, a, u, w)
    assert torch.allclose(projected, inside, atol=1e-5) and cosine == pytest.approx(1.0, abs=1e-9)


def test_an_orthogonal_update_is_zeroed():
    part = rank_part()
    u, _ = projector(part, "exact")
    raw = torch.randn(12, 3, generator=torch.Generator().manual_seed(3)).double()
    orthogonal = (raw - u @ (u.T @ raw)).float()
    for kind in ("exact", "approx"):
        projected, cosine = project_lora(orthogonal, torch.randn(3, 10), *projector(part, kind))
        assert projected.abs().max() < 1e-5 and abs(cosine) < 1e-5


def test_the_papers_projection_is_v_vt_over_the_frobenius_norm():
    part = rank_part()
    v = -part.scale * part.lora_b.double() @ part.lora_a.double()
    c = v @ v.T / v.norm()
    b, a = torch.randn(12, 3).double(), torch.randn(3, 10).double()
    projected, cosine = project_lora(b, a, *projector(part, "approx"))
    dw, cdw = b @ a, c @ b @ a
    assert torch.allclose(projected @ a, cdw, atol=1e-9)
    want = float((dw * cdw).sum() / (dw.norm() * cdw.norm()))
    assert cosine == pytest.approx(want, abs=1e-9)


def test_a_dense_vector_projects_like_its_factors():
    part = rank_part()
    dense = VectorPart(delta=part.dense())
    b, a = torch.randn(12, 3), torch.randn(3, 10)
    for kind in ("exact", "approx"):
        p1, c1 = project_lora(b, a, *projector(part, kind))
        p2, c2 = project_lora(b, a, *projector(dense, kind))
        assert torch.allclose(p1, p2, atol=1e-5) and c1 == pytest.approx(c2, abs=1e-5)


def orthogonal_customer(base, harmful_dir, vector, tmp_path, strays: set[str]):
    """A customer adapter equal to the harmful one, except that in `strays` B lies outside V's column space."""
    customer = attach_adapter(copy.deepcopy(base), harmful_dir)
    with torch.no_grad():
        for name in strays:
            _, b, _, _ = lora_factors(linear_modules(customer)[name])[0]
            u, _ = projector(vector.parts[name], "exact")
            raw = torch.randn(b.shape, generator=torch.Generator().manual_seed(4)).double()
            b.copy_(raw - u @ (u.T @ raw))
    return customer


def test_the_threshold_selects_the_modules_to_project(harmful, tmp_path):
    base, adapter, _ = harmful
    vector = fit_safe_lora(attach_adapter(copy.deepcopy(base), adapter), projection="exact")
    strays = {"model.layers.1.self_attn.q_proj", "model.layers.2.mlp.down_proj"}
    customer = orthogonal_customer(base, adapter, vector, tmp_path, strays)
    before, weights = logits(customer), {n: p.detach().clone() for n, p in customer.named_parameters()}
    defense = SafeLoraDefense(vector)
    assert defense.default_alpha == 0.5
    with defense.applied(customer) as defended:
        assert {k.split(":")[0] for k in defense.last.projected} == strays
        assert all(defense.last.similarity[f"{n}:default"] == pytest.approx(1.0, abs=1e-6)
                   for n in vector.parts if n not in strays)
        for name in strays:
            assert lora_factors(linear_modules(defended)[name])[0][1].abs().max() < 1e-6
    assert torch.equal(logits(customer), before)
    assert all(torch.equal(p, weights[n]) for n, p in customer.named_parameters())
    with defense.applied(customer, alpha=1e-6):  # nothing is that far from the subspace but the strays
        assert {k.split(":")[0] for k in defense.last.projected} == strays


def test_safe_lora_refuses_a_model_without_lora_and_bad_thresholds(harmful):
    base, adapter, _ = harmful
    vector = fit_safe_lora(attach_adapter(copy.deepcopy(base), adapter))
    defense = SafeLoraDefense(vector)
    with pytest.raises(SafetylockError, match="no active LoRA adapter"):
        with defense.applied(tiny_model("qwen2")):
            pass
    customer = attach_adapter(copy.deepcopy(base), adapter)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(SafetylockError, match="threshold"):
            with defense.applied(customer, alpha=bad):
                pass
    with pytest.raises(SafetylockError, match="not resta"):
        RestaDefense(vector)
    with pytest.raises(SafetylockError, match="projection"):
        fit_safe_lora(attach_adapter(copy.deepcopy(base), adapter), projection="magic")


def test_bench_fits_the_new_defenses_from_the_harmful_fine_tune(tmp_path, tiny_dir):
    from test_bench import MICRO

    from safetylock.bench import run_bench
    from safetylock.models import load_model

    settings = replace(MICRO, unaligned="harmful-10@1", benchmarks=("harmbench", "overrefusal"))
    out = run_bench([str(tiny_dir)], ["none", "harmful-10@1"], ["none", "resta", "safe-lora", "guard"], tmp_path / "b",
                    settings=settings, loader=lambda spec: load_model(spec, dtype="fp32", device="cpu"),
                    progress=False)
    rows = {(r["attack"], r["defense"]): r for r in out["rows"]}
    assert ("none", "safe-lora") not in rows and len(rows) == 7
    # RESTA reverses exactly the fine-tune it was fitted on: the base's own first-token distribution.
    assert abs(rows["harmful-10@1", "resta"]["kl_to_base"]) < 1e-6
    assert rows["harmful-10@1", "none"]["kl_to_base"] > 0
    assert rows["harmful-10@1", "resta"]["prep_seconds"] > 0
    assert rows["harmful-10@1", "guard"]["seconds_per_prompt"] > 0
    kinds = [c.split()[0] for c in out["computed"]]
    assert kinds.count("adapter") == 1  # the unaligned model is the grid's own harmful-10@1 adapter


def test_cli_fit_defense_writes_artifacts_eval_loads(tmp_path, tiny_dir):
    """`safetylock fit-defense` on a checkpoint on disk: RESTA from a harmful adapter, the guard from the base alone."""
    import subprocess
    import sys

    from safetylock.models import load_model

    base, _ = load_model(str(tiny_dir), dtype="fp32", device="cpu")
    adapter = make_adapter(base, tmp_path / "harmful", seed=1)
    cli = [sys.executable, "-m", "safetylock.cli", "fit-defense"]
    for name, extra in (("resta", ["--unaligned", str(adapter)]), ("guard", [])):
        out = tmp_path / f"{name}.safetensors"
        proc = subprocess.run([*cli, name, "-m", str(tiny_dir), "-o", str(out), "--dtype", "fp32", *extra],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().endswith(str(out)) and out.is_file()
        defense = make_defense(name, out)
        assert defense.describe()["name"] == name
    vector = SafetyVector.load(tmp_path / "resta.safetensors")
    direct = fit_resta(attach_adapter(copy.deepcopy(base), adapter))
    assert vector.parts.keys() == direct.parts.keys()
    for key, part in vector.parts.items():
        mine = direct.parts[key]
        assert part.scale == mine.scale and torch.equal(part.lora_a, mine.lora_a) and torch.equal(part.lora_b, mine.lora_b)
