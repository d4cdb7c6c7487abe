"""safetylock: re-align fine-tuned LLMs to their base model's safety in milliseconds, and measure it."""

from __future__ import annotations

from .baselines import (
    DEFENSES,
    Defense,
    RefusalDirection,
    fit_iti,
    fit_refusal_direction,
    make_defense,
    train_safety_sft,
)
from .bench import BenchSettings, run_bench
from .errors import SafetylockError
from .generate import Generation, GenerationRun, format_chat, generate
from .lock import Lock, check_transfer, export_locked, extract, fit_condition, head_activations
from .models import ALIASES, DEFAULT_MODEL, attach_adapter, fetch_alias, fingerprint, load_model

__version__ = "0.1.0"

__all__ = [
    "ALIASES",
    "BenchSettings",
    "DEFAULT_MODEL",
    "DEFENSES",
    "Defense",
    "Generation",
    "GenerationRun",
    "Lock",
    "RefusalDirection",
    "SafetylockError",
    "attach_adapter",
    "check_transfer",
    "export_locked",
    "extract",
    "fetch_alias",
    "fingerprint",
    "fit_condition",
    "fit_iti",
    "fit_refusal_direction",
    "format_chat",
    "generate",
    "head_activations",
    "load_model",
    "make_defense",
    "run_bench",
    "train_safety_sft",
]
