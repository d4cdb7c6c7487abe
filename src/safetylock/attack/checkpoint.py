"""Per-epoch checkpoints (trainable weights, optimizer moments, RNG) as safetensors + JSON, so a rerun resumes."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from ..errors import SafetylockError
from ..files import atomic_dir, write_json
from .rundir import FORMAT


def _save_checkpoint(outdir: Path, model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Write trainable weights, optimizer moments and RNG of a finished epoch, atomically (no pickle)."""
    from safetensors.torch import save_file

    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    opt = optimizer.state_dict()
    moments: dict[str, torch.Tensor] = {}
    index = []
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        index.append(names[id(p)])
        for key, value in opt["state"].get(i, {}).items():
            moments[f"{i}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    moments["rng.torch"] = torch.get_rng_state()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
    with atomic_dir(outdir / "checkpoint") as tmp:
        save_file(weights, str(tmp / "trainable.safetensors"))
        save_file(moments, str(tmp / "optimizer.safetensors"))
        write_json(tmp / "state.json", {**state, "param_order": index, "param_groups": groups,
                                        "rng.python": list(random.getstate()[1]), "format": FORMAT})


def _load_checkpoint(outdir: Path, model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG from the last finished epoch; return the saved state."""
    from safetensors.torch import load_file

    ckpt = outdir / "checkpoint"
    state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    if set(weights) != {n for n, p in params.items() if p.requires_grad}:
        raise SafetylockError(f"the checkpoint in {ckpt} does not match this model's trainable weights; rerun with --overwrite")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    moments = load_file(str(ckpt / "optimizer.safetensors"))
    order = {n: i for i, n in enumerate(state["param_order"])}
    current = [n for n in (next(k for k, v in params.items() if v is p) for p in optimizer.param_groups[0]["params"])]
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for i, name in enumerate(current):
        saved = order[name]
        entry = {k.split(".", 1)[1]: v for k, v in moments.items() if k.split(".", 1)[0] == str(saved)}
        if entry:
            opt_state[i] = entry
    groups = [{**g, "params": list(range(len(current)))} for g in state["param_groups"]]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    torch.set_rng_state(moments["rng.torch"])
    random.setstate((3, tuple(state["rng.python"]), None))
    return state
