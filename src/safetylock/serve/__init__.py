"""An OpenAI-compatible HTTP server for a locked base model and the LoRA adapters that run on it.

The lock is baked into the base's `o_proj` biases once, at start-up. Every adapter is a LoRA on top of that one
base, so every model the server offers runs under the lock; no request field reaches it, and an adapter that
would overwrite a baked bias (LoRA `bias != "none"`, `modules_to_save` over an attention output) is refused.

One worker thread owns the model. It takes the oldest waiting request, gathers the other waiting requests for
the same model (up to `max_batch`), and generates them as one left-padded batch with a KV cache, streaming
each row's text back to its request as it is produced. A client that goes away only frees its row. A request
never fails its batch-mates: its fields are checked before it is queued, a row that fails alone ends alone, and
a batch that fails as a whole is rerun one request at a time.
"""

from __future__ import annotations

from .adapters import ADAPTER_NAME, parse_adapter_specs
from .api import (
    DEFAULT_MAX_TOKENS,
    MAX_BODY_BYTES,
    SEED_MAX,
    SEED_MIN,
    AdapterRequest,
    ApiError,
    ChatMessage,
    ChatRequest,
    StreamOptions,
)
from .app import create_app
from .engine import Engine
from .jobs import Event, Job
from .loadtest import BENCH_PROMPTS, load_test
from .metrics import Metrics, quantile
from .run import read_admin_token, serve, serve_in_thread

__all__ = [
    "ADAPTER_NAME",
    "BENCH_PROMPTS",
    "DEFAULT_MAX_TOKENS",
    "MAX_BODY_BYTES",
    "SEED_MAX",
    "SEED_MIN",
    "AdapterRequest",
    "ApiError",
    "ChatMessage",
    "ChatRequest",
    "Engine",
    "Event",
    "Job",
    "Metrics",
    "StreamOptions",
    "create_app",
    "load_test",
    "parse_adapter_specs",
    "quantile",
    "read_admin_token",
    "serve",
    "serve_in_thread",
]
