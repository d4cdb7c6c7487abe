"""The architecture table: every `ARCH_SPECS` entry has a tiny model, and its heads, o_proj and fingerprint work."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny import ARCH_MATRIX, FAMILIES, tiny_model

from safetylock import SafetylockError
from safetylock.arch import ARCH_SPECS, ARCHITECTURES, decoder_layers, head_geometry, o_proj_path, o_projs
from safetylock.generate import eos_token_ids
from safetylock.lock import EXPORT_LAYOUT, Lock, export_locked
from safetylock.models import fingerprint

TYPES = sorted(ARCH_SPECS)


def tiny_or_skip(model_type: str):
    from transformers import CONFIG_MAPPING, __version__

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {__version__} has no {model_type} classes")
    return tiny_model(model_type)


def fingerprint_lock(model) -> Lock:
    """Return a two-head lock (first and last layer, first and last head) recording `model`'s fingerprint."""
    g = head_geometry(model.config)
    directions = torch.nn.functional.normalize(torch.randn(2, g.head_dim, generator=torch.Generator().manual_seed(0)), dim=1)
    return Lock(layers=torch.tensor([0, g.num_layers - 1]), heads=torch.tensor([0, g.num_heads - 1]),
                directions=directions, stds=torch.tensor([1.0, 2.0]), scores=torch.ones(2),
                metadata={"fingerprint": fingerprint(model), "default_alpha": 1.5})


@pytest.mark.parametrize("model_type", TYPES)
def test_every_architecture_has_a_tiny_model_in_the_matrix(model_type):
    assert model_type in ARCH_MATRIX, f"add a tiny {model_type} to tests/tiny.py (tiny_config and ARCH_MATRIX)"


@pytest.mark.parametrize("model_type", TYPES)
def test_head_geometry_reads_the_text_config(model_type):
    model = tiny_or_skip(model_type)
    g = head_geometry(model.config)
    assert model.config.model_type == model_type
    assert (g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim, g.hidden_size, g.width) == (3, 4, 2, 16, 64, 64)


@pytest.mark.parametrize("model_type", TYPES)
def test_o_proj_is_found_at_the_specs_path(model_type):
    model = tiny_or_skip(model_type)
    spec = ARCH_SPECS[model_type]
    projs = o_projs(model)
    layers = decoder_layers(model)
    assert sorted(projs) == [0, 1, 2] and len(layers) == 3
    for layer, linear in projs.items():
        assert getattr(getattr(layers[layer], spec.attention), spec.o_proj) is linear
        assert linear.in_features == head_geometry(model.config).width
    assert o_proj_path(model, 2).endswith(f"layers.2.{spec.attention}.{spec.o_proj}")


@pytest.mark.parametrize("model_type", TYPES)
def test_fingerprint_records_the_geometry_and_rebuilds_it(model_type):
    model = tiny_or_skip(model_type)
    fp = fingerprint(model)
    assert {k: fp[k] for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "num_key_value_heads", "head_dim", "vocab_size")} == {
        "model_type": model_type, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300}
    lock = fingerprint_lock(model)
    lock.validate(model)
    from_model, from_fingerprint = lock.deltas(model=model), lock.deltas()
    assert from_model.keys() == from_fingerprint.keys() == {0, 2}
    assert all(torch.equal(from_model[k], from_fingerprint[k]) for k in from_model)


def test_the_exportable_architectures_are_the_families_export_round_trips():
    # test_lock.test_hooked_equals_baked_equals_exported writes and reloads every one of FAMILIES.
    assert {t for t, spec in ARCH_SPECS.items() if spec.export is not None} == set(FAMILIES)
    assert EXPORT_LAYOUT == {t: spec.export for t, spec in ARCH_SPECS.items() if spec.export is not None}


@pytest.mark.parametrize("model_type", [t for t in TYPES if ARCH_SPECS[t].export is None])
def test_an_architecture_without_an_export_layout_is_refused_before_baking(tmp_path, tokenizer, model_type):
    model = tiny_or_skip(model_type)
    with pytest.raises(SafetylockError, match=f"exporting a {model_type} model is not supported.*run time"):
        export_locked(model, tokenizer, fingerprint_lock(model), None, tmp_path / "out")
    assert not (tmp_path / "out").exists() and all(p.bias is None for p in o_projs(model).values())


def test_the_old_table_name_is_the_same_table():
    assert ARCHITECTURES is ARCH_SPECS


MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


@pytest.fixture()
def marked_tokenizer(tokenizer):
    """The tiny tokenizer with every family's end-of-turn marker, and an EOS that is none of them."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_tokens([m for m in MARKERS if m not in tok.get_vocab()], special_tokens=True)
    tok.eos_token = "<pad>"
    return tok


def model_of(model_type: str) -> SimpleNamespace:
    return SimpleNamespace(config=SimpleNamespace(model_type=model_type), generation_config=None)


@pytest.mark.parametrize(("model_type", "ends"), [
    ("llama", ("<|eot_id|>", "<|im_end|>")),
    ("qwen2", ("<|im_end|>",)),
    ("mistral", ("<|im_end|>",)),
    ("gemma", ("<end_of_turn>", "<|im_end|>")),
    ("gemma3", ("<end_of_turn>", "<|im_end|>")),
    ("phi3", ("<|end|>", "<|im_end|>")),
])
def test_end_of_turn_tokens_come_from_the_spec(marked_tokenizer, model_type, ends):
    tok = marked_tokenizer
    want = sorted({tok.eos_token_id, *tok.convert_tokens_to_ids(list(ends))})
    assert eos_token_ids(model_of(model_type), tok) == want


@pytest.mark.parametrize("model", [None, model_of("gpt2")])
def test_end_of_turn_tokens_of_no_or_an_unknown_architecture_are_every_familys(marked_tokenizer, model):
    tok = marked_tokenizer
    assert eos_token_ids(model, tok) == sorted({tok.eos_token_id, *tok.convert_tokens_to_ids(list(MARKERS))})
