"""The comparison grid: models x attacks x defenses (x strengths), cached by content so reruns compute only what changed.

For each base model, every attack fine-tunes a LoRA adapter on it ("none" keeps the base; "NAME@STEPS" caps the
attack's optimizer steps, an attack-strength axis). Each defense's artifact is fitted once: the lock, the ITI
heads and the refusal direction on the aligned base; the safety-SFT adapter on each compromised model; RESTA's and
Safe LoRA's safety vector from the base's own harmful fine-tune (`settings.unaligned`, harmful-100); the guard's
file names the base as the guard (Safe LoRA, which projects an adapter, skips the attack "none"). Each
cell (model, attack, defense, alpha) then measures, on the eval splits: harmful rate on harmbench and advbench,
over-refusal rate on overrefusal, accuracy on gsm8k100 and bbq300, the KL divergence of the first reply token's
distribution from the base model's (benign prompts), the time to apply the defense and generation tokens/s.

Every intermediate artifact lives under the cache directory at a path named by the sha256 of its inputs (model
identity, attack, settings, data sizes, library version), so a rerun loads what exists and computes only what is
missing; `fresh=True` recomputes everything. Outputs: `results.json`, `RESULTS.md` and PNG plots (harmful rate vs
over-refusal as the strength sweeps, one curve per defense; a bar chart of the table; harmful rate vs attack steps).

One file per concern, in pipeline order:
    settings    the benchmarks, the swept strengths, `BenchSettings`, attack names ("NAME@STEPS") and --alphas
    cache       content keys of attacked models, artifacts and cells; the cache's layout (`cell_records`)
    session     one base model per spec, loaded on first use, and the first reply token's KL to the base
    artifacts   the attack's adapter and each defense's artifact, fitted once, and the defense built from it
    grid        `run_bench`: every cell from the cache or computed, then results.json
    report      RESULTS.md and the plots
"""

from __future__ import annotations

from .settings import BENCHMARKS, DEFAULT_ALPHAS, FITTED, SWEPT, THRESHOLDED, AttackSpec, BenchSettings, parse_alphas, parse_attacks
from .cache import FORMAT_VERSION, cell_eval_dir, cell_records, model_identity
from .session import Loader, first_token_kl, first_token_logprobs
from .artifacts import deployment_system
from .grid import run_bench
from .report import COLUMNS, results_markdown, write_plots

__all__ = [
    "BENCHMARKS",
    "COLUMNS",
    "DEFAULT_ALPHAS",
    "FITTED",
    "FORMAT_VERSION",
    "SWEPT",
    "THRESHOLDED",
    "AttackSpec",
    "BenchSettings",
    "Loader",
    "cell_eval_dir",
    "cell_records",
    "deployment_system",
    "first_token_kl",
    "first_token_logprobs",
    "model_identity",
    "parse_alphas",
    "parse_attacks",
    "results_markdown",
    "run_bench",
    "write_plots",
]
