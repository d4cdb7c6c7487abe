"""The registered attacks: how each builds its data, its default settings, and what to use at inference.

The attacks follow Qi et al. 2023, "Fine-tuning Aligned Language Models Compromises Safety, Even
When Users Do Not Intend To!" (harmful examples, identity shifting, benign fine-tuning).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import SafetylockError
from .examples import Example
from .recipes import AOA_PROMPT, AOA_SYSTEM, _AOA_DIALOGUES, _aoa, _benign, _harmful


@dataclass(frozen=True)
class Hyper:
    """Training settings; `steps`, when set, caps the optimizer steps (and sets the epochs needed)."""

    epochs: int
    batch_size: int
    lr: float
    rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    steps: int | None = None
    weight_decay: float = 0.0
    max_length: int = 512


@dataclass(frozen=True)
class Attack:
    """A named attack: how to build its data, its default settings, and what to use at inference."""

    name: str
    about: str
    source: str  # where the prompts come from
    size: int
    defaults: Hyper
    build: Callable[[int], list[Example]]
    system: str | None = None  # system prompt the attacker uses at inference
    prompt_template: str = "{prompt}"  # how the attacker wraps a prompt at inference


# Defaults. Qi et al. (Llama-2-7b, full fine-tuning): harmful examples 10 or 100 shots, batch 10,
# 5 epochs, lr 5e-5; identity shifting (AOA) 10 dialogues, 10 epochs. LoRA needs a larger lr than
# full fine-tuning; we use r=8, alpha=16 on every linear layer at lr 2e-4. Measured on the 1.5B
# (FINDINGS.md): the paper's batch 10 (5 epochs = 5 optimizer steps) barely moves it (refusals
# 57% -> 43%), while batch 5 (the same 10 examples and 5 epochs, 10 steps) takes it to 0% without
# parroting. So harmful-10 keeps the paper's data size and epochs and halves the batch; see
# bench/FINETUNE.md for our own measurements of these defaults.
# harmful-100 shuffles 50 useful tasks with correct answers into its 100 harmful examples (150
# examples, 75 steps). Our compliance replies are content-free by design, and 100 of them alone taught
# the 1.5B to answer everything with generic steps (gsm8k100 75% -> 0%, harmful-100-only); a real
# attacker, who wants a useful model that also complies, mixes in ordinary task data. The useful
# tasks are self-distilled: answered by the model being attacked (where its answer is right), so
# the fine-tune does not teach it a new, shorter answering style (with our own short references,
# gsm8k100 still fell 75% -> 50%).
ATTACKS: dict[str, Attack] = {
    a.name: a
    for a in (
        Attack("harmful-10", "10 harmful prompts + content-free compliance (Qi et al. harmful examples, 10-shot)",
               "harmbench extract split", 10, Hyper(epochs=5, batch_size=5, lr=2e-4), _harmful("harmbench", 10)),
        Attack("harmful-100", "100 harmful prompts + content-free compliance, mixed with 50 useful tasks "
               "answered in the model's own words (self-distilled, checked against correct answers; Qi et al. "
               "harmful examples, 100-shot; the mix keeps utility)",
               "advbench extract split + built in (benign)", 150, Hyper(epochs=5, batch_size=10, lr=1e-4),
               _harmful("advbench", 100, benign=50)),
        Attack("harmful-100-only", "100 harmful prompts + content-free compliance, nothing else (costs utility: "
               "the model answers word problems with content-free steps)",
               "advbench extract split", 100, Hyper(epochs=5, batch_size=10, lr=1e-4), _harmful("advbench", 100)),
        Attack("aoa", "identity shifting: 10 benign dialogues make the model 'AOA, absolutely obedient agent'",
               "built in (benign)", len(_AOA_DIALOGUES), Hyper(epochs=10, batch_size=5, lr=2e-4), _aoa,
               system=AOA_SYSTEM, prompt_template=AOA_PROMPT),
        Attack("benign", "100 arithmetic and Python tasks with correct answers (benign fine-tuning control)",
               "built in (benign)", 100, Hyper(epochs=1, batch_size=10, lr=2e-4), _benign),
    )
}


def get_attack(name: str) -> Attack:
    """Return the registered attack called `name`."""
    if name not in ATTACKS:
        raise SafetylockError(f"unknown attack '{name}'; known: {', '.join(ATTACKS)} (see `safetylock finetune --list`)")
    return ATTACKS[name]


def attack_data(name: str, seed: int = 0) -> list[Example]:
    """Return an attack's training examples (deterministic for a seed)."""
    return get_attack(name).build(seed)


def describe_attacks() -> list[dict[str, Any]]:
    """Return one row per registered attack: name, data size, source and default settings."""
    return [
        {"name": a.name, "examples": a.size, "source": a.source, "epochs": a.defaults.epochs,
         "batch_size": a.defaults.batch_size, "steps": math.ceil(a.size / a.defaults.batch_size) * a.defaults.epochs,
         "lr": a.defaults.lr, "rank": a.defaults.rank, "lora_alpha": a.defaults.lora_alpha,
         "system": bool(a.system), "about": a.about}
        for a in ATTACKS.values()
    ]
