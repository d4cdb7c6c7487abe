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

import asyncio
import contextlib
import hmac
import json
import re
import secrets
import socket
import statistics
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import Request  # at module level: FastAPI resolves endpoint annotations from these globals
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import SafetylockError, check_alpha
from .generate import eos_token_ids, model_device

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
DEFAULT_MAX_TOKENS = 256
# A chat request is text; 1 MiB is ~250k tokens, far past any context this serves, and caps what one
# request can make the server buffer and tokenize before the context check turns it away.
MAX_BODY_BYTES = 1 << 20
# torch.Generator.manual_seed takes any 64-bit value, signed or unsigned; anything wider raises in the worker.
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1
BENCH_PROMPTS = (
    "Write a Python function that reverses a string.",
    "Explain what a hash map is in two sentences.",
    "Give three tips for writing readable code.",
    "What is the difference between a list and a tuple in Python?",
    "Write a SQL query that counts rows per day.",
    "How do I read a CSV file with the standard library?",
    "Summarise what unit tests are for.",
    "Write a bash one-liner that counts lines in all .py files.",
)


def parse_adapter_specs(specs: Sequence[str]) -> dict[str, str]:
    """Return {name: directory} for `NAME=DIR` strings, refusing malformed or repeated names."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SafetylockError(f"--adapter takes NAME=DIR, got '{spec}'")
        if name in adapters:
            raise SafetylockError(f"adapter name '{name}' is given twice")
        adapters[name] = path
    return adapters


# ----------------------------------------------------------------------------------------------- requests


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of an OpenAI chat request; text parts of a content list are joined."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of `POST /v1/chat/completions` the server honours; every other field is ignored.

    Every number is checked here, per request, so that a value the worker cannot use is this request's 400
    and never an error in the batch it would have joined.
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class AdapterRequest(BaseModel):
    """The body of `POST /admin/adapters`."""

    model_config = ConfigDict(extra="forbid")
    name: str
    path: str


class ApiError(Exception):
    """An error answered in OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------------ metrics


class Metrics:
    """Counters and a latency window, safe to update from the worker and the event loop."""

    def __init__(self, window: int = 10_000) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.responses: dict[str, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.batches = 0
        self.batched_requests = 0  # requests served in a batch of two or more
        self.max_batch_seen = 0
        self.disconnects = 0
        self.generation_errors = 0
        self.adapters_added = 0
        self.adapters_rejected = 0
        self.latencies: deque[float] = deque(maxlen=window)
        self.first_token: deque[float] = deque(maxlen=window)
        self.queue_depth: Callable[[], int] = lambda: 0

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)

    def response(self, status: int) -> None:
        with self._lock:
            self.responses[str(status)] = self.responses.get(str(status), 0) + 1

    def batch(self, size: int) -> None:
        with self._lock:
            self.batches += 1
            self.batched_requests += size if size > 1 else 0
            self.max_batch_seen = max(self.max_batch_seen, size)

    def served(self, latency: float, first_token: float | None, prompt: int, completion: int) -> None:
        with self._lock:
            self.latencies.append(latency)
            if first_token is not None:
                self.first_token.append(first_token)
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def snapshot(self) -> dict[str, Any]:
        """Return every metric as plain JSON."""
        with self._lock:
            lat, ttft = sorted(self.latencies), sorted(self.first_token)
            return {
                "uptime_s": round(time.time() - self.started, 3),
                "requests_total": sum(self.responses.values()),
                "responses": dict(self.responses),
                "completions": len(self.latencies),
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "batches": self.batches,
                "batched_requests": self.batched_requests,
                "max_batch_size": self.max_batch_seen,
                "queue_depth": self.queue_depth(),
                "stream_disconnects": self.disconnects,
                "generation_errors": self.generation_errors,
                "adapters_added": self.adapters_added,
                "adapters_rejected": self.adapters_rejected,
                "latency_s": {"p50": quantile(lat, 0.5), "p95": quantile(lat, 0.95), "sum": round(sum(lat), 6),
                              "count": len(lat)},
                "time_to_first_token_s": {"p50": quantile(ttft, 0.5), "p95": quantile(ttft, 0.95), "count": len(ttft)},
            }

    def prometheus(self) -> str:
        """Return the metrics in Prometheus text exposition format."""
        s = self.snapshot()
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP safetylock_{name} {help_}")
            lines.append(f"# TYPE safetylock_{name} {kind}")
            lines.extend(f"safetylock_{name}{labels} {value}" for labels, value in samples)

        metric("requests_total", "counter", "HTTP responses by status code.",
               [(f'{{code="{c}"}}', n) for c, n in sorted(s["responses"].items())] or [("", 0)])
        metric("prompt_tokens_total", "counter", "Prompt tokens of served completions.", [("", s["prompt_tokens"])])
        metric("completion_tokens_total", "counter", "Generated tokens.", [("", s["completion_tokens"])])
        metric("batches_total", "counter", "Generation batches run.", [("", s["batches"])])
        metric("batched_requests_total", "counter", "Requests served in a batch of two or more.",
               [("", s["batched_requests"])])
        metric("batch_size_max", "gauge", "Largest batch run so far.", [("", s["max_batch_size"])])
        metric("queue_depth", "gauge", "Requests waiting for the worker.", [("", s["queue_depth"])])
        metric("stream_disconnects_total", "counter", "Streams the client left early.", [("", s["stream_disconnects"])])
        metric("generation_errors_total", "counter", "Failed generations (a batch, or one request in it).",
               [("", s["generation_errors"])])
        for key, name in (("latency_s", "request_latency_seconds"), ("time_to_first_token_s", "time_to_first_token_seconds")):
            q = s[key]
            samples = [(f'{{quantile="{p}"}}', q[k] if q[k] is not None else "NaN") for p, k in (("0.5", "p50"), ("0.95", "p95"))]
            lines.append(f"# TYPE safetylock_{name} summary")
            lines.extend(f"safetylock_{name}{labels} {value}" for labels, value in samples)
            if "sum" in q:
                lines.append(f"safetylock_{name}_sum {q['sum']}")
            lines.append(f"safetylock_{name}_count {q['count']}")
        return "\n".join(lines) + "\n"


