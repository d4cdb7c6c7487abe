"""Load test of `safetylock serve` on localhost; writes bench/serve.json and the figures in bench/SERVE.md.

    .venv/bin/python bench/serve_bench.py [--model ALIAS] [--lock LOCK] [--requests 32] [--concurrency 8]

It starts `safetylock serve` as one process and, once /health answers, runs `safetylock serve-bench` as a
second process twice: one request at a time (the baseline), then `--concurrency` at a time (batched). A
fixed number of requests is sent, so it stops by itself. Without `--lock` a small lock is extracted from
the base once (32 contrast pairs) and cached under $SAFETYLOCK_HOME/locks/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
SAFETYLOCK = [sys.executable, "-m", "safetylock.cli"]


def bench_lock(model: str) -> Path:
    """Return a cached small lock for `model`, extracting it on first use."""
    from safetylock.data import contrast_pairs
    from safetylock.files import home
    from safetylock.lock import extract
    from safetylock.models import load_model

    path = home() / "locks" / f"serve-bench-{re.sub(r'[^A-Za-z0-9._-]', '_', model)}.safetensors"
    if not path.is_file():
        print(f"[serve-bench] extracting a small lock for {model} (once)...", file=sys.stderr, flush=True)
        base, tokenizer = load_model(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        extract(base, tokenizer, contrast_pairs(32), batch_size=8).save(path)
        del base
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, server: subprocess.Popen[str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become healthy in time")


def run_bench(url: str, model: str, requests: int, concurrency: int, max_tokens: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        cmd = [*SAFETYLOCK, "serve-bench", "--url", url, "--model", model, "--requests", str(requests),
               "--concurrency", str(concurrency), "--max-tokens", str(max_tokens), "--out", str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        result = json.loads(out.read_text())
    shown = ["safetylock", *cmd[len(SAFETYLOCK):-2]]
    return {"command": shlex.join(shown), **result}


def figures_table(report: dict[str, object]) -> str:
    rows = ["| run | requests | concurrency | ok | wall s | req/s | tokens/s | p50 latency s | p95 latency s | "
            "p50 first token s | mean batch |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:  # type: ignore[union-attr]
        rows.append(f"| {run['label']} | {run['requests']} | {run['concurrency']} | {run['ok']} | {run['seconds']} | "
                    f"{run['requests_per_second']} | {run['tokens_per_second']} | {run['latency_p50_s']:.2f} | "
                    f"{run['latency_p95_s']:.2f} | {run['ttft_p50_s']:.2f} | {run['server_mean_batch_size']} |")
    return "\n".join(rows)


def write_markdown(report: dict[str, object], path: Path) -> None:
    """Replace the figures between the markers in SERVE.md (the rest of the page is hand-written)."""
    start, end = "<!-- figures:start -->", "<!-- figures:end -->"
    runs = report["runs"]  # type: ignore[index]
    body = "\n".join([
        start,
        f"Measured {report['date']} on {report['machine']}, model `{report['model']}` ({report['dtype']}), lock "
        f"`{report['lock_name']}` baked in, `max_tokens` {runs[0]['max_tokens']}, greedy, streaming.",  # type: ignore[index]
        "",
        figures_table(report),
        "",
        "Exact commands:",
        "",
        "```bash",
        ".venv/bin/python bench/serve_bench.py " + " ".join(report["script_args"]),  # type: ignore[arg-type]
        "# which runs:",
        report["server_command"],  # type: ignore[list-item]
        *[run["command"] for run in runs],  # type: ignore[union-attr]
        "```",
        end,
    ])
    text = path.read_text() if path.is_file() else f"# Serving locked models\n\n{start}\n{end}\n"
    path.write_text(text[: text.index(start)] + body + text[text.index(end) + len(end):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--lock", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--baseline-requests", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    lock = args.lock or bench_lock(args.model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_cmd = [*SAFETYLOCK, "serve", "-m", args.model, "--lock", str(lock), "--baked", "--port", str(port),
                  "--max-batch", str(args.concurrency)]
    server = subprocess.Popen(server_cmd, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL, text=True)
    try:
        wait_healthy(url, server)
        runs = []
        for label, requests, concurrency in (("one at a time", args.baseline_requests, 1),
                                             ("concurrent", args.requests, args.concurrency)):
            print(f"[serve-bench] {label}: {requests} requests, concurrency {concurrency}...", file=sys.stderr, flush=True)
            runs.append({"label": label, **run_bench(url, args.model, requests, concurrency, args.max_tokens)})
        metrics = httpx.get(f"{url}/metrics", params={"format": "json"}).json()
    finally:
        server.terminate()
        server.wait(timeout=60)
    import torch

    from safetylock.models import auto_dtype

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), torch {torch.__version__}",
        "model": args.model,
        "dtype": f"{str(auto_dtype()).removeprefix('torch.')}, the server's --dtype auto",
        "lock_name": lock.name,
        "script_args": [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if v is not None and k != "lock"],
        "server_command": shlex.join(["safetylock", *server_cmd[len(SAFETYLOCK):]]),
        "runs": runs,
        "server_metrics_after": metrics,
    }
    (HERE / "serve.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, HERE / "SERVE.md")
    print(figures_table(report))


if __name__ == "__main__":
    main()
