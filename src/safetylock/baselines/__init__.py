"""Baseline defenses to compare SafetyLock with, each a real implementation behind one interface.

A `Defense` has a `name`, an optional `system` prompt the deployment uses, and `applied(model, alpha)`:
a context manager that yields the defended model for generation and leaves `model` computing exactly
what it did before once the block exits (hooks removed, baked biases restored, copies discarded).

| name              | what it does                                                                     | artifact              |
|-------------------|----------------------------------------------------------------------------------|-----------------------|
| none              | nothing (the compromised model as is)                                            | -                     |
| safetylock        | the lock's per-head shifts, baked into o_proj biases (or conditional hooks)      | lock .safetensors     |
| iti               | inference-time intervention (Li et al. 2023): per-head probes on the last reply   | lock .safetensors     |
|                   | token, top-K heads shifted by alpha * std * mass-mean direction, generated tokens |                       |
|                   | only                                                                             |                       |
| refusal-direction | activation addition (Arditi et al. 2024): mean(harmful) - mean(harmless) residual | .safetensors + JSON   |
|                   | stream at the post-instruction token, best layer by held-out separation, added    |                       |
|                   | to that layer's output at every position                                         |                       |
| self-reminder     | a safety system prompt (Xie et al. 2023), `SELF_REMINDER`                         | -                     |
| safety-sft        | LoRA fine-tuning of the compromised model on refusals of extract-split prompts    | peft adapter + JSON   |
| resta             | RESTA (Bhardwaj et al. 2024): alpha * (aligned - harmful fine-tune) added to the  | vector .safetensors   |
|                   | weights, optional DARE of the fine-tune's delta (`repair`)                        |                       |
| safe-lora         | Safe LoRA (Hsu et al. 2024): LoRA updates projected on aligned - harmful where    | vector .safetensors   |
|                   | their cosine to the projection is below alpha (`repair`)                          |                       |
| gate-refusal      | the conditional lock's gate alone: a flagged prompt gets a fixed refusal message  | lock .safetensors     |
| guard             | the base as a zero-shot prompt screen; flagged prompts get a fixed refusal        | guard .safetensors    |
|                   | (`guard`, `screen.forced_reply`)                                                  |                       |
| base-refusal      | the base's own first 12 reply tokens (the adapter off) refuse: a fixed refusal;    | -                     |
|                   | otherwise the fine-tune's reply (`base_refusal`; needs the fine-tune as adapter)  |                       |

Every artifact is safetensors plus JSON metadata naming the model it was fitted on (its fingerprint);
loading refuses a file of another format or version, applying refuses a model of another shape.

One file per concern:
    defense            the interface (`Defense`), the undefended model and the self-reminder prompt
    lock_defenses      the lock (`LockDefense`, baked or conditional) and its gate alone (`GateRefusal`)
    iti                inference-time intervention (`fit_iti`, `ITIDefense`)
    refusal_direction  the refusal direction (`fit_refusal_direction`, `RefusalDirection`, its defense)
    safety_sft         safety SFT (`train_safety_sft`, `SafetySFT`)
    registry           every defense by name (`DEFENSES`, `make_defense`)
RESTA, Safe LoRA (`repair`), the guard (`guard`) and the base-refusal screen (`base_refusal`) implement
`Defense` in their own modules.
"""

from __future__ import annotations

from ..lock import DEFAULT_ALPHA
from .defense import SELF_REMINDER, Defense, NoDefense, SelfReminder
from .lock_defenses import LockDefense
from .iti import ITIDefense, fit_iti
from .refusal_direction import RefusalDirection, RefusalDirectionDefense, fit_refusal_direction, residual_activations
from .safety_sft import SafetySFT, merged_copy, refusal_examples, train_safety_sft
from .registry import DEFENSES, make_defense

# Public names outside `__all__`, importable from here as they were before the split into files.
from .defense import timed_enter as timed_enter
from .lock_defenses import GateRefusal as GateRefusal
from .iti import ITI_ALPHA as ITI_ALPHA, ITI_HEADS as ITI_HEADS, ITI_POSITIONS as ITI_POSITIONS
from .refusal_direction import DIRECTION_FORMAT as DIRECTION_FORMAT, DIRECTION_VERSION as DIRECTION_VERSION
from .refusal_direction import layer_separation as layer_separation
from .safety_sft import SFT_MARKER as SFT_MARKER

__all__ = [
    "DEFAULT_ALPHA",
    "DEFENSES",
    "Defense",
    "ITIDefense",
    "LockDefense",
    "NoDefense",
    "RefusalDirection",
    "RefusalDirectionDefense",
    "SELF_REMINDER",
    "SafetySFT",
    "SelfReminder",
    "fit_iti",
    "fit_refusal_direction",
    "make_defense",
    "merged_copy",
    "refusal_examples",
    "residual_activations",
    "train_safety_sft",
]