def quantile(sorted_values: Sequence[float], q: float) -> float | None:
    """Return the nearest-rank quantile of already sorted values, or None when there are none."""
    if not sorted_values:
        return None
    rank = min(len(sorted_values) - 1, max(0, int(round(q * len(sorted_values) + 0.5)) - 1))
    return round(float(sorted_values[rank]), 6)


# ------------------------------------------------------------------------------------------------- engine


@dataclass
class Event:
    """What the worker tells a request: a text `delta`, `done` with a finish reason, or an `error`."""

    kind: Literal["delta", "done", "error"]
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class Job:
    """One queued completion: its prompt, sampling settings, where its events go, and a cancel flag."""

    model: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    emit: Callable[[Event], None] = lambda event: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    heard: bool = False  # it got an event: a retry would repeat text it already has
    answered: bool = False  # it got its last event (done or error)

    def send(self, event: Event) -> None:
        """Pass `event` to the request, remembering how far its answer has got."""
        self.heard = True
        self.answered = event.kind != "delta"
        self.emit(event)


@dataclass
class _Row:
    job: Job
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already emitted
    live: bool = True


def _chat_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """Return the prompt text for a whole conversation, open for the assistant's reply (as `format_chat`)."""
    if tokenizer.chat_template is None:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _context_length(model: Any) -> int:
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _recorded_base(adapter_dir: Path) -> dict[str, Any] | None:
    """Return the base fingerprint that `safetylock.attack` records beside an adapter, if it is there."""
    try:
        data = json.loads((adapter_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and str(data.get("format", "")).startswith("safetylock-finetune"):
        base = data.get("base")
        return dict(base) if isinstance(base, dict) else None
    return None


def _weights_digest(model: Any) -> str | None:
    """Return the content digest `safetylock.attack` records for the base an adapter was trained on."""
    try:
        from .attack import _base_digest
    except ImportError:
        return None
    return str(_base_digest(model))


def _module_paths_ancestors(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


class Engine:
    """Owns a locked base model, its adapters, the request queue and the worker thread that generates."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        lock: Any,
        *,
        alpha: float | None = None,
        name: str = "base",
        max_batch: int = 8,
        max_prompt_tokens: int | None = None,
        max_queue: int = 256,
        batch_window: float = 0.005,
        force: bool = False,
        conditional: bool = False,
    ) -> None:
        if max_batch < 1:
            raise SafetylockError("max_batch must be at least 1")
        alpha = None if alpha is None else check_alpha(alpha, "--alpha")  # -3 would bake an unlock
        self.base = model
        self.tokenizer = tokenizer
        self.lock = lock
        self.name = name
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_window = batch_window
        self.context_length = _context_length(model)
        self.max_prompt_tokens = min(max_prompt_tokens or self.context_length - 1, self.context_length - 1)
        self.metrics = Metrics()
        self.adapters: dict[str, str] = {}
        self.peft: Any = None
        self.eos = set(eos_token_ids(model, tokenizer))
        self.device = model_device(model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos)
        self._model_lock = threading.Lock()  # the worker's batches and adapter loads take turns
        self._tok_lock = threading.Lock()  # fast tokenizers are not safe to call from two threads
        self._cv = threading.Condition()
        self._pending: list[Job] = []
        self._closed = False
        self.metrics.queue_depth = lambda: len(self._pending)

        lock.validate(model, force=force)
        self.digest = _weights_digest(model)  # before baking: adapters record the unlocked base's digest
        self.alpha = lock.default_alpha if alpha is None else float(alpha)
        self.conditional = conditional
        self._hooks = contextlib.ExitStack()
        if conditional:  # runtime hooks gated by the lock's harmfulness probe: benign prompts run unshifted
            if not lock.has_condition:
                raise SafetylockError("this lock has no harmfulness probe; extract it with --conditional to serve it so")
            self._protected = {}
            self._hooks.enter_context(lock.applied(model, alpha=self.alpha, conditional=True, force=force))
            self._hook_count = _pre_hook_count(model)
        else:
            self._protected = self._bake(lock, self.alpha, force)
        model.eval()
        self._worker = threading.Thread(target=self._run, name="safetylock-serve-worker", daemon=True)
        self._worker.start()

    @classmethod
    def from_spec(cls, spec: str, lock_path: str | Path, *, alpha: float | None = None,
                  adapters: dict[str, str] | None = None, dtype: str = "auto", device: str | None = None,
                  name: str | None = None, **options: Any) -> Engine:
        """Return an engine for a model spec with the lock file baked in and the adapters loaded."""
        from .lock import Lock
        from .models import load_model

        if alpha is not None:  # before the model loads, which takes minutes for a real one
            alpha = check_alpha(alpha, "--alpha")
        lock = Lock.load(Path(lock_path))
        model, tokenizer = load_model(spec, dtype=dtype, device=device)
        served = name or (Path(spec).name if Path(spec).expanduser().exists() else spec)
        engine = cls(model, tokenizer, lock, alpha=alpha, name=served, **options)
        try:
            for adapter_name, path in (adapters or {}).items():
                engine.add_adapter(adapter_name, path)
        except Exception:
            engine.close()
            raise
        return engine

    # -- the lock ---------------------------------------------------------------------------------------

    def _bake(self, lock: Any, alpha: float | None, force: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Bake the lock into the base; return the parameters it changed with their baked values."""
        before = {n: p.detach().clone() for n, p in self.base.named_parameters() if p.dim() == 1}
        lock.bake(self.base, alpha=alpha, force=force)
        changed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for n, p in self.base.named_parameters():
            if p.dim() == 1 and (n not in before or not torch.equal(before[n], p.detach())):
                changed[n] = (p, p.detach().clone())
        return changed

    def lock_intact(self) -> bool:
        """Return whether every parameter the lock baked still holds its baked value (or its hooks are all in place)."""
        if self.conditional:
            return _pre_hook_count(self.base) >= self._hook_count
        return all(torch.equal(p.detach(), baked) for p, baked in self._protected.values())

    def lock_info(self) -> dict[str, Any]:
        metadata = getattr(self.lock, "metadata", {}) or {}
        fingerprint = {k: v for k, v in (metadata.get("fingerprint") or {}).items() if k != "sketch"}  # 3 KB of floats
        return {"locked": True, "alpha": self.alpha, "fingerprint": fingerprint,
                "baked_parameters": len(self._protected), "conditional": self.conditional}

    # -- adapters ---------------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [self.name, *self.adapters]

    def adapter_mismatch(self, adapter_dir: Path) -> str | None:
        """Return why a LoRA adapter cannot run on the locked base, or None when it can."""
        from safetensors import safe_open

        from .models import _adapter_mismatch

        config_file = adapter_dir / "adapter_config.json"
        if not config_file.is_file():
            return f"{adapter_dir} is not a LoRA adapter directory (no adapter_config.json)"
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            return f"adapter_config.json is unreadable ({exc})"
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            return f"only LoRA adapters can be served (this one is {config.get('peft_type')})"
        if str(config.get("bias", "none")) != "none":
            return f"the adapter trains biases (bias={config.get('bias')!r}), which would overwrite the baked lock"
        protected_modules = {n.rsplit(".", 1)[0] for n in self._protected} | self._hooked_modules()
        for entry in config.get("modules_to_save") or []:
            for path in protected_modules:
                if any(a == entry or a.endswith("." + entry) for a in _module_paths_ancestors(path)):
                    return f"modules_to_save '{entry}' would replace the locked module '{path}'"
        recorded = _recorded_base(adapter_dir)
        if recorded:
            lock_fp = (getattr(self.lock, "metadata", {}) or {}).get("fingerprint") or {}
            keys = [k for k in recorded if k in lock_fp and k != "name" and recorded[k] != lock_fp[k]]
            if keys:
                diff = ", ".join(f"{k}: adapter {recorded[k]} vs lock {lock_fp[k]}" for k in keys[:3])
                return f"it was trained on another base than the lock's ({diff})"
            if self.digest and recorded.get("digest") and recorded["digest"] != self.digest:
                return (f"it was trained on a base with other weights (digest {recorded['digest']} vs "
                        f"{self.digest}); serve it on the base (and dtype) it was trained on")
        why = _adapter_mismatch(self.base, adapter_dir)
        if why:
            return why
        weights = adapter_dir / "adapter_model.safetensors"
        if not weights.is_file():
            return "no adapter_model.safetensors (only safetensors adapters are served)"
        modules = dict(self.base.named_modules())
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():
                path = key.removeprefix("base_model.model.")
                if ".lora_B." in key:
                    module = modules.get(path.split(".lora_B.")[0])
                    out = handle.get_slice(key).get_shape()[0]
                    if module is not None and getattr(module, "out_features", out) != out:
                        return f"'{path.split('.lora_B.')[0]}' gives {module.out_features} outputs, the adapter expects {out}"
                elif ".lora_" not in key:
                    return f"the adapter carries a non-LoRA weight '{key}'; only LoRA weights are served"
        return None

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Load a LoRA adapter under `name` after checking it fits the locked base and leaves the lock alone."""
        from peft import PeftModel

        from .models import quiet_peft

        if not ADAPTER_NAME.match(name or ""):
            raise SafetylockError(f"adapter name '{name}' is not valid; use letters, digits and . _ : - (at most 64)")
        adapter_dir = Path(path).expanduser()
        if not adapter_dir.is_dir():
            raise SafetylockError(f"adapter directory {adapter_dir} does not exist")
        with self._model_lock:
            if name in self.names:
                raise SafetylockError(f"a model named '{name}' is already served")
            why = self.adapter_mismatch(adapter_dir)
            if why:
                self.metrics.add(adapters_rejected=1)
                raise SafetylockError(f"adapter {adapter_dir} does not fit the locked base: {why}")
            try:
                with quiet_peft():
                    if self.peft is None:
                        self.peft = PeftModel.from_pretrained(self.base, str(adapter_dir), adapter_name=name)
                    else:
                        self.peft.load_adapter(str(adapter_dir), adapter_name=name)
                self.peft.eval()
            except Exception as exc:
                self._drop_adapter(name)
                self.metrics.add(adapters_rejected=1)
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise SafetylockError(f"could not load adapter {adapter_dir}: {first}") from None
            if not self.lock_intact():
                self._drop_adapter(name)
                self.metrics.add(adapters_rejected=1)
                raise SafetylockError(f"adapter {adapter_dir} changed the baked lock; it was unloaded")
            self.adapters[name] = str(adapter_dir)
            self.metrics.add(adapters_added=1)

    def _drop_adapter(self, name: str) -> None:
        if self.peft is not None and name in getattr(self.peft, "peft_config", {}):
            with contextlib.suppress(Exception):
                self.peft.delete_adapter(name)

    # -- requests ---------------------------------------------------------------------------------------

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """Return the prompt token ids of a conversation under the model's chat template."""
        with self._tok_lock:
            text = _chat_text(self.tokenizer, messages)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def submit(self, job: Job) -> None:
        """Queue a job for the worker."""
        with self._cv:
            if self._closed:
                raise ApiError(503, "the server is shutting down", code="shutting_down", kind="server_error")
            if len(self._pending) >= self.max_queue:
                raise ApiError(429, f"the queue is full ({self.max_queue} waiting); retry later",
                               code="queue_full", kind="rate_limit_error")
            self._pending.append(job)
            self._cv.notify()

    def _hooked_modules(self) -> set[str]:
        """Return the paths of the o_proj modules a conditional lock hooks (empty when baked)."""
        if not self.conditional:
            return set()
        from .arch import o_proj_path

        return {o_proj_path(self.base, int(layer)) for layer in set(self.lock.layers.tolist())}

    def close(self) -> None:
        """Stop the worker; waiting jobs get an error event."""
        with self._cv:
            self._closed = True
            waiting, self._pending = self._pending, []
            self._cv.notify_all()
        for job in waiting:
            job.send(Event("error", "the server is shutting down"))
        self._worker.join(timeout=30)
        self._hooks.close()

    def _next_batch(self) -> list[Job] | None:
        with self._cv:
            while not self._pending and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
        if self.batch_window > 0:
            time.sleep(self.batch_window)  # requests sent together arrive a few ms apart
        with self._cv:
            self._pending = [j for j in self._pending if not j.cancelled.is_set()]
            if not self._pending:
                return []
            head = self._pending[0].model
            batch = [j for j in self._pending if j.model == head][: self.max_batch]
            taken = {id(j) for j in batch}
            self._pending = [j for j in self._pending if id(j) not in taken]
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._serve(batch)

    def _serve(self, batch: list[Job]) -> None:
        """Generate a batch; if it fails, run each request it had not yet answered alone, so only the bad one errors."""
        try:
            with self._model_lock:
                self.metrics.batch(len(batch))
                self._generate(batch)
        except Exception as exc:  # one bad batch must never take the server down, nor its other requests
            self.metrics.add(generation_errors=1)
            message = _failure(exc)
            for job in batch:
                if job.answered:
                    continue
                if len(batch) > 1 and not job.heard:
                    self._serve([job])
                else:  # alone it is the cause; with text already sent a rerun could not take it back
                    job.send(Event("error", message))

    def _model_for(self, name: str) -> tuple[Any, contextlib.AbstractContextManager[Any]]:
        if self.peft is None:
            return self.base, contextlib.nullcontext()
        if name == self.name:
            return self.peft, self.peft.disable_adapter()
        self.peft.set_adapter(name, inference_mode=True)
        return self.peft, contextlib.nullcontext()

    @torch.inference_mode()
    def _generate(self, jobs: list[Job]) -> None:
        """Generate a batch of jobs for one model, left-padded, emitting each row's text as it grows."""
        rows = []
        for job in jobs:
            generator = None
            if job.temperature > 0:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(job.seed if job.seed is not None else secrets.randbits(63))
            rows.append(_Row(job, generator))
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for r, job in enumerate(jobs):
            ids[r, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids, dtype=torch.long)
            mask[r, width - len(job.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        model, context = self._model_for(jobs[0].model)
        cache = None
        with context:
            for _ in range(max(j.max_tokens for j in jobs)):
                out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                            use_cache=True, logits_to_keep=1)
                cache = out.cache
                logits = out.logits[:, -1, :].float()
                chosen = logits.argmax(-1)
                for r, row in enumerate(rows):
                    if not row.live:
                        continue
                    if row.job.cancelled.is_set():
                        row.live = False
                        continue
                    try:  # a row's own failure ends that row only
                        token = int(chosen[r]) if row.generator is None else self._sample(logits[r], row)
                        chosen[r] = token
                        self._advance(row, token)
                    except Exception as exc:
                        row.live = False
                        self.metrics.add(generation_errors=1)
                        row.job.send(Event("error", _failure(exc)))
                if not any(row.live for row in rows):
                    break
                ids = chosen[:, None]
                mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
                positions = positions[:, -1:] + 1
        for row in rows:
            if row.live:  # only reachable if max_tokens ran out on the last step
                self._finish(row, "length")

    @staticmethod
    def _sample(logits: torch.Tensor, row: _Row) -> int:
        # In float64, where every positive temperature is > 0 (1e-300 is 0 in float32), and shifted so the top
        # logit is 0: a tiny temperature then gives 0 and -inf, not inf - inf = NaN.
        logits = logits.double()
        probs = torch.softmax((logits - logits.max()) / row.job.temperature, dim=-1)
        if row.job.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < row.job.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _advance(self, row: _Row, token: int) -> None:
        job = row.job
        if token in self.eos:
            self._emit(row, self._decode(row.ids))
            self._finish(row, "stop", counted=len(row.ids) + 1)
            return
        row.ids.append(token)
        text = self._decode(row.ids)
        hits = [i for i in (text.find(s) for s in job.stop) if i >= 0]
        if hits:
            self._emit(row, text[: min(hits)])
            self._finish(row, "stop")
            return
        if len(row.ids) >= job.max_tokens:
            self._emit(row, text)
            self._finish(row, "length")
            return
        # Hold back what could still become a stop string, and a trailing half of a UTF-8 character.
        hold = max((len(s) for s in job.stop), default=1) - 1
        stable = text.rstrip("\ufffd")
        self._emit(row, stable[: max(0, len(stable) - hold)])

    def _emit(self, row: _Row, text: str) -> None:
        if len(text) > row.sent:
            row.job.send(Event("delta", text[row.sent:]))
            row.sent = len(text)

    @staticmethod
    def _finish(row: _Row, reason: str, counted: int | None = None) -> None:
        row.live = False
        row.job.send(Event("done", finish_reason=reason, completion_tokens=counted or len(row.ids)))


# ---------------------------------------------------------------------------------------------------- app


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _failure(exc: Exception) -> str:
    """Return the error text a request gets when its generation fails."""
    return f"generation failed ({type(exc).__name__}: {str(exc)[:200]})"


async def _read_body(request: Request, limit: int) -> bytes:
    """Return the request body, answering 413 for one over `limit` bytes before buffering more than that."""
    too_large = ApiError(413, f"the request body is over this server's limit of {limit} bytes",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():  # a chunked body declares no length: count what arrives
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _event_stream(events: AsyncIterator[str], on_close: Callable[[], None]) -> Any:
    """Return a server-sent-event response that runs `on_close` however it ends (done, error or hang-up)."""
    from starlette.requests import ClientDisconnect
    from starlette.responses import StreamingResponse

    class EventStream(StreamingResponse):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            except (ClientDisconnect, OSError):
                pass
            finally:
                on_close()
                with contextlib.suppress(Exception):
                    await events.aclose()  # type: ignore[attr-defined]

    return EventStream(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _CountResponses:
    """ASGI middleware that counts responses by status code (it leaves streams untouched)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.metrics.response(int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(engine: Engine, admin_token: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> Any:
    """Return the FastAPI app serving `engine` with OpenAI's chat-completions API.

    The lock's settings (alpha, fingerprint, baked parameters, mode) are shown only to a request whose
    `Authorization: Bearer` header carries `admin_token`; any other request, and every request when no admin
    token is configured, gets the public view: `/health` says only its status, `/v1/models` lists the model
    ids with `"locked": true`. A wrong token on these read-only routes just gets the public view (OpenAI
    clients send their API key there); `/admin/adapters` answers 404 without a configured token, 401 without
    a Bearer header and 403 for a wrong token. `/metrics` holds traffic counters only, no lock settings, and
    stays public for scrapers and `serve-bench`. Bodies over `max_body_bytes` get 413 before they are parsed.
    """
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if max_body_bytes < 1:
        raise SafetylockError(f"max_body_bytes must be at least 1, got {max_body_bytes}")
    app = FastAPI(title="safetylock", docs_url=None, redoc_url=None)
    metrics = engine.metrics
    app.add_middleware(_CountResponses, metrics=metrics)
    secret = (admin_token or "").encode()

    def bearer(request: Request) -> str | None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return given.strip() if scheme.lower() == "bearer" else None

    def is_admin(request: Request) -> bool:
        given = bearer(request)
        return bool(secret) and given is not None and hmac.compare_digest(given.encode(), secret)

    def error(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:  # answered, logged, and the server goes on
        return error(ApiError(500, f"internal error ({type(exc).__name__})", kind="server_error"))

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error(ApiError(400, f"invalid request: {exc.errors()[0].get('msg', 'bad field')}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        status = {"status": "ok" if engine.lock_intact() else "lock-damaged"}
        if not is_admin(request):  # public liveness: nothing about the lock an attacker could tune against
            return status
        return {**status, "model": engine.name, "adapters": list(engine.adapters), "lock": engine.lock_info(),
                "queue_depth": len(engine._pending)}

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> Response:
        if request.query_params.get("format") == "json" or "application/json" in request.headers.get("accept", ""):
            return JSONResponse(metrics.snapshot())
        return PlainTextResponse(metrics.prometheus(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        created = int(metrics.started)
        lock = engine.lock_info() if is_admin(request) else {"locked": True}
        data = [{"id": n, "object": "model", "created": created, "owned_by": "safetylock",
                 "root": engine.name, "parent": None if n == engine.name else engine.name,
                 "safetylock": lock} for n in engine.names]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        started = time.perf_counter()
        try:
            body = json.loads(await _read_body(request, max_body_bytes))
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            req = ChatRequest.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ()))
            raise ApiError(400, f"invalid '{param}': {first.get('msg')}", param=param or None) from None
        if req.model not in engine.names:
            raise ApiError(404, f"the model '{req.model}' does not exist; served: {', '.join(engine.names)}",
                           code="model_not_found", param="model")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            prompt_ids = engine.encode(messages)
        except Exception as exc:  # chat templates raise on role orders they do not support
            raise ApiError(400, f"the messages do not fit the model's chat template ({str(exc)[:200]})",
                           param="messages") from None
        if len(prompt_ids) > engine.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; this server takes at most "
                           f"{engine.max_prompt_tokens}", code="context_length_exceeded", param="messages")
        room = engine.context_length - len(prompt_ids)
        limit = req.limit()
        if limit is not None and limit > room:
            raise ApiError(400, f"this model's context is {engine.context_length} tokens: {len(prompt_ids)} in the "
                           f"prompt leaves {room} for the reply, but {limit} were asked",
                           code="context_length_exceeded", param="max_tokens")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, event)

        job = Job(req.model, prompt_ids, limit or min(DEFAULT_MAX_TOKENS, room), req.temperature, req.top_p,
                  req.seed, list(req.stop or []), emit)
        engine.submit(job)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        usage = lambda n: {"prompt_tokens": len(prompt_ids), "completion_tokens": n,  # noqa: E731
                           "total_tokens": len(prompt_ids) + n}

        if not req.stream:
            parts: list[str] = []
            first_token: float | None = None
            try:
                while (event := await queue.get()).kind == "delta":
                    first_token = first_token or time.perf_counter() - started
                    parts.append(event.text)
            finally:
                job.cancelled.set()
            if event.kind == "error":
                raise ApiError(500, event.text, kind="server_error")
            metrics.served(time.perf_counter() - started, first_token, len(prompt_ids), event.completion_tokens)
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": req.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                                 "logprobs": None, "finish_reason": event.finish_reason}],
                    "usage": usage(event.completion_tokens), "system_fingerprint": None}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        state = {"finished": False}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        async def events() -> AsyncIterator[str]:
            first_token: float | None = None
            yield _sse(chunk({"role": "assistant", "content": ""}))
            while (event := await queue.get()).kind == "delta":
                first_token = first_token or time.perf_counter() - started
                yield _sse(chunk({"content": event.text}))
            state["finished"] = True
            if event.kind == "error":
                yield _sse(ApiError(500, event.text, kind="server_error").body())
            else:
                metrics.served(time.perf_counter() - started, first_token, len(prompt_ids), event.completion_tokens)
                yield _sse(chunk({}, event.finish_reason))
                if include_usage:
                    yield _sse({**chunk({}), "choices": [], "usage": usage(event.completion_tokens)})
            yield _sse("[DONE]")

        def on_close() -> None:
            if not state["finished"]:
                metrics.add(disconnects=1)
            job.cancelled.set()

        return _event_stream(events(), on_close)

    @app.post("/admin/adapters", include_in_schema=bool(secret))
    async def add_adapter(request: Request) -> Any:
        if not secret:
            raise ApiError(404, "not found", code="not_found")
        if bearer(request) is None:
            raise ApiError(401, "this endpoint needs 'Authorization: Bearer <admin token>'", code="invalid_api_key",
                           kind="authentication_error")
        if not is_admin(request):
            raise ApiError(403, "the admin token is wrong", code="forbidden", kind="permission_error")
        try:
            req = AdapterRequest.model_validate(json.loads(await _read_body(request, max_body_bytes)))
        except (ValueError, ValidationError) as exc:
            raise ApiError(400, f"expected {{\"name\": ..., \"path\": ...}} ({str(exc).splitlines()[0][:120]})") from None
        if req.name in engine.names:
            raise ApiError(409, f"a model named '{req.name}' is already served", code="conflict", param="name")
        try:
            await run_in_threadpool(engine.add_adapter, req.name, req.path)
        except SafetylockError as exc:
            raise ApiError(422 if "does not fit" in str(exc) or "changed the baked lock" in str(exc) else 400,
                           str(exc), code="adapter_rejected", param="path") from None
        return JSONResponse({"id": req.name, "object": "model", "owned_by": "safetylock", "parent": engine.name,
                             "path": engine.adapters[req.name]}, status_code=201)

    return app


# ---------------------------------------------------------------------------------------------- running it


def read_admin_token(token: str | None, token_file: Path | None) -> str | None:
    """Return the admin token given directly or read (stripped) from `token_file`; None when neither is given.

    A file keeps the token out of the process list and shell history; a missing, unreadable or empty file is
    an error rather than a server that silently runs without admin.
    """
    if token_file is None:
        return token or None
    if token is not None:
        raise SafetylockError("give the admin token (--admin-token or SAFETYLOCK_ADMIN_TOKEN) or --admin-token-file, "
                              "not both")
    try:
        text = Path(token_file).expanduser().read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SafetylockError(f"cannot read the admin token file {token_file} ({type(exc).__name__}: {exc})") from None
    if not text:
        raise SafetylockError(f"the admin token file {token_file} is empty; put the token on its first line")
    if "\n" in text:  # a header carries one line: a many-line token could never match
        raise SafetylockError(f"the admin token file {token_file} has more than one line; keep only the token")
    return text


def serve(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, admin_token: str | None = None,
          admin_token_file: Path | None = None, max_body_bytes: int = MAX_BODY_BYTES,
          log_level: str = "warning") -> None:
    """Serve `engine` over HTTP until interrupted, then stop its worker."""
    import uvicorn

    try:
        app = create_app(engine, admin_token=read_admin_token(admin_token, admin_token_file),
                         max_body_bytes=max_body_bytes)
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        engine.close()


@contextlib.contextmanager
def serve_in_thread(engine: Engine, *, host: str = "127.0.0.1", port: int = 0, admin_token: str | None = None,
                    max_body_bytes: int = MAX_BODY_BYTES) -> Iterator[str]:
    """Yield the base URL of `engine` served on a background thread; port 0 picks a free port."""
    import uvicorn

    app = create_app(engine, admin_token=admin_token, max_body_bytes=max_body_bytes)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SafetylockError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


# ----------------------------------------------------------------------------------------------- load test


def load_test(url: str, *, model: str, prompts: Sequence[str], requests: int = 32, concurrency: int = 8,
              max_tokens: int = 32, stream: bool = True, temperature: float = 0.0, timeout: float = 600.0
              ) -> dict[str, Any]:
    """Return throughput and latency of `requests` chat completions sent `concurrency` at a time to `url`."""
    import httpx
    from concurrent.futures import ThreadPoolExecutor

    base = url.rstrip("/")

    def one(i: int, client: httpx.Client) -> dict[str, Any]:
        body = {"model": model, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                "max_tokens": max_tokens, "temperature": temperature, "seed": i, "stream": stream,
                "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first: float | None = None
        tokens = 0
        try:
            if stream:
                with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
                    for line in resp.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        data = json.loads(line[6:])
                        if data.get("usage"):
                            tokens = data["usage"]["completion_tokens"]
                        elif first is None and any(c["delta"].get("content") for c in data.get("choices", [])):
                            first = time.perf_counter() - start
                    status = resp.status_code
            else:
                resp = client.post(f"{base}/v1/chat/completions", json=body)
                status = resp.status_code
                tokens = resp.json().get("usage", {}).get("completion_tokens", 0) if status == 200 else 0
        except httpx.HTTPError as exc:
            return {"ok": False, "status": type(exc).__name__, "latency": time.perf_counter() - start}
        return {"ok": status == 200, "status": status, "latency": time.perf_counter() - start, "ttft": first,
                "tokens": tokens}

    with httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=concurrency)) as client:
        before = client.get(f"{base}/metrics", params={"format": "json"}).json()
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(lambda i: one(i, client), range(requests)))
        seconds = time.perf_counter() - start
        after = client.get(f"{base}/metrics", params={"format": "json"}).json()
    ok = [r for r in results if r["ok"]]
    latencies = sorted(r["latency"] for r in ok)
    ttfts = sorted(r["ttft"] for r in ok if r.get("ttft") is not None)
    tokens = sum(r["tokens"] for r in ok)
    batches = after["batches"] - before["batches"]
    return {
        "requests": requests, "concurrency": concurrency, "max_tokens": max_tokens, "stream": stream,
        "ok": len(ok), "failed": len(results) - len(ok),
        "statuses": sorted({str(r["status"]) for r in results}),
        "seconds": round(seconds, 3),
        "requests_per_second": round(len(ok) / seconds, 3),
        "completion_tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 2),
        "latency_p50_s": quantile(latencies, 0.5), "latency_p95_s": quantile(latencies, 0.95),
        "latency_mean_s": round(statistics.fmean(latencies), 4) if latencies else None,
        "ttft_p50_s": quantile(ttfts, 0.5), "ttft_p95_s": quantile(ttfts, 0.95),
        "server_batches": batches,
        "server_mean_batch_size": round(len(ok) / batches, 2) if batches else None,
        "server_max_batch_size": after["max_batch_size"],
    }


def _pre_hook_count(model: Any) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())
