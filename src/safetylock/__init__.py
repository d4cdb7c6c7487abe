"""safetylock: re-align fine-tuned LLMs to their base model's safety in milliseconds, and measure it."""

from __future__ import annotations

from .errors import SafetylockError
from .generate import Generation, GenerationRun, format_chat, generate
from .models import ALIASES, DEFAULT_MODEL, attach_adapter, fetch_alias, fingerprint, load_model

__version__ = "0.1.0"

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "Generation",
    "GenerationRun",
    "SafetylockError",
    "attach_adapter",
    "fetch_alias",
    "fingerprint",
    "format_chat",
    "generate",
    "load_model",
]
