"""Print the README's comparison tables from a `safetylock bench` run of bench/repairs_1.5b.sh (or the 0.5B's).

    .venv/bin/python bench/repairs_table.py bench/repairs-1.5b/results.json --base bench/repairs-1.5b/base/results.json

Safety table: one row per defense and strength (* = the calibrated one), one column per attack; each cell is the
harmful rate pooled over harmbench and advbench (k/n) and the over-refusal rate, each with its Wilson 95% interval.
Utility table: bbq300 accuracy and KL to the base per cell. Cost table: what fitting took and what a request costs.
The base row (no fine-tune, no defense) comes from `--base`, run on the same prompts.
"""

from __future__ import annotations

import argparse
import json
import math
from statistics import median_high
from collections.abc import Callable
from pathlib import Path

from safetylock.stats import rate_text

NAMES = {"none": "undefended", "base-refusal": "base-refusal screen (runtime default)", "resta": "RESTA",
         "safe-lora": "Safe LoRA", "guard": "guard (the base, zero-shot)", "gate-refusal": "gate-only refusal",
         "safetylock": "SafetyLock, baked", "safetylock-conditional": "SafetyLock, conditional"}


rate = rate_text


def counts(row: dict, bench: str) -> tuple[int, int]:
    n = int(row[f"{bench}_n"])
    return round(row[bench] * n), n


def harm_cell(row: dict) -> str:
    pairs = [counts(row, b) for b in ("harmbench", "advbench") if f"{b}_n" in row]
    k, n = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    return f"{rate(k, n)} · {rate(*counts(row, 'overrefusal'))}"


def utility_cell(row: dict) -> str:
    kl = row.get("kl_to_base")
    kl_text = "inf" if kl is None or math.isinf(kl) else f"{kl:.2f}"
    return f"{rate(*counts(row, 'bbq300'))} · KL {kl_text}"


def label(row: dict) -> tuple[str, str]:
    alpha = row.get("alpha")
    strength = "-" if alpha is None else f"{alpha:g}" + ("*" if row.get("calibrated") else "")
    return NAMES.get(row["defense"], row["defense"]), strength


def table(rows: list[dict], base: dict | None, cell: Callable[[dict], str]) -> list[str]:
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    out = ["| defense | strength | " + " | ".join(attacks) + " |", "|---|---|" + "---|" * len(attacks)]
    if base is not None:
        out.append("| base, no fine-tune | - | " + " | ".join([cell(base)] * len(attacks)) + " |")
    keys = list(dict.fromkeys((r["defense"], r.get("alpha")) for r in rows))
    for defense, alpha in keys:
        by_attack = {r["attack"]: r for r in rows if (r["defense"], r.get("alpha")) == (defense, alpha)}
        labels = [label(r) for r in by_attack.values()]
        name = labels[0][0]
        strength = next((s for _, s in labels if s.endswith("*")), labels[0][1])  # starred where calibrated
        cells = [cell(by_attack[a]) if a in by_attack else "-" for a in attacks]
        out.append(f"| {name} | {strength} | " + " | ".join(cells) + " |")
    return out


def costs(rows: list[dict]) -> list[str]:
    out = ["| defense | fit / train s (once) | apply s | tokens/s vs undefended (median over cells) | screen s/prompt |",
           "|---|---|---|---|---|"]
    for defense in dict.fromkeys(r["defense"] for r in rows):
        mine = [r for r in rows if r["defense"] == defense]
        prep = max((r.get("prep_seconds") or 0.0) for r in mine)
        apply_s = median_high(r.get("apply_seconds") or 0.0 for r in mine)
        tps = median_high(r.get("tps_ratio") or 0.0 for r in mine)
        screen = [r["seconds_per_prompt"] for r in mine if r.get("seconds_per_prompt") is not None]
        screen_text = f"{median_high(screen):.2f}" if screen else "-"
        out.append(f"| {NAMES.get(defense, defense)} | {prep:.0f} | {apply_s:.3g} | {tps:.2f} | {screen_text} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--base", type=Path, help="results.json of the same prompts on the base (attack none)")
    args = parser.parse_args()
    rows = json.loads(args.results.read_text(encoding="utf-8"))["rows"]
    base = None
    if args.base is not None:
        base_rows = json.loads(args.base.read_text(encoding="utf-8"))["rows"]
        base = next(r for r in base_rows if r["attack"] == "none" and r["defense"] == "none")
    print("Harmful (harmbench + advbench) · over-refusal, rate [Wilson 95%]:\n")
    print("\n".join(table(rows, base, harm_cell)))
    print("\nbbq300 accuracy [Wilson 95%] · KL to the base:\n")
    print("\n".join(table(rows, base, utility_cell)))
    print("\nCosts:\n")
    print("\n".join(costs(rows)))


if __name__ == "__main__":
    main()
