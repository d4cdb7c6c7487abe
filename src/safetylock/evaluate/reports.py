"""Compare finished runs side by side: a markdown table (and JSON) from each OUTDIR's summary.json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import SafetylockError
from ..files import atomic_file, write_json
from .harness import SUMMARY

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
        from ..judges import accuracy_line

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
