"""safetylock: re-align fine-tuned LLMs to their base model's safety in milliseconds, and measure it."""

from __future__ import annotations

import importlib
from typing import Any

# Where each public name lives. Imported on first use (PEP 562), so `safetylock --help` and every
# usage error answer without importing torch and transformers first.
_PUBLIC = {
    "baselines": ("DEFENSES", "Defense", "RefusalDirection", "fit_iti", "fit_refusal_direction", "make_defense",
                  "train_safety_sft"),
    "base_refusal": ("BaseRefusal",),
    "bench": ("BenchSettings", "run_bench"),
    "calibrate": ("calibrate_defense",),
    "data": ("contrast_pairs", "load_benchmark"),
    "deployment": ("Deployment",),
    "errors": ("SafetylockError",),
    "gates": ("GateFit", "fit_gate", "template_features", "with_gate"),
    "generate": ("Generation", "GenerationRun", "format_chat", "generate"),
    "guard": ("GuardDefense", "fit_guard"),
    "lock": ("Gate", "Lock", "check_transfer", "export_locked", "extract", "fit_condition", "head_activations"),
    "models": ("ALIASES", "DEFAULT_MODEL", "attach_adapter", "fetch_alias", "fingerprint", "load_model"),
    "repair": ("SafetyVector", "fit_resta", "fit_safe_lora"),
    "screen": ("forced_reply",),
    "ood": ("OODSettings", "run_ood"),
    "prompt_attacks": ("PromptAttack", "get_prompt_attack"),
}
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'safetylock' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])


__version__ = "0.1.0"

__all__ = sorted(_HOME)
