"""Options the commands share: their types, their validators, and what the lock and defense flags resolve to."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ..errors import SafetylockError, check_alpha

if TYPE_CHECKING:
    from ..deployment import Deployment


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Alias, local HF directory, .gguf file or hub id.")]
AdapterOpt = Annotated[Optional[Path], typer.Option("--adapter", help="LoRA adapter directory (peft) on top of the model.")]
LockOpt = Annotated[Optional[Path], typer.Option("--lock", help="Lock file (.safetensors) to apply.")]


def valid_alpha(value: float | None) -> float | None:
    """Typer callback: refuse a non-finite, non-positive or absurd --alpha before any model loads."""
    if value is None:
        return None
    try:
        return check_alpha(value)
    except SafetylockError as exc:
        raise typer.BadParameter(str(exc).removeprefix("--alpha ")) from None


AlphaOpt = Annotated[Optional[float], typer.Option("--alpha", callback=valid_alpha,
                                                   help="Lock strength (finite, > 0); default: the lock's calibrated alpha.")]


def valid_strength(value: float | None) -> float | None:
    """Typer callback: refuse a non-finite --alpha; whether it may be <= 0 depends on --defense (`deployment_for`)."""
    from ..errors import check_finite

    if value is None:
        return None
    try:
        return check_finite(value, "--alpha")
    except SafetylockError as exc:
        raise typer.BadParameter(str(exc).removeprefix("--alpha ")) from None


StrengthOpt = Annotated[Optional[float], typer.Option("--alpha", callback=valid_strength, help=(
    "Lock or defense strength (finite, > 0); for --defense guard or gate-refusal a logit threshold of any sign "
    "(lower refuses more). Default: the lock's calibrated alpha, the defense's own default."))]


def valid_positive(value: float | None, flag: str) -> float | None:
    """Typer callback: refuse a number that is not finite and > 0."""
    import math

    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a finite number > 0, got {value!r}", param_hint=flag)
    return value


TokensOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Reply tokens per prompt.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1)]
SystemOpt = Annotated[Optional[str], typer.Option("--system", help="System prompt.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (bf16), bf16, fp16 or fp32.")]
DefenseOpt = Annotated[Optional[str], typer.Option("--defense", help="Baseline defense: none, safetylock, iti, "
                                                   "refusal-direction, self-reminder, safety-sft, resta, safe-lora, "
                                                   "guard, gate-refusal, base-refusal, base-refusal-restore "
                                                   "(docs/baselines.md).")]
DefenseFileOpt = Annotated[Optional[Path], typer.Option("--defense-file", help="The defense's artifact: lock file "
                                                        "(safetylock, gate-refusal), safety-SFT adapter dir, or a file "
                                                        "from `safetylock fit-defense`.")]
ConditionalOpt = Annotated[Optional[bool], typer.Option(
    "--conditional/--baked", help="How --lock applies: at run time, only to prompts its harmfulness probe flags, or "
    "baked into the o_proj biases for every prompt (the paper's lock). Neither: on a LoRA --adapter the base-refusal "
    "screen (the base, adapter off, starts each reply; where it refuses the user gets a fixed refusal), else "
    "conditional for a lock with a probe, else baked.")]


BaseModelOpt = Annotated[Optional[str], typer.Option(
    "--base-model", help="For a merged or fully fine-tuned -m with --lock: the aligned base (alias, directory or "
    ".gguf), loaded as a second model, that the base-refusal screen asks; the screen is then the default.")]


def flag_mode(conditional: bool | None) -> str | None:
    """Return the lock mode --conditional/--baked ask for (None: neither, the lock's own default)."""
    return None if conditional is None else ("conditional" if conditional else "baked")


def lock_mode(conditional: bool | None, lock: Path | None, adapter: bool = False) -> str | None:
    """Return how --lock applies (None without a lock) for --conditional/--baked or neither.

    Neither flag: `deployment.resolve_mode`'s default (base-refusal on an adapter, else conditional with a probe,
    else baked).
    """
    if lock is None:
        if conditional is not None:
            flag = "--conditional" if conditional else "--baked"
            raise SafetylockError(f"{flag} needs --lock LOCK (it says how the lock applies)")
        return None
    from ..deployment import resolve_mode
    from ..lock import Lock

    return resolve_mode(Lock.load(lock), flag_mode(conditional), base_at_hand=adapter)


def deployment_for(model: str, adapter: Path | None, lock: Path | None, alpha: float | None, dtype: str,
                   conditional: bool | None, defense: str | None, defense_file: Path | None,
                   base_model: str | None = None) -> Deployment:
    """Return the (unopened) Deployment that -m/--adapter and --lock (--conditional/--baked) or --defense name."""
    from ..baselines.registry import THRESHOLDED
    from ..deployment import Deployment

    if alpha is not None and defense not in THRESHOLDED:
        check_alpha(alpha)
    return Deployment(model, adapter=adapter, lock=lock, mode=flag_mode(conditional), defense=defense,
                      defense_file=defense_file, alpha=alpha, dtype=dtype, base_model=base_model)


def mode_line(deployment: Deployment) -> str | None:
    """Return the line that says how --lock applies when the runtime default picked the screen, else None."""
    if deployment.mode != "base-refusal":
        return None
    asked = "the base beside it (--base-model)" if deployment.base_model is not None else "the base (adapter off)"
    return (f"--lock on this fine-tune: the base-refusal screen ({asked} starts each reply; where it refuses, a fixed "
            "refusal); --conditional or --baked applies the lock's shift instead")


def split_list(values: list[str] | None, default: tuple[str, ...]) -> list[str]:
    """Return the items of repeatable, comma-separated option values (`default` when none are given)."""
    items = [v.strip() for raw in (values or []) for v in raw.split(",") if v.strip()]
    return items or list(default)
