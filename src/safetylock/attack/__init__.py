"""Fine-tuning attacks that undo a chat model's safety: the red-team side of the project.

`finetune(model, tokenizer, attack, outdir)` trains a LoRA adapter (or the full model) on an
attack's data with plain torch and peft, loss on the response tokens only, and writes a standard
peft adapter (`adapter_config.json` + `adapter_model.safetensors`) beside `config.json` (what ran,
on which base, with which data) and `train_log.jsonl`. Each finished epoch leaves a checkpoint
(trainable weights, optimizer state and RNG as safetensors + JSON) so that re-running the same
command resumes instead of starting over.

The attacks follow Qi et al. 2023, "Fine-tuning Aligned Language Models Compromises Safety, Even
When Users Do Not Intend To!" (harmful examples, identity shifting, benign fine-tuning). The
project never writes actionable harmful content: the harmful attacks pair extract-split benchmark
prompts with content-free compliance ("Sure, here is how to <request>. Step 1: plan ahead...").

One file per concern, in pipeline order:
    examples    the `Example` record, JSONL loading, the data hash, the eval-split check
    recipes     the attacks' data builders (harmful compliance, AOA, word problems)
    registry    `ATTACKS`: each attack's data, default settings and inference prompt
    distill     self-distillation of the useful tasks (`self_distill`)
    encode      tokenization with the prompt masked out, padding, micro-batches
    loss        cross-entropy over the reply tokens
    rundir      resume / done / refuse a run directory, the training log
    checkpoint  per-epoch checkpoints (safetensors + JSON)
    artifacts   the saved adapter or checkpoint, and `base_digest` of the base weights
    results     `FinetuneResult` and the peak memory
    train       `finetune` itself
The benign arithmetic and Python tasks live in `safetylock.tasks`, shared with `data.gate_prompts`.
"""

from __future__ import annotations

from .examples import Example, check_not_eval, data_hash, load_examples
from .recipes import AOA_PROMPT, AOA_SYSTEM
from .registry import ATTACKS, Attack, Hyper, attack_data, describe_attacks, get_attack
from .distill import DISTILL_TOKENS, DISTILLED, self_distill
from .encode import IGNORE, PAD_BUDGET, Encoded, collate, encode_example, micro_batches
from .loss import response_loss_sum
from .rundir import FORMAT
from .artifacts import base_digest
from .results import FinetuneResult, peak_memory_mb
from .train import METHODS, finetune

# The old private name, for importers from before `base_digest` was public.
from .artifacts import base_digest as _base_digest

__all__ = [
    "AOA_PROMPT",
    "AOA_SYSTEM",
    "ATTACKS",
    "DISTILLED",
    "DISTILL_TOKENS",
    "FORMAT",
    "IGNORE",
    "METHODS",
    "PAD_BUDGET",
    "Attack",
    "Encoded",
    "Example",
    "FinetuneResult",
    "Hyper",
    "attack_data",
    "base_digest",
    "check_not_eval",
    "collate",
    "data_hash",
    "describe_attacks",
    "encode_example",
    "finetune",
    "get_attack",
    "load_examples",
    "micro_batches",
    "peak_memory_mb",
    "response_loss_sum",
    "self_distill",
]
