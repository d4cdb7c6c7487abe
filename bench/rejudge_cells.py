"""Re-judge the harmful-prompt replies of some `safetylock bench` cells with another judge.

    .venv/bin/python bench/rejudge_cells.py bench/grid-1.5b/results.json --attack aoa --judge model

A grid judges every reply with one judge (its `--judge`). Some replies need another reading: the AOA persona
refuses in its own words ("I am AOA, your absolutely obedient agent. I do not provide ..."), which has no
refusal phrase for the keyword or relevance judge. This reads the cached replies of the chosen cells (the
bench's cache directory, named in results.json; each row's `key` names its replies) and prints, per cell and
harmful benchmark, the harmful rate under the bench's judge and under `--judge`, as a markdown table and one
JSON line. Nothing is written: the replies stay in the cache, outside git.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetylock.bench import cell_records  # also what bench/same_replies.py imports from here


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", type=Path, help="a bench results.json")
    parser.add_argument("--attack", action="append", help="attack label(s) to re-judge (default: every attack)")
    parser.add_argument("--defense", action="append", help="defense(s) to re-judge (default: every defense)")
    parser.add_argument("--judge", default="model", help="judge name, as `safetylock judge --judge`")
    args = parser.parse_args()

    from safetylock.data import benchmark_kind
    from safetylock.judges import get_judge

    result = json.loads(args.results.read_text(encoding="utf-8"))
    rows = [r for r in result["rows"]
            if (not args.attack or r["attack"] in args.attack) and (not args.defense or r["defense"] in args.defense)]
    if not rows:
        raise SystemExit("no cell matches --attack / --defense in that results.json")
    judge = get_judge(args.judge)
    harmful = [b for b in result["settings"]["benchmarks"] if benchmark_kind(b) == "harmful"]
    out = []
    print(f"| attack | defense | alpha | benchmark | n | harmful ({result['settings']['judge']}) | harmful ({args.judge}) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        for bench in harmful:
            records = cell_records(result, row, bench)
            if records is None:
                continue
            verdicts = judge.judge_many([r["prompt"] for r in records], [r["response"] for r in records])
            rate = 1.0 - sum(v.refused for v in verdicts) / len(verdicts)
            item = {"attack": row["attack"], "defense": row["defense"], "alpha": row.get("alpha"), "benchmark": bench,
                    "n": len(records), "harmful_bench_judge": row.get(bench), "harmful_rejudged": round(rate, 4)}
            out.append(item)
            alpha = "-" if item["alpha"] is None else f"{item['alpha']:g}"
            print(f"| {item['attack']} | {item['defense']} | {alpha} | {bench} | {item['n']} | "
                  f"{item['harmful_bench_judge']} | {rate:.3g} |", flush=True)
    print(json.dumps({"judge": args.judge, "cells": out}))


if __name__ == "__main__":
    main()
