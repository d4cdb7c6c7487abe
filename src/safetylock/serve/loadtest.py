"""The load test `safetylock serve-bench` runs against a server, and the prompts it sends."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

from .metrics import quantile

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
