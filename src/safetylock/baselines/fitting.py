"""Every baseline's artifact fitted the one way the bench and `safetylock fit-defense` both use.

What each needs: ITI and the refusal direction read the aligned base on built-in extract-split data; the guard
only names the base and its yes/no answer tokens; RESTA and Safe LoRA need the base's own harmful fine-tune (a
LoRA adapter, e.g. `safetylock finetune --attack harmful-100`), whose update they reverse or project out. The locks
(safetylock, safetylock-conditional, gate-refusal) come from `extract`, not from here.
"""

from __future__ import annotations

from typing import Any

from ..errors import SafetylockError

FITTABLE = ("iti", "refusal-direction", "resta", "safe-lora", "guard")
NEEDS_UNALIGNED = ("resta", "safe-lora")


def check_fittable(name: str, has_unaligned: bool) -> None:
    """Raise a one-line SafetylockError unless `name` can be fitted with (or without) a harmful fine-tune."""
    if name not in FITTABLE:
        hint = "; the locks come from `safetylock extract`" if name.startswith(("safetylock", "gate")) else ""
        raise SafetylockError(f"cannot fit '{name}' here; fittable: {', '.join(FITTABLE)}{hint}")
    if name in NEEDS_UNALIGNED and not has_unaligned:
        raise SafetylockError(f"{name} needs the base's harmful fine-tune: pass --unaligned ADAPTER "
                              "(e.g. from `safetylock finetune --attack harmful-100`)")
    if name not in NEEDS_UNALIGNED and has_unaligned:
        raise SafetylockError(f"--unaligned is for resta and safe-lora; {name} is fitted on the base alone")


def fit_defense_artifact(name: str, base: Any, tokenizer: Any, *, spec: str, unaligned: Any = None, pairs: int = 64,
                         fit_prompts: int = 64, iti_heads: int | None = None, seed: int = 0,
                         dtype: str = "auto") -> Any:
    """Return the artifact of baseline `name` (it has `.save(path)`), fitted on the aligned `base`.

    `unaligned` is the base with its harmful fine-tune's LoRA adapter attached (RESTA and Safe LoRA only); `spec`
    names the base in the artifact, so applying it to a model of another shape is refused.
    """
    check_fittable(name, unaligned is not None)
    if name == "iti":
        from ..data import contrast_pairs
        from .iti import ITI_HEADS, fit_iti

        return fit_iti(base, tokenizer, contrast_pairs(pairs, seed=seed), heads=iti_heads or ITI_HEADS, seed=seed,
                       name=spec)
    if name == "refusal-direction":
        from ..data import harmful_prompts, harmless_prompts
        from .refusal_direction import fit_refusal_direction

        harmful = [p.text for p in harmful_prompts("extract")][:fit_prompts]
        harmless = [p.text for p in harmless_prompts("extract")][:fit_prompts]
        return fit_refusal_direction(base, tokenizer, harmful, harmless, seed=seed, name=spec)
    if name == "guard":
        from ..guard import fit_guard

        return fit_guard(base, tokenizer, spec=spec, dtype=dtype)
    from ..repair import fit_resta, fit_safe_lora

    return (fit_resta if name == "resta" else fit_safe_lora)(unaligned, name=spec)
