"""A gate is its own artifact: saved apart from its lock, swapped in without touching the directions, refused
when it was fitted on another model, and managed from the command line (`safetylock gate`)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from tiny import tiny_model
from test_lock import synthetic_lock

from safetylock import cli
from safetylock.arch import head_geometry
from safetylock.errors import SafetylockError
from safetylock.lock import Gate, Lock, with_gate_file


def a_gate(model, bias: float = 0.25) -> Gate:
    width = 2 * head_geometry(model.config).head_dim
    return Gate([0, 2], [1, 0], np.linspace(-1, 1, width), np.full(width, 0.5), np.linspace(2, -2, width), bias,
                {"design": "heads:2"}, template_tokens=3, reads="base")


def test_a_gate_saved_apart_reloads_exactly_and_swaps_in(tmp_path):
    model = tiny_model("llama")
    lock = synthetic_lock(model).with_gate(a_gate(model))
    path = lock.gate.save(tmp_path / "g.safetensors", lock.fingerprint)
    gate, fitted_on = Gate.load(path)
    assert fitted_on == lock.fingerprint
    assert (gate.layers, gate.heads, gate.bias, gate.reads, gate.template_tokens) == (
        lock.gate.layers, lock.gate.heads, lock.gate.bias, "base", 3)
    assert np.array_equal(gate.weight, lock.gate.weight) and gate.about == {"design": "heads:2"}
    bare = synthetic_lock(model)
    swapped = with_gate_file(bare, path)
    assert torch.equal(swapped.directions, bare.directions) and swapped.gate.design == "heads:2"
    assert bare.gate is None, "the lock it came from is unchanged"
    assert with_gate_file(bare, lock.save(tmp_path / "l.safetensors")).gate.layers == [0, 2]  # from a lock too


def test_a_lock_file_keeps_its_gate_in_the_old_layout(tmp_path):
    model = tiny_model("llama")
    lock = synthetic_lock(model).with_gate(a_gate(model))
    from safetensors import safe_open

    path = lock.save(tmp_path / "l.safetensors")
    with safe_open(str(path), "pt") as f:
        assert {"cond_layers", "cond_heads", "cond_mean", "cond_scale", "cond_weight", "cond_bias"} <= set(f.keys())
    again = Lock.load(path)
    assert "condition" not in again.metadata and again.gate is not None
    assert again.gate.condition() == lock.gate.condition()


def test_a_gate_of_another_model_is_refused(tmp_path):
    model = tiny_model("llama")
    lock = synthetic_lock(model)
    for key, value in (("name", "another-model"), ("num_hidden_layers", 99)):
        path = a_gate(model).save(tmp_path / f"{key}.safetensors", {**lock.fingerprint, key: value})
        with pytest.raises(SafetylockError, match=f"fitted on another model: {key}"):
            with_gate_file(lock, path)


@pytest.mark.parametrize("bad, why", [
    ({"scale": np.zeros(8)}, "non-positive scale"),
    ({"weight": np.ones(7)}, "disagree"),
    ({"heads": [0]}, "one layer per head"),
    ({"reads": "adapter"}, "knows model, base"),
    ({"bias": float("nan")}, "NaN"),
])
def test_a_malformed_gate_is_refused(bad, why):
    fields = {"layers": [0, 1], "heads": [0, 1], "mean": np.zeros(8), "scale": np.ones(8), "weight": np.ones(8),
              "bias": 0.0}
    with pytest.raises(SafetylockError, match=why):
        Gate(**{**fields, **bad})


def run_cli(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["safetylock", *args])
    try:
        cli.main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_the_gate_command_saves_swaps_and_drops(monkeypatch, tmp_path, capsys):
    model = tiny_model("llama")
    gated = synthetic_lock(model).with_gate(a_gate(model)).save(tmp_path / "gated.safetensors")
    bare = synthetic_lock(model).save(tmp_path / "bare.safetensors")
    assert run_cli(monkeypatch, "gate", str(gated), "--save", str(tmp_path / "g.safetensors")) == 0
    assert run_cli(monkeypatch, "gate", str(bare), "--install", str(tmp_path / "g.safetensors"),
                   "-o", str(tmp_path / "swapped.safetensors")) == 0
    assert Lock.load(tmp_path / "swapped.safetensors").gate.design == "heads:2"
    assert run_cli(monkeypatch, "gate", str(gated), "--drop", "-o", str(tmp_path / "dropped.safetensors")) == 0
    assert Lock.load(tmp_path / "dropped.safetensors").gate is None
    capsys.readouterr()
    assert run_cli(monkeypatch, "gate", str(bare), "--save", str(tmp_path / "none.safetensors")) == 2
    assert run_cli(monkeypatch, "gate", str(bare), "--drop") == 2
    assert run_cli(monkeypatch, "gate", str(bare), "--install", str(bare), "-o", str(tmp_path / "x.safetensors")) == 2
    errors = capsys.readouterr().err
    assert "no gate to save" in errors and "--out" in errors and "lock without a gate" in errors
    assert not (tmp_path / "none.safetensors").exists() and not (tmp_path / "x.safetensors").exists()
