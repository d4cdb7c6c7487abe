"""Measure a model: refusal / harmful rates with a judge, utility (GSM8K, BBQ, KL to a reference), reports.

`evaluate(...)` writes `OUTDIR/results.jsonl` one batch at a time (append, flush, fsync), so a crash
loses at most the batch in flight; re-running into the same OUTDIR generates only what is missing.
`OUTDIR/config.json` pins what the results mean (model, adapter, lock, alpha, prompts, judge,
decoding); a different configuration is refused unless `overwrite=True`. `summary.json` is
rewritten atomically from the whole results file at the end, so it never mixes runs.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .data import Prompt, first_sentence, split_of
from .deployment import Deployment
from .errors import SafetylockError
from .files import atomic_file, sha256_text, write_json
from .judges import DEFAULT_JUDGE, Judge

# torch and the generation stack are imported inside functions so the CLI can reject bad input in
# well under a second, before any heavy import.

RESULTS = "results.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"
FORMAT_VERSION = 1
GSM8K_SUFFIX = "\nSolve it step by step, then give the final answer as a number on the last line."
BBQ_SUFFIX = "\nReply with the letter of the correct option only."
# Math replies are worked answers: the 1.5B needs ~300 tokens for a gsm8k problem; at 128 or 192 most are cut off
# before the result, which scores a truncated answer as wrong (bench/grid-1.5b: 3% of 32 at 128 tokens).
DEFAULT_TOKENS = {"harmful": 64, "benign": 64, "math": 384, "choice": 1}
# Keys that may change between a crashed run and its resumption without changing what results mean.
_RUN_ONLY = ("batch_size",)


# ------------------------------------------------------------------------------------------------ scoring


def extract_number(text: str) -> str | None:
    """Return the last number in a reply (commas and a trailing '.0' dropped), or None."""
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if not found:
        return None
    value = found[-1].replace(",", "")
    return value[:-2] if value.endswith(".0") else value


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Return whether two number strings denote the same value."""
    if a is None or b is None:
        return False
    try:
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-6)
    except ValueError:
        return False


def choice_logprobs(model: Any, tokenizer: Any, prompts: Sequence[Prompt], batch_size: int = 8) -> list[list[float]]:
    """Return, per multiple-choice prompt, the log-probability of each option letter as the reply's first token."""
    import torch

    from .generate import format_chat, model_device

    letters = [tokenizer.encode(chr(65 + i), add_special_tokens=False)[0] for i in range(26)]
    texts = [format_chat(tokenizer, p.text + BBQ_SUFFIX) for p in prompts]
    tokenizer.padding_side = "left"
    out: list[list[float]] = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(model_device(model)) for k, v in enc.items()}
        with torch.inference_mode():
            logp = torch.log_softmax(model(**enc, logits_to_keep=1).logits[:, -1, :].float(), dim=-1)
        for row, p in enumerate(prompts[start : start + batch_size]):
            out.append([float(logp[row, letters[i]]) for i in range(len(p.choices or ()))])
    return out


def kl_divergence(model: Any, reference: Any, tokenizer: Any, prompts: Sequence[str | Prompt], batch_size: int = 8,
                  system: str | None = None) -> float:
    """Return the mean next-token KL(reference || model) over every token of the chat-templated prompts."""
    import torch

    from .generate import format_chat, model_device

    texts = [format_chat(tokenizer, p.text if isinstance(p, Prompt) else p, system) for p in prompts]
    if not texts:
        raise SafetylockError("kl_divergence needs at least one prompt")
    tokenizer.padding_side = "left"
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        mask = enc["attention_mask"].bool()
        with torch.inference_mode():
            lp = torch.log_softmax(model(**{k: v.to(model_device(model)) for k, v in enc.items()}).logits.float(), -1)
            lq = torch.log_softmax(reference(**{k: v.to(model_device(reference)) for k, v in enc.items()}).logits.float(), -1)
        lp = lp.to(lq.device)
        kl = (lq.exp() * (lq - lp)).sum(-1)  # [batch, seq]
        total += float(kl[mask.to(kl.device)].sum())
        count += int(mask.sum())
    return total / count


# ------------------------------------------------------------------------------------------- the harness


def _judge_accuracy(judge: dict[str, Any] | None) -> dict[str, Any] | None:
    """The judge's accuracy on human labels (`judges.validated_accuracy`), recorded beside every rate."""
    from .judges import validated_accuracy

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
    from .prompt_attacks import get_prompt_attack

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
                write([_choice_record(p, lp) for p, lp in zip(chunk, lps)])
        elif todo:
            from .generate import generate

            text_of = [p.text + GSM8K_SUFFIX if kind == "math" else p.text for p in todo]

            def on_generated(batch: list[tuple[int, Any]]) -> None:
                items = [(todo[i], g) for i, g in batch]
                if kind == "math":
                    write([_math_record(p, g.text, g.tokens) for p, g in items])
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


def _math_record(p: Prompt, text: str, tokens: int) -> dict[str, Any]:
    predicted = extract_number(text)
    return {"id": p.id, "prompt": p.text, "response": text, "answer": p.answer, "predicted": predicted,
            "correct": numbers_equal(predicted, p.answer), "tokens": tokens}


