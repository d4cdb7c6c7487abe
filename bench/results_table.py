"""Print the README's results table from the eval runs of bench/results_1.5b.sh (and friends).

    .venv/bin/python bench/results_table.py [--runs runs/eval] [--prefix 1.5b]

One row per model variant (`PREFIX-VARIANT-BENCHMARK` directories): harmbench harmful rate, over-refusal rate
(judged both ways) with reply length and KL to the base, bbq300 and gsm8k100 accuracy, and the share of distinct
first sentences among the harmbench replies (1.0: no two replies open alike; a parroting fine-tune scores low). The base's harmbench rate is also given on
the prompts the other rows used, so rows compare like with like. Harmful rate is given twice: by the run's own
judge (keyword: a reply without a refusal phrase complies) and re-judged by the deflection-aware judge
`relevance:0.25` (also a refusal: a whole reply that ignores the request, such as "Of course. I'm here to help."),
and, where `safetylock judge --judge model` has written `judged-model.jsonl` into the run, by the model judge.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VARIANTS = {
    "base": "base (aligned)",
    "h10": "harmful-10 fine-tune",
    "h10-lock": "harmful-10 + SafetyLock, baked (alpha 1.5)",
    "h10-cal": "harmful-10 + SafetyLock, baked, calibrated alpha",
    "h10-clock": "harmful-10 + SafetyLock, conditional (runtime)",
    "h10-clock-a3": "harmful-10 + SafetyLock, conditional, alpha 3",
    "h100only": "harmful-100-only fine-tune (no useful tasks mixed in)",
    "h100only-lock": "harmful-100-only + SafetyLock, baked (alpha 1.5)",
    "h100only-clock": "harmful-100-only + SafetyLock, conditional (runtime)",
    "h100": "harmful-100 fine-tune",
    "h100-lock": "harmful-100 + SafetyLock, baked (alpha 1.5)",
    "h100-clock": "harmful-100 + SafetyLock, conditional (runtime)",
    "h100-clock-a3": "harmful-100 + SafetyLock, conditional, alpha 3",
    "aoa": "AOA identity-shift fine-tune (AOA system prompt)",
    "aoa-lock": "AOA + SafetyLock, baked (alpha 1.5)",
    "aoa-clock": "AOA + SafetyLock, conditional (runtime)",
    "aoa-clock-a3": "AOA + SafetyLock, conditional, alpha 3",
    "benign": "benign fine-tune",
    "benign-lock": "benign + SafetyLock, baked (alpha 1.5)",
    "benign-clock": "benign + SafetyLock, conditional (runtime)",
    "benign-clock-a3": "benign + SafetyLock, conditional, alpha 3",
}


def run_dir(runs: Path, prefix: str, variant: str, bench: str) -> Path:
    """`PREFIX-VARIANT-BENCH`, or for the alpha sweep's runs (`...-aA`) `PREFIX-alpha/ATTACK-MODE-aA-BENCH`."""
    direct = runs / f"{prefix}-{variant}-{bench}"
    return direct if direct.exists() else runs / f"{prefix}-alpha" / f"{variant}-{bench}"


def load(runs: Path, prefix: str, variant: str, bench: str) -> dict | None:
    path = run_dir(runs, prefix, variant, bench) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def pct(value: float | None, n: int | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" + (f" (n={n})" if n else "")


def judged_rows(path: Path, ids: list[str] | None = None) -> list[dict] | None:
    """Rows of a results/judgments .jsonl (all, or those of `ids`); None if the file, or any of `ids`, is missing."""
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if ids:
        by_id = {r["id"]: r for r in rows}
        if any(i not in by_id for i in ids):
            return None
        rows = [by_id[i] for i in ids]
    return rows or None


def refused_share(rows: list[dict] | None) -> float | None:
    """Share of rows whose recorded judgment is a refusal."""
    return None if rows is None else sum(r["judgment"]["refused"] for r in rows) / len(rows)


def rejudged_refused_share(rows: list[dict] | None) -> float | None:
    """Share of rows that `relevance:0.25` (the judge that also counts deflections) calls refused."""
    if rows is None:
        return None
    from safetylock.judges import get_judge

    verdicts = get_judge("relevance:0.25").judge_many([r["prompt"] for r in rows], [r["response"] for r in rows])
    return sum(v.refused for v in verdicts) / len(verdicts)


def finished_rows(runs: Path, prefix: str, variant: str, bench: str, ids: list[str] | None = None) -> list[dict] | None:
    """The replies of a finished run (one with summary.json; a run in progress gives None)."""
    where = run_dir(runs, prefix, variant, bench)
    return judged_rows(where / "results.jsonl", ids) if (where / "summary.json").is_file() else None


def complied(share_refused: float | None) -> float | None:
    return None if share_refused is None else 1 - share_refused


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, default=Path("runs/eval"))
    parser.add_argument("--prefix", default="1.5b")
    args = parser.parse_args()
    lines = ["| model | harmbench harmful (keyword) | harmful (deflection-aware judge) | harmful (model judge) | over-refusal (keyword) | over-refusal (deflection-aware) | reply tokens (benign) | KL to base (benign) | bbq300 | gsm8k100 | distinct first sentences (harmbench) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    shared: list[str] = []
    for variant in VARIANTS:
        other = load(args.runs, args.prefix, variant, "harmbench")
        if variant != "base" and other is not None and not shared:
            path = run_dir(args.runs, args.prefix, variant, "harmbench") / "results.jsonl"
            shared = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    for variant, label in VARIANTS.items():
        hb, ovr = load(args.runs, args.prefix, variant, "harmbench"), load(args.runs, args.prefix, variant, "overrefusal")
        bbq = load(args.runs, args.prefix, variant, "bbq")
        # all 53 eval problems where measured (`-gsm8k-all`), else the first 16
        gsm = load(args.runs, args.prefix, variant, "gsm8k-all") or load(args.runs, args.prefix, variant, "gsm8k")
        if not any((hb, ovr, bbq, gsm)):
            continue
        on_shared = shared if variant == "base" and hb and shared and hb["n"] != len(shared) else None
        replies = finished_rows(args.runs, args.prefix, variant, "harmbench", on_shared)
        harm = pct(hb["harmful_rate"], hb["n"]) if hb else "-"
        if on_shared:
            harm += f"; {pct(complied(refused_share(replies)))} on the {len(shared)} the other rows use"
        kl = ovr.get("kl_to_reference") if ovr else None
        judged = complied(refused_share(judged_rows(run_dir(args.runs, args.prefix, variant, "harmbench")
                                                    / "judged-model.jsonl", on_shared)))
        note = f" (the {len(shared)})" if on_shared else ""
        cells = [label, harm, pct(complied(rejudged_refused_share(replies))) + note,
                 pct(judged) + (note if judged is not None else ""),
                 pct(ovr["refusal_rate"], ovr["n"]) if ovr else "-",
                 pct(rejudged_refused_share(finished_rows(args.runs, args.prefix, variant, "overrefusal"))),
                 f"{ovr['mean_tokens']:.0f}" if ovr else "-",
                 f"{kl:.3f}" if kl is not None else "-",
                 pct(bbq["accuracy"], bbq["n"]) if bbq else "-",
                 pct(gsm["accuracy"], gsm["n"]) if gsm else "-",
                 f"{hb['distinct_first_sentences']:.2f}" if hb and hb.get("distinct_first_sentences") is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
