"""safetylock: re-align fine-tuned LLMs to their base model's safety in milliseconds, and measure it."""

from __future__ import annotations

from .errors import SafetylockError
from .generate import Generation, GenerationRun, format_chat, generate
from .lock import Lock, check_transfer, export_locked, extract, fit_condition, head_activations
from .models import ALIASES, DEFAULT_MODEL, attach_adapter, fetch_alias, fingerprint, load_model

__version__ = "0.1.0"

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "Generation",
    "GenerationRun",
    "Lock",
    "SafetylockError",
    "attach_adapter",
    "check_transfer",
    "export_locked",
    "extract",
    "fetch_alias",
    "fingerprint",
    "fit_condition",
    "format_chat",
    "generate",
    "head_activations",
    "load_model",
]