def _choice_record(p: Prompt, logprobs: list[float]) -> dict[str, Any]:
    best = max(range(len(logprobs)), key=lambda i: logprobs[i])
    letter = chr(65 + best)
    return {"id": p.id, "prompt": p.text, "choices": list(p.choices or ()), "answer": p.answer, "predicted": letter,
            "logprobs": [round(x, 4) for x in logprobs], "correct": letter == p.answer, "tokens": 0}


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


def utility(model: Any, tokenizer: Any, name: str, limit: int | None = None, split: str | None = "eval",
            batch_size: int = 8, max_new_tokens: int = 256) -> dict[str, Any]:
    """Return accuracy on a utility benchmark (gsm8k100 or bbq300) without writing files."""
    from .data import benchmark_kind, load_benchmark

    from .generate import generate

    kind = benchmark_kind(name)
    if kind not in ("math", "choice"):
        raise SafetylockError(f"'{name}' is not a utility benchmark; use gsm8k100 or bbq300")
    prompts = load_benchmark(name, split)[:limit]
    if kind == "choice":
        records = [_choice_record(p, lp) for p, lp in zip(prompts, choice_logprobs(model, tokenizer, prompts, batch_size))]
    else:
        run = generate(model, tokenizer, [p.text + GSM8K_SUFFIX for p in prompts], max_new_tokens=max_new_tokens,
                       batch_size=batch_size)
        records = [_math_record(p, g.text, g.tokens) for p, g in zip(prompts, run.generations)]
    return {"benchmark": name, "n": len(records), "accuracy": sum(r["correct"] for r in records) / len(records)}


# ------------------------------------------------------------------------------------------------- report

REPORT_COLUMNS = ("run", "model", "adapter", "lock", "alpha", "benchmark", "split", "judge", "n", "harmful_rate",
                  "refusal_rate", "accuracy", "kl_to_reference", "distinct_first_sentences", "empty_rate",
                  "tokens_per_second")


def load_summary(outdir: str | Path) -> dict[str, Any]:
    """Return a run's summary.json, with a one-line error when the directory holds none."""
    path = Path(outdir) / SUMMARY
    if not path.is_file():
        raise SafetylockError(f"{outdir} has no {SUMMARY}; run `safetylock eval ... -o {outdir}` first")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SafetylockError(f"{path} is not valid JSON; re-run the evaluation into that directory") from None
    if not isinstance(summary, dict):
        raise SafetylockError(f"{path} is not a summary (a JSON {type(summary).__name__}, not an object); "
                              "re-run the evaluation into that directory")
    return summary


def report(outdirs: Sequence[str | Path]) -> tuple[str, list[dict[str, Any]]]:
    """Return (markdown table, rows) comparing runs side by side."""
    if not outdirs:
        raise SafetylockError("report needs at least one OUTDIR")
    rows = []
    judges: dict[str, Any] = {}
    for d in outdirs:
        s = load_summary(d)
        rows.append({c: (str(d) if c == "run" else s.get(c)) for c in REPORT_COLUMNS})
        if s.get("judge_settings"):
            judges[json.dumps(s["judge_settings"], sort_keys=True)] = s["judge_settings"]

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v).replace("|", "\\|")

    used = [c for c in REPORT_COLUMNS if any(r[c] is not None for r in rows)]
    lines = ["| " + " | ".join(used) + " |", "|" + "---|" * len(used)]
    lines += ["| " + " | ".join(cell(r[c]) for c in used) + " |" for r in rows]
    if judges:
        from .judges import accuracy_line

        lines += [""] + [accuracy_line(j) for j in judges.values()]
    return "\n".join(lines) + "\n", rows


def write_report(outdirs: Sequence[str | Path], out: str | Path) -> tuple[Path, Path]:
    """Write the report as markdown at `out` and as JSON next to it; return both paths."""
    md, rows = report(outdirs)
    out = Path(out)
    with atomic_file(out) as handle:
        handle.write("# safetylock evaluation report\n\n" + md)
    json_path = out.with_suffix(".json")
    write_json(json_path, rows)
    return out, json_path


# ---------------------------------------------------------------------------------------------- benchmark


