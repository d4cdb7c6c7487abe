"""What a run produced and what it cost: `FinetuneResult`, as written to and read back from result.json."""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class FinetuneResult:
    """What a run produced and what it cost."""

    adapter_dir: Path | None  # None for method 'full'
    merged_dir: Path | None
    seconds: float  # training wall time, summed over resumed sessions
    final_loss: float  # mean reply-token loss of the last optimizer step
    peak_mem_mb: float  # peak resident memory of the process (GPU: peak allocated)
    steps: int
    epochs: int
    examples: int
    tokens: int  # tokens processed (prompt + reply, no padding)
    resumed_from_epoch: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["adapter_dir"] = str(self.adapter_dir) if self.adapter_dir else None
        out["merged_dir"] = str(self.merged_dir) if self.merged_dir else None
        out.pop("config")
        return out


def peak_memory_mb() -> float:
    """Return the process's peak memory in MB: GPU peak allocated on CUDA, else peak RSS."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _read_result(outdir: Path, config: dict[str, Any]) -> FinetuneResult:
    raw = json.loads((outdir / "result.json").read_text(encoding="utf-8"))
    merged = outdir / "merged"
    return FinetuneResult(
        Path(raw["adapter_dir"]) if raw.get("adapter_dir") else None,
        merged if (merged / "config.json").is_file() else None,
        raw["seconds"], raw["final_loss"], raw["peak_mem_mb"], raw["steps"], raw["epochs"], raw["examples"],
        raw["tokens"], raw.get("resumed_from_epoch", 0), raw.get("epoch_losses", []), config,
    )
