"""Every defense by name: `make_defense` builds one from its artifact."""

from __future__ import annotations

from pathlib import Path

from ..errors import SafetylockError
from ..lock import Lock
from .defense import SELF_REMINDER, Defense, NoDefense, SelfReminder
from .iti import ITIDefense
from .lock_defenses import GateRefusal, LockDefense
from .refusal_direction import RefusalDirection, RefusalDirectionDefense
from .safety_sft import SafetySFT

DEFENSES = ("none", "safetylock", "safetylock-conditional", "iti", "refusal-direction", "self-reminder", "safety-sft",
            "resta", "safe-lora", "guard", "gate-refusal", "base-refusal",
            "base-refusal-restore")
# Screens whose strength is a logit threshold of any sign (lower refuses more); every other strength is > 0.
THRESHOLDED = ("guard", "gate-refusal")


def make_defense(name: str, artifact: str | Path | None = None, *, conditional: bool = False,
                 system: str | None = None, force: bool = False) -> Defense:
    """Return the defense `name` built from its artifact (lock file, direction file or adapter directory).

    `force` goes to the defenses that check their artifact fits the model (the locks, ITI, the gate, safety SFT).
    """
    if name not in DEFENSES:
        raise SafetylockError(f"unknown defense '{name}'; known: {', '.join(DEFENSES)}")
    needs = {"safetylock": "a lock file", "safetylock-conditional": "a lock file with a harmfulness probe", "iti": "an ITI lock file (fit_iti)",
             "refusal-direction": "a refusal-direction file", "safety-sft": "a safety-SFT adapter directory",
             "resta": "a RESTA safety-vector file (repair.fit_resta)",
             "safe-lora": "a Safe LoRA safety-vector file (repair.fit_safe_lora)", "guard": "a guard file (guard.fit_guard)",
             "gate-refusal": "a lock file with a harmfulness gate"}
    if name in needs and artifact is None:
        raise SafetylockError(f"defense '{name}' needs {needs[name]}; pass --defense-file PATH")
    if name == "none":
        return NoDefense()
    if name == "self-reminder":
        return SelfReminder(system or SELF_REMINDER)
    if name in ("base-refusal", "base-refusal-restore"):  # no artifact: the base's first reply tokens decide
        from ..base_refusal import BaseRefusal

        return BaseRefusal(restore=name == "base-refusal-restore")
    assert artifact is not None
    if name == "safetylock":
        return LockDefense(Lock.load(artifact), conditional=conditional, force=force)
    if name == "safetylock-conditional":
        return LockDefense(Lock.load(artifact), conditional=True, force=force)
    if name == "iti":
        return ITIDefense(Lock.load(artifact), force=force)
    if name == "refusal-direction":
        return RefusalDirectionDefense(RefusalDirection.load(artifact))
    if name in ("resta", "safe-lora"):
        from ..repair import RestaDefense, SafeLoraDefense, SafetyVector

        vector = SafetyVector.load(artifact)
        return RestaDefense(vector) if name == "resta" else SafeLoraDefense(vector)
    if name == "gate-refusal":
        return GateRefusal(Lock.load(artifact), force=force)
    if name == "guard":
        from ..guard import GuardDefense

        return GuardDefense.load(artifact)
    return SafetySFT(artifact, force=force)
