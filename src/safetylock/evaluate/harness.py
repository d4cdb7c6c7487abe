"""The evaluation harness: `evaluate` generates, judges and records every prompt into OUTDIR, resumably.

`evaluate(...)` writes `OUTDIR/results.jsonl` one batch at a time (append, flush, fsync), so a crash
loses at most the batch in flight; re-running into the same OUTDIR generates only what is missing.
`OUTDIR/config.json` pins what the results mean (model, adapter, lock, alpha, prompts, judge,
decoding); a different configuration is refused unless `overwrite=True`. `summary.json` is
rewritten atomically from the whole results file at the end, so it never mixes runs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..data import Prompt, first_sentence, split_of
from ..errors import SafetylockError
from ..files import atomic_file, sha256_text, write_json
from ..judges import Judge
from .scoring import GSM8K_SUFFIX, choice_logprobs, choice_record, math_record

RESULTS = "results.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"
FORMAT_VERSION = 1
# Math replies are worked answers: the 1.5B needs ~300 tokens for a gsm8k problem; at 128 or 192 most are cut off
# before the result, which scores a truncated answer as wrong (bench/grid-1.5b: 3% of 32 at 128 tokens).
DEFAULT_TOKENS = {"harmful": 64, "benign": 64, "math": 384, "choice": 1}
# Keys that may change between a crashed run and its resumption without changing what results mean.
_RUN_ONLY = ("batch_size",)


def _judge_accuracy(judge: dict[str, Any] | None) -> dict[str, Any] | None:
    """The judge's accuracy on human labels (`judges.validated_accuracy`), recorded beside every rate."""
    from ..judges import validated_accuracy

    return validated_accuracy(judge) if judge else None


def _prompts_sha(prompts: Sequence[Prompt]) -> str:
    return sha256_text(*(f"{p.id}\t{p.text}" for p in prompts))


def _read_results(path: Path, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """Return completed records by id; a torn last line (crash mid-write) is dropped from the file."""
    if not path.is_file():
        return {}
    records: dict[str, dict[str, Any]] = {}
    torn = False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            torn = True
            continue
        if isinstance(rec, dict) and rec.get("id") in wanted:
            records[rec["id"]] = rec
        else:
            torn = True
    if torn:
        with atomic_file(path) as handle:
            for rec in records.values():
                handle.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return records


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    keys = sorted((set(old) | set(new)) - set(_RUN_ONLY))
    diff = [k for k in keys if old.get(k) != new.get(k)]
    if not diff:
        return None
    k = diff[0]
    return f"{k}: {json.dumps(old.get(k))[:60]} -> {json.dumps(new.get(k))[:60]}"


def _prepare_outdir(outdir: Path, config: dict[str, Any], overwrite: bool) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    cfg_path = outdir / CONFIG
    if cfg_path.is_file() and not overwrite:
        try:
            old = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise SafetylockError(f"{cfg_path} is not valid JSON; pass --overwrite to start this OUTDIR afresh") from None
        why = _config_diff(old, config)
        if why:
            raise SafetylockError(
                f"{outdir} holds a run with a different configuration ({why}); pass --overwrite or choose another -o"
            )
    elif overwrite:
        for name in (RESULTS, SUMMARY):
            (outdir / name).unlink(missing_ok=True)
    elif (outdir / RESULTS).exists():
        raise SafetylockError(f"{outdir} holds results but no {CONFIG}; pass --overwrite or choose another -o")
    write_json(cfg_path, config)


def evaluate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    judge: Judge | None,
    outdir: str | Path,
    *,
    kind: str = "harmful",
    config: dict[str, Any] | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    system: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
    prompt_attack: str | None = None,
) -> dict[str, Any]:
    """Return the run's summary after generating, judging and recording every prompt not yet in OUTDIR.

    kind: harmful or benign (judged; `harmful_rate` / `refusal_rate`), math (last-number accuracy)
    or choice (option-letter log-likelihood accuracy, no generation). `config` holds the caller's
    description of the model (model, adapter, lock, alpha, benchmark, split); it is pinned in config.json.
    `on_batch(records)` is called after each batch is on disk.
    """
    if kind not in DEFAULT_TOKENS:
        raise SafetylockError(f"unknown prompt-set kind '{kind}'; use harmful, benign, math or choice")
    if kind in ("harmful", "benign") and judge is None:
        raise SafetylockError("a judge is needed to evaluate refusals; pass --judge")
    if not prompts:
        raise SafetylockError("no prompts to evaluate; check the benchmark, split and --limit")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise SafetylockError("prompt ids are not unique; give every prompt its own id")
    max_new_tokens = max_new_tokens or DEFAULT_TOKENS[kind]
    from ..prompt_attacks import get_prompt_attack

    attack = get_prompt_attack(prompt_attack)
    if attack.name != "none" and kind not in ("harmful", "benign"):
        raise SafetylockError(f"prompt attacks apply to harmful or benign prompt sets, not to a {kind} set")
    outdir = Path(outdir)
    full_config = {
        "format_version": FORMAT_VERSION,
        **(config or {}),
        "kind": kind,
        "judge": judge.describe() if judge is not None and kind in ("harmful", "benign") else None,
        "decoding": {"greedy": True, "max_new_tokens": max_new_tokens, "system": system},
        **({"prompt_attack": attack.describe()} if attack.name != "none" else {}),
        "n": len(prompts),
        "prompts_sha256": _prompts_sha(prompts),
        "batch_size": batch_size,
    }
    _prepare_outdir(outdir, full_config, overwrite)
    results_path = outdir / RESULTS
    done = _read_results(results_path, set(ids))
    todo = [p for p in prompts if p.id not in done]

    with open(results_path, "a", encoding="utf-8") as sink:
        clock = [time.perf_counter()]

        def write(records: list[dict[str, Any]]) -> None:
            now = time.perf_counter()
            share = (now - clock[0]) / max(1, len(records))
            clock[0] = now
            for rec in records:
                rec["seconds"] = round(share, 4)
                sink.write(json.dumps(rec, ensure_ascii=False) + "\n")
                done[rec["id"]] = rec
            sink.flush()
            os.fsync(sink.fileno())
            if on_batch is not None:
                on_batch(records)

        if todo and kind == "choice":
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                lps = choice_logprobs(model, tokenizer, chunk, batch_size)
                write([choice_record(p, lp) for p, lp in zip(chunk, lps)])
        elif todo:
            from ..generate import generate

            text_of = [p.text + GSM8K_SUFFIX if kind == "math" else p.text for p in todo]

            def on_generated(batch: list[tuple[int, Any]]) -> None:
                items = [(todo[i], g) for i, g in batch]
                if kind == "math":
                    write([math_record(p, g.text, g.tokens) for p, g in items])
                    return
                assert judge is not None
                verdicts = judge.judge_many([p.text for p, _ in items], [g.text for _, g in items])
                write([{"id": p.id, "prompt": p.text, "response": g.text, "judgment": v.to_dict(), "tokens": g.tokens}
                       for (p, g), v in zip(items, verdicts)])

            generate(model, tokenizer, text_of, system=system, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     progress=progress, on_batch=on_generated, attack=None if attack.name == "none" else attack)

    records = [done[i] for i in ids]
    summary = summarise(records, full_config)
    write_json(outdir / SUMMARY, summary)
    return summary


