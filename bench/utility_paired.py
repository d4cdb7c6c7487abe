"""Compare two models' accuracy on the same utility questions, pairing replies by prompt id.

    .venv/bin/python bench/utility_paired.py --base RUN [RUN ...] --model RUN [RUN ...] [--label NAME]

Each RUN is a `safetylock eval` directory of a utility benchmark (gsm8k100, bbq300); several runs of one model
(e.g. the eval and the extract split) are merged, so a whole set can be compared. Only questions that both
models answered count. Prints one markdown row and a JSON line: n, both accuracies, the difference in points,
how many questions only the base got right (lost) and only the model got right (won), and the exact two-sided
McNemar p-value (a binomial test on lost vs won): a small difference with a large p is noise, not damage.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def correct_by_id(runs: list[Path]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for run in runs:
        for line in (run / "results.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            out[row["id"]] = bool(row["correct"])
    return out


def mcnemar_p(lost: int, won: int) -> float:
    """Exact two-sided p of seeing a split at least this uneven among lost + won discordant pairs."""
    n = lost + won
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(lost, won) + 1)) / 2**n
    return min(1.0, 2 * tail)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=Path, nargs="+", required=True)
    parser.add_argument("--model", type=Path, nargs="+", required=True)
    parser.add_argument("--label", default="model")
    args = parser.parse_args()
    base, model = correct_by_id(args.base), correct_by_id(args.model)
    ids = sorted(set(base) & set(model))
    if not ids:
        raise SystemExit("the runs share no question ids; pass runs of the same benchmark")
    lost = sum(base[i] and not model[i] for i in ids)
    won = sum(model[i] and not base[i] for i in ids)
    acc_base, acc_model = sum(base[i] for i in ids) / len(ids), sum(model[i] for i in ids) / len(ids)
    result = {"label": args.label, "n": len(ids), "base": acc_base, "model": acc_model,
              "points": round(100 * (acc_model - acc_base), 1), "lost": lost, "won": won,
              "mcnemar_p": round(mcnemar_p(lost, won), 3)}
    print(f"| {args.label} | {len(ids)} | {100 * acc_base:.1f}% | {100 * acc_model:.1f}% | "
          f"{result['points']:+.1f} | {lost} | {won} | {result['mcnemar_p']:.2f} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
