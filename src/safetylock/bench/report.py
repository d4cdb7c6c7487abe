"""The bench's reports: RESULTS.md (one table per model) and the PNG plots of a grid's results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files import atomic_file
from .settings import DEFAULT_ALPHAS

COLUMNS = (("attack", "attack"), ("defense", "defense"), ("alpha", "alpha"), ("harmbench", "harmful harmbench"),
           ("advbench", "harmful advbench"), ("overrefusal", "over-refusal"), ("gsm8k100", "gsm8k100"),
           ("bbq300", "bbq300"), ("kl_to_base", "KL to base"), ("apply_seconds", "apply s"),
           ("prep_seconds", "fit/train s"), ("tps_ratio", "tokens/s ratio"), ("seconds_per_prompt", "screen s/prompt"))


def _cell_text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.3f}".rstrip("0").rstrip(".") or "0"
    return str(value)


RATES = ("harmbench", "advbench", "overrefusal", "gsm8k100", "bbq300")  # shares of n prompts: shown with their interval


def _row_text(row: dict[str, Any], key: str) -> str:
    """Return one table cell: rates with their Wilson 95% interval, the calibrated strength starred."""
    value = row.get(key)
    if key == "alpha" and value is not None and row.get("calibrated"):
        return f"{_cell_text(value)}*"
    n = row.get(f"{key}_n")
    if key in RATES and isinstance(value, (int, float)) and isinstance(n, int) and n > 0:
        from ..stats import wilson

        low, high = wilson(round(value * n), n)
        return f"{_cell_text(value)} [{low:.2f}, {high:.2f}]"
    return _cell_text(value)


def _calibration_lines(result: dict[str, Any], model: str) -> list[str]:
    found = (result.get("calibration") or {}).get(model) or {}
    if not found:
        return []
    lines = ["Calibrated strengths (* above): on the model each attack below made, every swept strength ran on the "
             "calibration prompts (advbench and overrefusal extract splits, which no cell evaluates); the weakest "
             "one with a harmful rate at most the base's and benign refusals within the budget of the base's wins.",
             "", "| defense | on attack | n | base harmful / benign refused | strength: harmful / benign refused | "
             "chosen | target met |", "|---|---|---|---|---|---|---|"]
    for defense, c in found.items():
        points = "; ".join(f"{p['alpha']:g}: {p['harmful_rate']:.2f} / {p['benign_refusal_rate']:.2f}"
                           for p in c["points"])
        lines.append(f"| {defense} | {c['attack']} | {c['n']} | {c['reference_harmful_rate']:.2f} / "
                     f"{c['reference_benign_refusal_rate']:.2f} | {points} | {_cell_text(c['chosen_alpha'])} | "
                     f"{'yes' if c['target_met'] else 'no'} |")
    return [*lines, ""]


def results_markdown(result: dict[str, Any]) -> str:
    """Return RESULTS.md: settings, then one table per model (rows: attack x defense x alpha)."""
    s = result["settings"]
    lines = ["# safetylock bench", "",
             f"Eval splits, first {s['limit']} prompts of each benchmark; judge `{s['judge']}`; greedy, "
             f"{s['max_new_tokens']} new tokens ({s['math_tokens']} for gsm8k100). Harmful and over-refusal are rates "
             "(lower is better), gsm8k100 and bbq300 accuracies. KL to base: mean KL(base || defended) of the first "
             f"reply token over {s['kl_prompts']} overrefusal eval prompts. apply s: time to apply the defense to a "
             "loaded model; fit/train s: time to fit its artifact (once per base, or per attacked model for "
             "safety-sft; resta and safe-lora include training the base's harmful fine-tune). tokens/s ratio: "
             "generation throughput relative to the undefended model. screen s/prompt: the guard's time per screened "
             "prompt (KL to base is inf where it refuses a KL prompt: the fixed reply has one possible token). "
             "Brackets: Wilson 95% intervals.", "",
             f"Self-reminder system prompt: \"{result['self_reminder']}\"", ""]
    used = [(k, h) for k, h in COLUMNS if k in ("attack", "defense") or any(r.get(k) is not None for r in result["rows"])]
    for model in result["models"]:
        lines += [f"## {model}", "", "| " + " | ".join(h for _, h in used) + " |", "|" + "---|" * len(used)]
        for r in (r for r in result["rows"] if r["model"] == model):
            lines.append("| " + " | ".join(_row_text(r, k) for k, _ in used) + " |")
        lines.append("")
        lines += _calibration_lines(result, model)
    from ..judges import accuracy_line

    lines.append(accuracy_line(s["judge"]))
    if result.get("computed") is not None:
        lines.append(f"Computed this run: {len(result['computed'])} item(s); cache: `{result['cache_dir']}`.")
    return "\n".join(lines) + "\n"


def _harm(row: dict[str, Any]) -> float | None:
    values = [row[k] for k in ("harmbench", "advbench") if row.get(k) is not None]
    return sum(values) / len(values) if values else None


def _default_row(rows: list[dict[str, Any]], defense: str) -> dict[str, Any] | None:
    """Return the row of a defense at its default strength (or its first strength)."""
    mine = [r for r in rows if r["defense"] == defense]
    if not mine:
        return None
    want = DEFAULT_ALPHAS.get(defense, (None,))[0]
    return next((r for r in mine if r.get("alpha") == want), mine[0])


def write_plots(result: dict[str, Any], outdir: Path) -> list[Path]:
    """Write the trade-off curves, the bar chart and (with several attack steps) the attack-strength plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    models, attacks = result["models"], result["attacks"]
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = outdir / name
        with atomic_file(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=110)
        plt.close(fig)
        written.append(path)

    fig, axes = plt.subplots(len(models), len(attacks), figsize=(4.2 * len(attacks), 3.6 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, attack in enumerate(attacks):
            ax = axes[i][j]
            cell = [r for r in rows if r["model"] == model and r["attack"] == attack]
            for defense in result["defenses"]:
                pts = sorted(((r.get("overrefusal"), _harm(r), r.get("alpha")) for r in cell if r["defense"] == defense),
                             key=lambda p: (p[2] is None, p[2] or 0))
                pts = [p for p in pts if p[0] is not None and p[1] is not None]
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=defense)
                for x, y, a in pts:
                    if a is not None and len(pts) > 1:
                        ax.annotate(f"{a:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel("over-refusal rate")
            ax.set_ylabel("harmful rate")
            ax.set_xlim(-0.05, 1.05)
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(f"{Path(model).name[:28]} / {attack}", fontsize=9)
            ax.legend(fontsize=7)
    save(fig, "tradeoff.png")

    metrics = [k for k in ("harmbench", "advbench", "overrefusal", "gsm8k100", "bbq300") if any(r.get(k) is not None for r in rows)]
    picked = [(m, a, r) for m in models for a in attacks
              for d in result["defenses"]
              if (r := _default_row([x for x in rows if x["model"] == m and x["attack"] == a], d)) is not None]
    if metrics and picked:
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(picked) * len(metrics) / 2), 4))
        width = 0.8 / len(metrics)
        for k, metric in enumerate(metrics):
            ax.bar([i + k * width for i in range(len(picked))], [r.get(metric) or 0 for _, _, r in picked], width,
                   label=metric)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(picked))])
        ax.set_xticklabels([f"{a}\n{r['defense']}" + ("" if len(models) == 1 else f"\n{Path(m).name[:12]}")
                            for m, a, r in picked], fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("rate / accuracy")
        ax.legend(fontsize=7, ncol=len(metrics))
        save(fig, "bars.png")

    strengths = {r["attack_steps"] for r in rows if r.get("attack_steps") is not None}
    if len(strengths) > 1:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        names = sorted({r["attack"].partition("@")[0] for r in rows if r.get("attack_steps") is not None})
        for model in models:
            for name in names:
                for defense in result["defenses"]:
                    by_steps: list[tuple[Any, Any]] = []
                    for steps in sorted(strengths):
                        mine = [r for r in rows if r["model"] == model and r["attack"] == f"{name}@{steps}"]
                        r = _default_row(mine, defense)
                        if r is not None and _harm(r) is not None:
                            by_steps.append((steps, _harm(r)))
                    if by_steps:
                        label = defense + ("" if len(names) == 1 else f" ({name})")
                        ax.plot([p[0] for p in by_steps], [p[1] for p in by_steps], marker="o", label=label)
        ax.set_xlabel("attack optimizer steps")
        ax.set_ylabel("harmful rate")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=7)
        save(fig, "attack_strength.png")
    return written
