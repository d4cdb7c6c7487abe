"""The server's counters and latency window, as JSON and as Prometheus text."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any


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
        self.screened_requests = 0  # adapter requests the base-refusal screen asked the base about
        self.screen_refusals = 0  # ... and answered with the fixed refusal
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
                "screened_requests": self.screened_requests,
                "screen_refusals": self.screen_refusals,
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
        metric("screened_requests_total", "counter", "Adapter requests the base-refusal screen asked the base about.",
               [("", s["screened_requests"])])
        metric("screen_refusals_total", "counter", "Adapter requests answered with the fixed refusal because the "
               "base's first reply tokens refused.", [("", s["screen_refusals"])])
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