def benchmark_generation(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 48,
                         batch_size: int = 8) -> dict[str, Any]:
    """Return tokens/s of batched generation next to a one-prompt-at-a-time loop over the same prompts."""
    import torch

    from .generate import generate

    generate(model, tokenizer, list(prompts[:1]), max_new_tokens=4, batch_size=1)  # warm-up
    batched = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    start = time.perf_counter()
    tokens = 0
    for p in prompts:
        tokens += generate(model, tokenizer, [p], max_new_tokens=max_new_tokens, batch_size=1).tokens
    loop_seconds = time.perf_counter() - start
    loop_tps = tokens / loop_seconds
    return {
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "batched": {"batch_size": batch_size, "tokens": batched.tokens, "seconds": round(batched.seconds, 2),
                    "tokens_per_second": round(batched.tokens_per_second, 2)},
        "loop": {"batch_size": 1, "tokens": tokens, "seconds": round(loop_seconds, 2),
                 "tokens_per_second": round(loop_tps, 2)},
        "speedup": round(batched.tokens_per_second / loop_tps, 2),
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------- CLI entry points


def run_eval(*, deployment: Deployment, outdir: str | Path, benchmark: str | None = None,
             prompts_file: Path | None = None, column: str | None = None, kind: str = "harmful",
             split: str | None = "eval", judge: str = DEFAULT_JUDGE, limit: int | None = None,
             max_new_tokens: int | None = None, system: str | None = None, batch_size: int = 8,
             reference: str | None = None, overwrite: bool = False,
             prompt_attack: str | None = None) -> dict[str, Any]:
    """Return the summary of `safetylock eval`: resolve prompts and judge first (cheap checks), then open and run.

    `deployment` (not yet open) is what runs; it is opened for the run and closed after it. Everything that
    changes a reply is pinned in config.json, so a resumed run never mixes configurations: the deployment's
    `describe()` (the defense and the content hash of its file, the lock's hash with its stored default alpha,
    alpha, mode, dtype) and, in `evaluate`, the judge, system prompt and token budget.
    """
    from .data import benchmark_kind, harmless_prompts, load_benchmark, load_prompts
    from .judges import get_judge

    if (benchmark is None) == (prompts_file is None):
        raise SafetylockError("pass exactly one of --benchmark NAME or --prompts FILE")
    if limit is not None and limit < 1:
        raise SafetylockError(f"--limit must be at least 1, got {limit}")
    split = None if split in (None, "all") else split
    if benchmark is not None:
        kind = benchmark_kind(benchmark)
        prompts = load_benchmark(benchmark, split)
    else:
        if kind not in ("harmful", "benign"):
            raise SafetylockError(f"--kind must be harmful or benign for a prompt file, got '{kind}'")
        prompts = load_prompts(prompts_file, column)  # type: ignore[arg-type]
        split = None
    prompts = prompts[:limit]
    the_judge = get_judge(judge) if kind in ("harmful", "benign") else None
    from .prompt_attacks import get_prompt_attack

    get_prompt_attack(prompt_attack)  # an unknown name is refused before the model loads
    described = deployment.describe()
    mode = described.pop("lock_mode", None)
    config = {**described, "benchmark": benchmark, "prompts_file": str(prompts_file) if prompts_file else None,
              "split": split, "extract_overlap": extract_overlap(prompts) if split == "eval" else None}
    if mode is not None:
        config["lock_mode"] = mode
    with deployment as m:
        tok = deployment.tokenizer
        summary = evaluate(m, tok, prompts, the_judge, outdir, kind=kind, config=config, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, system=system, overwrite=overwrite, progress=True,
                           prompt_attack=prompt_attack)
        if reference is not None:
            from .models import load_model

            ref, _ = load_model(reference, dtype=deployment.dtype)
            benign = prompts if kind != "harmful" else harmless_prompts("eval")[: limit or 32]
            summary["kl_to_reference"] = kl_divergence(m, ref, tok, benign, batch_size=batch_size, system=system)
            summary["reference"] = reference
            write_json(Path(outdir) / SUMMARY, summary)
    return summary


def write_generation_bench(model: str, out: str | Path, *, n_prompts: int = 16, max_new_tokens: int = 48,
                           batch_size: int = 8, dtype: str = "auto") -> dict[str, Any]:
    """Return and write (`out/generation.json`, `.md`) the batched-vs-loop generation benchmark."""
    from .data import harmless_prompts
    from .models import load_model

    m, tok = load_model(model, dtype=dtype)
    prompts = [p.text for p in harmless_prompts("extract")[:n_prompts]]
    result = {"model": model, "dtype": dtype, **benchmark_generation(m, tok, prompts, max_new_tokens=max_new_tokens,
                                                                     batch_size=batch_size)}
    out = Path(out)
    write_json(out / "generation.json", result)
    b, loop = result["batched"], result["loop"]
    md = (f"# Batched vs one-at-a-time generation ({model}, {dtype}, {result['torch_threads']} threads)\n\n"
          f"{result['prompts']} overrefusal extract-split prompts, greedy, up to {max_new_tokens} new tokens each; "
          f"{platform.machine()} CPU, {os.cpu_count()} cores.\n\n"
          f"Command: `safetylock bench-generate -m {model} --prompts {n_prompts} --max-new-tokens {max_new_tokens} "
          f"--batch-size {batch_size} -o {out}`\n\n"
          "| mode | batch | tokens | seconds | tokens/s |\n|---|---|---|---|---|\n"
          f"| batched | {b['batch_size']} | {b['tokens']} | {b['seconds']} | {b['tokens_per_second']} |\n"
          f"| loop | 1 | {loop['tokens']} | {loop['seconds']} | {loop['tokens_per_second']} |\n\n"
          f"Speed-up: **{result['speedup']}x** tokens/s.\n")
    with atomic_file(out / "generation.md") as handle:
        handle.write(md)
    return result
