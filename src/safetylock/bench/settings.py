"""What a bench run is made of: the benchmarks, the swept strengths, `BenchSettings` and the attack names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..baselines import ITI_ALPHA
from ..baselines.registry import THRESHOLDED as THRESHOLDED  # re-exported: the bench sweeps these
from ..errors import SafetylockError, check_alpha, check_finite
from ..evaluate import DEFAULT_TOKENS
from ..judges import DEFAULT_JUDGE
from ..lock import DEFAULT_ALPHA
from ..repair import RESTA_COEF, SAFE_LORA_THRESHOLD, UNALIGNED_ATTACK

BENCHMARKS = ("harmbench", "advbench", "overrefusal", "gsm8k100", "bbq300")
DEFAULT_ALPHAS: dict[str, tuple[float, ...]] = {"safetylock": (DEFAULT_ALPHA,), "safetylock-conditional": (DEFAULT_ALPHA,), "iti": (ITI_ALPHA,),
                                                "refusal-direction": (1.0,), "resta": (RESTA_COEF,),
                                                "safe-lora": (SAFE_LORA_THRESHOLD,)}
# The screens of THRESHOLDED (a logit threshold, any sign) are swept only when asked (--alphas guard=-2,0,2); by
# default each keeps the threshold its artifact records.
SWEPT = (*DEFAULT_ALPHAS, *THRESHOLDED)
FITTED = ("safetylock", "safetylock-conditional", "iti", "refusal-direction",  # artifacts fitted on the base
          "resta", "safe-lora", "guard", "gate-refusal")  # gate-refusal: the conditional lock's gate; resta / safe-lora: from the base's harmful fine-tune (settings.unaligned)


@dataclass(frozen=True)
class BenchSettings:
    """What every cell shares: sample sizes, judge, decoding and the artifacts' fitting settings."""

    limit: int = 8  # prompts per benchmark (the eval split's first N)
    judge: str = DEFAULT_JUDGE
    benchmarks: tuple[str, ...] = BENCHMARKS
    max_new_tokens: int = 48  # harmful / benign replies
    math_tokens: int = DEFAULT_TOKENS["math"]  # gsm8k replies (worked answers)
    batch_size: int = 8
    kl_prompts: int = 8  # overrefusal eval prompts for the KL to the base
    pairs: int = 64  # contrast pairs for the lock and ITI
    lock_heads: int = 100_000  # every head (bench/LOCK_RESEARCH.md)
    lock_positions: str = "response:1-8"
    iti_heads: int = 48
    fit_prompts: int = 64  # harmful and harmless extract prompts for the refusal direction; harmful ones for SFT
    sft_steps: int = 10
    sft_batch: int = 5
    sft_lr: float = 2e-4
    dtype: str = "auto"
    seed: int = 0
    unaligned: str = UNALIGNED_ATTACK  # the harmful fine-tune of the base whose update resta and safe-lora reverse

    def check(self) -> None:
        for key in ("limit", "max_new_tokens", "math_tokens", "batch_size", "kl_prompts", "pairs", "lock_heads",
                    "iti_heads", "fit_prompts", "sft_steps", "sft_batch"):
            if int(getattr(self, key)) < 1:
                raise SafetylockError(f"{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        if unknown:
            raise SafetylockError(f"unknown benchmark '{unknown[0]}' for the bench; use some of {', '.join(BENCHMARKS)}")
        if parse_attacks([self.unaligned])[0].name == "none":
            raise SafetylockError("the bench's unaligned model must be a harmful fine-tune, not 'none'")


@dataclass(frozen=True)
class AttackSpec:
    """An attack name with an optional cap on its optimizer steps ("harmful-10@5")."""

    name: str
    steps: int | None = None

    @property
    def label(self) -> str:
        return self.name if self.steps is None else f"{self.name}@{self.steps}"


def parse_attacks(attacks: Sequence[str], attack_steps: Sequence[int] | None = None) -> list[AttackSpec]:
    """Return attack specs from names like "harmful-10" or "harmful-10@5"; `attack_steps` expands bare names."""
    from ..attack import get_attack

    out: list[AttackSpec] = []
    for raw in attacks:
        name, _, steps = raw.strip().partition("@")
        if name != "none":
            get_attack(name)
        if steps:
            if name == "none" or not steps.isdigit() or int(steps) < 1:
                raise SafetylockError(f"bad attack '{raw}'; write NAME or NAME@STEPS with STEPS >= 1")
            out.append(AttackSpec(name, int(steps)))
        elif attack_steps and name != "none":
            out += [AttackSpec(name, int(s)) for s in attack_steps]
        else:
            out.append(AttackSpec(name))
    if not out:
        raise SafetylockError("the bench needs at least one attack (or 'none')")
    bad = [s for s in (attack_steps or []) if int(s) < 1]
    if bad:
        raise SafetylockError(f"attack steps must be at least 1, got {bad[0]}")
    return list(dict.fromkeys(out))


def parse_alphas(items: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """Return {defense: strengths} from "DEFENSE=A,B,C" items."""
    out: dict[str, tuple[float, ...]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or name not in SWEPT:
            raise SafetylockError(f"bad --alphas '{item}'; write DEFENSE=A,B,... with DEFENSE one of {', '.join(SWEPT)}")
        check = check_finite if name in THRESHOLDED else check_alpha
        out[name] = tuple(check(v.strip(), f"every strength of --alphas '{item}'") for v in values.split(",") if v.strip())
        if not out[name]:
            raise SafetylockError(f"bad --alphas '{item}': give at least one number")
    return out
