"""Content keys and the cache's layout: what names each attacked model, artifact and cell, and one run's view of it.

Every intermediate artifact lives under the cache directory at a path named by the sha256 of its inputs (model
identity, attack, settings, data sizes, library version), so a rerun loads what exists and computes only what is
missing.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..evaluate import RESULTS
from ..files import sha256_text
from ..repair import RESTA_COEF, SAFE_LORA_THRESHOLD
from .settings import AttackSpec, BenchSettings, parse_attacks

FORMAT_VERSION = 2  # 2: cells run with the attack's system prompt (AOA)


def model_identity(spec: str) -> str:
    """Return a cheap content identity of a model spec: config + weight file names and sizes, or the spec itself."""
    path = Path(spec).expanduser()
    if path.is_dir():
        parts = [f.read_text(encoding="utf-8") for f in sorted(path.glob("*.json")) if f.name in ("config.json",)]
        parts += [f"{f.name}:{f.stat().st_size}" for f in sorted(path.iterdir())
                  if f.suffix in (".safetensors", ".bin", ".gguf")]
        return sha256_text(str(path.resolve()), *parts)
    if path.is_file():
        return sha256_text(str(path.resolve()), str(path.stat().st_size))
    return sha256_text(spec)


def cache_key(*parts: Any) -> str:
    """Return the cache key of `parts`: their sha256 with the library and bench format versions, 24 hex digits."""
    from .. import __version__

    return sha256_text(__version__, str(FORMAT_VERSION), *(json.dumps(p, sort_keys=True, default=str) for p in parts))[:24]


@dataclass
class RunContext:
    """One run's view of the cache: its settings, where each artifact lives, what must be and what was computed."""

    settings: BenchSettings
    cache: Path
    fresh: bool
    computed: list[str] = field(default_factory=list)
    done_this_run: set[str] = field(default_factory=set)
    data_hashes: dict[tuple[str, int], str] = field(default_factory=dict)  # (attack, seed): its data's hash

    def path(self, kind: str, key: str, suffix: str = "") -> Path:
        return self.cache / kind / f"{key}{suffix}"

    def stale(self, marker: Path) -> bool:
        """Return whether the artifact whose completion `marker` records must be computed."""
        if str(marker) in self.done_this_run:
            return False
        return self.fresh or not marker.exists()

    def record(self, what: str, marker: Path) -> None:
        self.computed.append(what)
        self.done_this_run.add(str(marker))


def attack_key(ctx: RunContext, mid: str, attack: AttackSpec) -> str:
    """Return the key of an attacked model: base identity, attack, strength, seed, dtype, its data and defaults."""
    s = ctx.settings
    if attack.name == "none":
        return cache_key("attack", mid, "none", s.seed, s.dtype)
    from ..attack import attack_data, data_hash, get_attack

    spec = get_attack(attack.name)
    # Building an attack's data reads benchmark files: once per run and attack, not once per grid cell.
    if (attack.name, s.seed) not in ctx.data_hashes:
        ctx.data_hashes[attack.name, s.seed] = data_hash(attack_data(attack.name, s.seed))
    return cache_key("attack", mid, attack.name, attack.steps, s.seed, s.dtype, asdict(spec.defaults), spec.system,
                     ctx.data_hashes[attack.name, s.seed])


def artifact_key(ctx: RunContext, mid: str, defense: str) -> str:
    s = ctx.settings
    if defense == "safetylock":
        inputs: tuple[Any, ...] = (s.pairs, s.lock_heads, s.lock_positions, s.seed)
    elif defense in ("safetylock-conditional", "gate-refusal"):
        inputs = (s.pairs, s.lock_heads, s.lock_positions, s.fit_prompts, s.seed)
    elif defense == "iti":
        inputs = (s.pairs, s.iti_heads, s.seed)
    elif defense in ("resta", "safe-lora"):
        inputs = (attack_key(ctx, mid, parse_attacks([s.unaligned])[0]), RESTA_COEF, SAFE_LORA_THRESHOLD)
    elif defense == "guard":
        from ..guard import GUARD_QUESTION
        from ..screen import REFUSAL_MESSAGE

        inputs = (GUARD_QUESTION, REFUSAL_MESSAGE)
    else:
        inputs = (s.fit_prompts, s.seed)
    return cache_key(defense, mid, s.dtype, *inputs)


def cell_eval_dir(cache_dir: str | Path, key: str) -> Path:
    """Return the directory of one cell's evaluation runs under the cache: one `evaluate` OUTDIR per benchmark."""
    return Path(cache_dir) / "evals" / key


def cell_records(result: dict[str, Any], row: dict[str, Any], benchmark: str) -> list[dict[str, Any]] | None:
    """Return the per-prompt records (prompt, response, judgment, ...) one cell of `result` cached for `benchmark`.

    `result` is a grid's results.json, `row` one of its rows; None when the cache lacks that run. A torn last
    line (a crash mid-write, which the next run regenerates) is skipped.
    """
    path = cell_eval_dir(result["cache_dir"], row["key"]) / benchmark / RESULTS
    if not path.is_file():
        return None
    records: list[Any] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return [r for r in records if isinstance(r, dict)]
