"""How long baking a lock takes, and what a baked model costs at generation time; writes bench/apply.{json,md}.

    .venv/bin/python bench/apply_bench.py --model ALIAS --lock LOCK [--adapter DIR] [--repeats 20]

Baking is timed `--repeats` times (unbaking in between) and the median reported, split into the lock-side
preparation (`Lock.deltas`: the per-layer shift vectors at this alpha, no model weights touched) and the bake
itself (`Lock.bake`: one W_o @ delta per layer, NaN check, bias write). Generation tokens/s of the unlocked and
the baked model are measured alternately (three rounds each, same prompts, greedy) so that drift on a shared
machine hits both; the ratio of the medians is the figure. Every row generates exactly `--new-tokens` tokens
(EOS ignored): a locked model's replies are often shorter, and in a batch finished rows still cost a step, so
tokens/s of free-running generation would measure reply length, not the cost of the bias.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from safetylock.data import load_benchmark
from safetylock.generate import format_chat
from safetylock.lock import Lock
from safetylock.models import load_model

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--lock", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--top", type=int, default=24, help="also time baking the lock's top-K heads by probe score")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, adapter=args.adapter)
    model.eval()
    lock = Lock.load(args.lock)
    keep = torch.argsort(lock.scores, descending=True, stable=True)[: args.top]
    top = lock.select(keep)
    prep, bake, bake_top = [], [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        lock.deltas(None, model)
        prep.append(time.perf_counter() - start)
        bake.append(lock.bake(model))
        lock.unbake(model)
        bake_top.append(top.bake(model))
        top.unbake(model)

    prompts = [format_chat(tokenizer, p.text) for p in load_benchmark("overrefusal", "extract")[:8]]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

    def fixed_length_tps() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        seconds = time.perf_counter() - start
        return (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0] / seconds

    fixed_length_tps()  # warm-up
    tps: dict[str, list[float]] = {"unlocked": [], "baked": []}
    for _ in range(args.rounds):
        for state in ("unlocked", "baked"):
            if state == "baked":
                lock.bake(model)
            tps[state].append(fixed_length_tps())
            if state == "baked":
                lock.unbake(model)

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    result = {
        "model": args.model, "adapter": str(args.adapter) if args.adapter else None, "lock": args.lock.name,
        "heads": len(lock), "alpha": lock.default_alpha, "dtype": dtype,
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "repeats": args.repeats,
        "prep_ms_median": round(statistics.median(prep) * 1000, 3),
        "bake_ms_median": round(statistics.median(bake) * 1000, 3),
        "bake_ms_min": round(min(bake) * 1000, 3),
        "top_heads": len(top), "top_layers": len(set(top.layers.tolist())),
        "bake_top_ms_median": round(statistics.median(bake_top) * 1000, 3),
        "bake_top_ms_min": round(min(bake_top) * 1000, 3),
        "tokens_per_second": {k: [round(v, 2) for v in vs] for k, vs in tps.items()},
        "tps_ratio_baked_over_unlocked": round(statistics.median(tps["baked"]) / statistics.median(tps["unlocked"]), 3),
        "command": "bench/apply_bench.py " + " ".join(f"--{k}={v}" for k, v in vars(args).items()
                                                      if v is not None and k != "out"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "apply.json").write_text(json.dumps(result, indent=2) + "\n")
    md = (f"# Applying a lock: time and generation cost\n\n"
          f"`{result['model']}`{' + ' + result['adapter'] if result['adapter'] else ''}, lock `{result['lock']}` "
          f"({result['heads']} heads, alpha {result['alpha']}), {dtype}; {result['machine']}.\n\n"
          f"Command: `.venv/bin/python {result['command']}`\n\n"
          "| what | figure |\n|---|---|\n"
          f"| lock-side preparation (`Lock.deltas`), median of {args.repeats} | {result['prep_ms_median']} ms |\n"
          f"| bake into the model (`Lock.bake`), median of {args.repeats} | {result['bake_ms_median']} ms "
          f"(min {result['bake_ms_min']} ms) |\n"
          f"| bake the lock's top {result['top_heads']} heads by probe score ({result['top_layers']} layers), median of "
          f"{args.repeats} | {result['bake_top_ms_median']} ms (min {result['bake_top_ms_min']} ms) |\n"
          f"| generation tokens/s, unlocked ({args.rounds} rounds, 8 prompts x {args.new_tokens} tokens) | {', '.join(map(str, result['tokens_per_second']['unlocked']))} |\n"
          f"| generation tokens/s, baked ({args.rounds} rounds, 8 prompts x {args.new_tokens} tokens) | {', '.join(map(str, result['tokens_per_second']['baked']))} |\n"
          f"| baked / unlocked tokens/s (medians) | {result['tps_ratio_baked_over_unlocked']} |\n")
    (args.out / "apply.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
