"""What the conditional lock costs at prefill and decode, next to the unlocked model, on long prompts; writes
bench/prefill.{json,md}.

    .venv/bin/python bench/prefill_bench.py --model ALIAS --lock LOCK [--tokens 1024] [--prompts 4] [--rounds 3]

Each prompt is one ~`--tokens`-token chat turn (batch 1, as a server sees it): benign notes put together from the
mt-bench prompts with a request to summarise them, or the same notes followed by a held-out advbench request, so
that the gate fires. Per round every mode runs every prompt once, in turn, so drift on a shared machine hits all
modes alike; the figure is the ratio of median seconds. Modes:

- unlocked: the model alone;
- conditional: the lock's hooks, the gate deciding inside the prompt's own pass (`lock.gate`);
- decision pass first: the gate read in a pass of its own up to its deepest layer, then the prompt pass (what
  every conditional call cost before, and what a gate that reads the base under a LoRA adapter still costs).

Decode is `--new-tokens` one-token steps from the prefill's cache, timed apart from the prefill.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from safetylock.data import load_benchmark
from safetylock.generate import format_chat
from safetylock.lock import Lock
from safetylock.lock.gate import gate_logits_on_ids
from safetylock.models import load_model

HERE = Path(__file__).resolve().parent
MODES = ("unlocked", "conditional", "decision pass first")


def long_prompts(tokenizer: Any, n: int, tokens: int) -> dict[str, list[str]]:
    """Return {"benign": [...], "flagged": [...]}: `n` chat texts each, every one exactly as long in tokens."""
    notes = [p.text for p in load_benchmark("mtbench", "eval")] + [p.text for p in load_benchmark("mtbench", "extract")]
    harmful = [p.text for p in load_benchmark("advbench", "eval")]
    out: dict[str, list[str]] = {"benign": [], "flagged": []}
    budget = tokens - len(tokenizer(format_chat(tokenizer, "x"), add_special_tokens=False)["input_ids"])
    for i in range(n):
        body = tokenizer("\n\n".join(notes[i:] + notes[:i]), add_special_tokens=False)["input_ids"]
        for kind, ask in (("benign", "Summarise the notes above in three sentences."),
                          ("flagged", f"Forget the notes above. {harmful[i % len(harmful)]}")):
            ask_ids = tokenizer(f"\n\n{ask}", add_special_tokens=False)["input_ids"]
            ids = body[: max(1, budget - len(ask_ids))]
            out[kind].append(format_chat(tokenizer, tokenizer.decode(ids) + tokenizer.decode(ask_ids)))
    return out


@torch.inference_mode()
def timed(model: Any, lock: Lock, mode: str, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Return (prefill seconds, decode seconds) of one prompt under `mode`."""
    mask = torch.ones_like(ids)
    start = time.perf_counter()
    if mode == "decision pass first":
        gate_logits_on_ids(lock, model, ids, mask)
    with lock.applied(model, conditional=True) if mode != "unlocked" else contextlib.nullcontext():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
            out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        return prefill, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--lock", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    lock = Lock.load(args.lock)
    if lock.gate is None:
        raise SystemExit(f"{args.lock} has no gate: extract it with --conditional")
    texts = long_prompts(tokenizer, args.prompts, args.tokens)
    encoded = {kind: [tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"] for t in rows]
               for kind, rows in texts.items()}
    fired = {kind: sum(bool(gate_logits_on_ids(lock, model, ids, torch.ones_like(ids))[0] > 0) for ids in rows)
             for kind, rows in encoded.items()}
    timed(model, lock, "conditional", encoded["benign"][0], 2)  # warm-up
    seconds: dict[str, dict[str, dict[str, list[float]]]] = {
        kind: {mode: {"prefill": [], "decode": []} for mode in MODES} for kind in encoded}
    for r in range(args.rounds):
        for kind, rows in encoded.items():
            for ids in rows:
                for mode in MODES:
                    prefill, decode = timed(model, lock, mode, ids, args.new_tokens)
                    seconds[kind][mode]["prefill"].append(prefill)
                    seconds[kind][mode]["decode"].append(decode)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    def ratio(kind: str, mode: str, part: str) -> float:
        """tokens/s of `mode` over the unlocked model's: unlocked median seconds / mode median seconds."""
        return round(statistics.median(seconds[kind]["unlocked"][part]) / statistics.median(seconds[kind][mode][part]), 3)

    n_tokens = {kind: [int(ids.shape[1]) for ids in rows] for kind, rows in encoded.items()}
    result = {
        "model": args.model, "lock": args.lock.name, "heads": len(lock), "shifted_layers": len(set(lock.layers.tolist())),
        "gate": {"design": lock.gate.design, "layers": sorted(set(lock.gate.layers)), "reads": lock.gate.reads},
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "prompt_tokens": n_tokens, "gate_fired": fired, "rounds": args.rounds, "new_tokens": args.new_tokens,
        "seconds": {kind: {mode: {part: [round(v, 4) for v in vs] for part, vs in parts.items()}
                           for mode, parts in modes.items()} for kind, modes in seconds.items()},
        "ratio_over_unlocked": {kind: {mode: {part: ratio(kind, mode, part) for part in ("prefill", "decode")}
                                       for mode in MODES[1:]} for kind in encoded},
        "command": "bench/prefill_bench.py " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                        if k != "out"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefill.json").write_text(json.dumps(result, indent=2) + "\n")
    rows_md = []
    for kind in encoded:
        for mode in MODES:
            med = {part: statistics.median(seconds[kind][mode][part]) for part in ("prefill", "decode")}
            r = result["ratio_over_unlocked"][kind].get(mode, {"prefill": 1.0, "decode": 1.0})
            rows_md.append(f"| {kind} (gate fired {fired[kind]}/{len(encoded[kind])}) | {mode} | "
                           f"{statistics.mean(n_tokens[kind]) / med['prefill']:.0f} | {r['prefill']:.3f}x | "
                           f"{args.new_tokens / med['decode']:.1f} | {r['decode']:.3f}x |")
    gate = result["gate"]
    md = (f"# The conditional lock's prefill and decode cost\n\n"
          f"`{args.model}`, lock `{args.lock.name}` ({len(lock)} heads on {result['shifted_layers']} layers), gate "
          f"{gate['design']} reading layers {gate['layers']} of the {gate['reads']}; {result['dtype']}; "
          f"{result['machine']}. {args.prompts} prompts of {statistics.mean(n_tokens['benign']):.0f} tokens per kind, "
          f"batch 1, {args.rounds} rounds, medians; decode: {args.new_tokens} one-token steps from the prefill's cache.\n\n"
          f"Command: `.venv/bin/python {result['command']}`, the lock from `safetylock extract -m {args.model} "
          f"-o {args.lock}`\n\n"
          "| prompts | mode | prefill tokens/s | vs unlocked | decode tokens/s | vs unlocked |\n|---|---|---|---|---|---|\n"
          + "\n".join(rows_md) + "\n")
    (args.out / "prefill.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
