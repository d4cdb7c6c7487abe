"""Measure a model: refusal / harmful rates with a judge, utility (GSM8K, BBQ, KL to a reference), reports.

`evaluate` records each prompt's result into an OUTDIR as it goes, so a crashed run resumes where it stopped
and a run with a different configuration is refused (harness.py says how).

torch and the generation stack are imported inside functions so the CLI can reject bad input in
well under a second, before any heavy import.

One file per concern, in pipeline order:
    scoring     scoring one reply (last number, option letter), next-token KL
    harness     `evaluate` into OUTDIR (resumable, pinned config.json) and `summarise`
    run         `run_eval`, what `safetylock eval` runs: prompts, judge, deployment, KL to a reference
    reports     `report` / `write_report`: finished runs side by side
    throughput  batched vs one-at-a-time generation (`safetylock bench-generate`)
"""

from __future__ import annotations

from .scoring import (BBQ_SUFFIX, GSM8K_SUFFIX, choice_logprobs, choice_record, extract_number, kl_divergence,
                      math_record, numbers_equal)
from .harness import (CONFIG, DEFAULT_TOKENS, FORMAT_VERSION, RESULTS, SUMMARY, TIMING_KEYS, evaluate,
                      extract_overlap, summarise)
from .run import run_eval
from .reports import REPORT_COLUMNS, load_summary, report, write_report
from .throughput import benchmark_generation, write_generation_bench

__all__ = [
    "BBQ_SUFFIX",
    "CONFIG",
    "DEFAULT_TOKENS",
    "FORMAT_VERSION",
    "GSM8K_SUFFIX",
    "REPORT_COLUMNS",
    "RESULTS",
    "SUMMARY",
    "TIMING_KEYS",
    "benchmark_generation",
    "choice_logprobs",
    "choice_record",
    "evaluate",
    "extract_number",
    "extract_overlap",
    "kl_divergence",
    "load_summary",
    "math_record",
    "numbers_equal",
    "report",
    "run_eval",
    "summarise",
    "write_generation_bench",
    "write_report",
]