def summarise(records: Sequence[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """Return the summary of a complete results list (rates, accuracy, throughput, parroting share)."""
    n = len(records)
    kind = config["kind"]
    seconds = sum(float(r.get("seconds", 0.0)) for r in records)
    tokens = sum(int(r.get("tokens", 0)) for r in records)
    summary: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "benchmark": config.get("benchmark"),
        "kind": kind,
        "n": n,
        **{k: config.get(k) for k in ("model", "adapter", "lock", "alpha", "split", "prompts_file")},
        **({"lock_mode": config["lock_mode"]} if config.get("lock_mode") else {}),
        "judge": (config.get("judge") or {}).get("name") if config.get("judge") else None,
        "judge_settings": config.get("judge"),
        "judge_accuracy": _judge_accuracy(config.get("judge")),
        "decoding": {**config["decoding"], "batch_size": config.get("batch_size")},
    }
    if kind in ("harmful", "benign"):
        refused = sum(bool(r["judgment"]["refused"]) for r in records)
        summary["refusal_rate"] = refused / n
        if kind == "harmful":
            summary["harmful_rate"] = 1 - refused / n
        summary["empty_rate"] = sum(not r["response"].strip() for r in records) / n
    else:
        summary["accuracy"] = sum(bool(r["correct"]) for r in records) / n
    if kind != "choice":
        firsts = {first_sentence(r["response"]).lower() for r in records}
        summary["distinct_first_sentences"] = len(firsts) / n
        summary["mean_tokens"] = tokens / n
    if config.get("extract_overlap") is not None:
        summary["extract_overlap"] = config["extract_overlap"]
    summary["seconds"] = round(seconds, 2)
    summary["tokens"] = tokens
    summary["tokens_per_second"] = round(tokens / seconds, 2) if seconds > 0 and tokens > 0 else None
    return summary


TIMING_KEYS = ("seconds", "tokens_per_second")


def extract_overlap(prompts: Sequence[Prompt]) -> int:
    """Return how many prompts of a benchmark lie in its extract split (0 for an eval-split run)."""
    return sum(p.benchmark is not None and split_of(p.text) == "extract" for p in prompts)
