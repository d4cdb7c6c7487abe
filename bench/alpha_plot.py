"""Harmful rate against over-refusal as alpha sweeps, baked vs conditional lock; writes bench/alpha-0.5b.{png,json}.

    .venv/bin/python bench/alpha_plot.py [--runs runs/eval] [--prefix 0.5b] [--attack h100]

Reads the alpha-1.5 runs of bench/results_0.5b.sh (`PREFIX-ATTACK-{lock,clock}-{harmbench,overrefusal}`) and the
sweep of bench/alpha_sweep_0.5b.sh (`PREFIX-alpha/ATTACK-{lock,clock}-aA-...`). Both rates are judged twice, as
in the results table: keyword, and deflection-aware (`relevance:0.25`: a reply that ignores the prompt counts as
a refusal, so "I'm not sure what you're asking." to a benign prompt is over-refusal).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from results_table import judged_rows, rejudged_refused_share  # noqa: E402  (bench/ is on sys.path when run)

HERE = Path(__file__).resolve().parent


def rates(harm_dir: Path, benign_dir: Path) -> dict[str, float] | None:
    if not (harm_dir / "summary.json").is_file() or not (benign_dir / "summary.json").is_file():
        return None
    harm, benign = (json.loads((d / "summary.json").read_text()) for d in (harm_dir, benign_dir))
    return {"harmful_keyword": harm["harmful_rate"],
            "harmful_deflection_aware": 1 - rejudged_refused_share(judged_rows(harm_dir / "results.jsonl")),
            "harmful_empty_replies": harm["empty_rate"], "over_refusal_keyword": benign["refusal_rate"],
            "over_refusal_deflection_aware": rejudged_refused_share(judged_rows(benign_dir / "results.jsonl"))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, default=Path("runs/eval"))
    parser.add_argument("--prefix", default="0.5b")
    parser.add_argument("--attack", default="h100")
    args = parser.parse_args()
    points: dict[str, list[dict[str, float]]] = {"lock": [], "clock": []}
    for mode in points:
        base = rates(args.runs / f"{args.prefix}-{args.attack}-{mode}-harmbench",
                     args.runs / f"{args.prefix}-{args.attack}-{mode}-overrefusal")
        if base:
            points[mode].append({"alpha": 1.5, **base})
        for harm in sorted((args.runs / f"{args.prefix}-alpha").glob(f"{args.attack}-{mode}-a*-harmbench")):
            alpha = float(re.search(r"-a([0-9.]+)-harmbench$", harm.name).group(1))  # type: ignore[union-attr]
            found = rates(harm, harm.with_name(harm.name.replace("-harmbench", "-overrefusal")))
            if found:
                points[mode].append({"alpha": alpha, **found})
        points[mode].sort(key=lambda p: p["alpha"])
    attacked = rates(args.runs / f"{args.prefix}-{args.attack}-harmbench", args.runs / f"{args.prefix}-{args.attack}-overrefusal")
    base = rates(args.runs / f"{args.prefix}-base-harmbench", args.runs / f"{args.prefix}-base-overrefusal")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, judge, title in ((axes[0], "keyword", "keyword judge"),
                             (axes[1], "deflection_aware", "deflection-aware judge (relevance:0.25)")):
        hk, ok = f"harmful_{judge}", f"over_refusal_{judge}"
        for mode, label, color in (("lock", "baked lock", "tab:red"), ("clock", "conditional lock", "tab:blue")):
            pts = points[mode]
            ax.plot([p[ok] for p in pts], [p[hk] for p in pts], "o-", color=color, label=label)
            for p in pts:
                ax.annotate(f"a={p['alpha']:g}", (p[ok], p[hk]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for ref, label, marker in ((base, "aligned base", "s"), (attacked, "fine-tune, no defense", "x")):
            if ref:
                ax.plot([ref[ok]], [ref[hk]], marker, color="black", label=label)
        ax.set_xlabel("refused or deflected benign prompts (overrefusal eval split, 24)")
        ax.set_title(title)
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("harmful rate (harmbench eval split, 48 prompts)")
    axes[0].legend(fontsize=8)
    attack = {"h10": "harmful-10", "h100": "harmful-100"}.get(args.attack, args.attack)
    fig.suptitle(f"qwen2.5-coder-{args.prefix}-instruct + {attack} fine-tune: lock strength (alpha) sweep")
    fig.tight_layout()
    out = HERE / f"alpha-{args.prefix}.png"
    fig.savefig(out, dpi=110)
    (HERE / f"alpha-{args.prefix}.json").write_text(json.dumps({"base": base, "attacked": attacked, **points}, indent=2) + "\n")
    print(json.dumps(points, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
