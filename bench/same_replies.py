"""Count how many replies of a defended `safetylock bench` cell equal the undefended model's, prompt by prompt.

    .venv/bin/python bench/same_replies.py bench/gsm8k-1.5b-128/results.json --defense safetylock-conditional

The conditional lock shifts only prompts its harmfulness probe flags; on a benign prompt it leaves the model
untouched, so its greedy reply is the undefended reply, token for token, at any reply length. This checks that
from the cached replies (the bench's cache directory, named in results.json): for every attack, each benchmark,
the number of prompts whose reply is identical. Prints a markdown table and one JSON line; writes nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rejudge_cells import cell_records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", type=Path, help="a bench results.json")
    parser.add_argument("--defense", required=True, help="the defense to compare with the undefended cells")
    args = parser.parse_args()

    result = json.loads(args.results.read_text(encoding="utf-8"))
    rows = result["rows"]
    undefended = {(r["model"], r["attack"]): r for r in rows if r["defense"] == "none"}
    out = []
    print("| model | attack | defense | alpha | benchmark | identical replies |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        base = undefended.get((row["model"], row["attack"]))
        if row["defense"] != args.defense or base is None:
            continue
        for bench in result["settings"]["benchmarks"]:
            mine, theirs = cell_records(result, row, bench), cell_records(result, base, bench)
            if mine is None or theirs is None:
                continue
            replies = {r["id"]: r["response"] for r in theirs}
            same = sum(r["response"] == replies.get(r["id"]) for r in mine)
            item = {"model": row["model"], "attack": row["attack"], "defense": row["defense"], "alpha": row.get("alpha"),
                    "benchmark": bench, "identical": same, "n": len(mine)}
            out.append(item)
            alpha = "-" if item["alpha"] is None else f"{item['alpha']:g}"
            print(f"| {row['model']} | {row['attack']} | {row['defense']} | {alpha} | {bench} | {same} of {len(mine)} |")
    if not out:
        raise SystemExit(f"no '{args.defense}' cell with an undefended twin and cached replies in that results.json")
    print(json.dumps({"defense": args.defense, "cells": out}))


if __name__ == "__main__":
    main()
