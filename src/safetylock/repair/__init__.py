"""Weight-space repairs: RESTA's safety vector (Bhardwaj et al. 2024) and Safe LoRA's projection (Hsu et al. 2024).

Both start from one artifact, the safety vector V = theta_aligned - theta_unaligned, where the unaligned
model is the aligned base fine-tuned on harmful data (the harness's `harmful-100` attack). For a LoRA fine-tune
V is minus the adapter's merged update, kept as its factors (`-scale * B @ A`, adapter-sized) on the modules
the adapter touched; for a full fine-tune it is the dense difference of every Linear that changed.

- RESTA adds `coef * V` to the customer's fine-tuned weights (coef is the strength, default 1), optionally
  after DARE (drop a fraction p of the fine-tune's own delta at random, seeded, rescale the rest by 1/(1-p)).
  A peft LoRA model is handled by folding its delta into the base weights (fp32 sum, one rounding) with its
  LoRA layers switched off, so coef 1 on the harmful fine-tune itself gives back the aligned weights exactly.
- Safe LoRA projects each LoRA module's update dW = B @ A onto V's column space, C dW with
  C = V V^T / ||V||_F (the paper's projection; `projection="exact"` uses the orthogonal projector U U^T of
  V's column space instead), but only in modules where cos(dW, C dW) (Frobenius) is below the threshold tau,
  the strength (default 0.5, the threshold option's default in the authors' code). It needs no data and no
  training: C dW = (C B) @ A, so only B changes, and the cosine comes from r x r products of the factors.

Each application changes weights in place and restores them bit for bit on exit (the originals are copied).

Where each part lives:

- `weights`: a model's Linear projections and LoRA factors, and restoring weights changed in place.
- `vector`: the safety vector `SafetyVector` (its parts, its file, its fit from two models).
- `resta`: RESTA, with DARE, and its defense `RestaDefense`.
- `safe_lora`: Safe LoRA's projection and its defense `SafeLoraDefense`.

Every name is importable from `safetylock.repair` itself.
"""

from __future__ import annotations

from .resta import RESTA_COEF, RestaDefense, dare, fit_resta, resta_applied
from .safe_lora import (
    PROJECTIONS,
    SAFE_LORA_THRESHOLD,
    Projection,
    SafeLoraDefense,
    check_threshold,
    fit_safe_lora,
    project_lora,
    projector,
    safe_lora_applied,
)
from .vector import VECTOR_FORMAT as VECTOR_FORMAT
from .vector import VECTOR_VERSION as VECTOR_VERSION
from .vector import UNALIGNED_ATTACK, SafetyVector, VectorPart, fit_safety_vector, safety_vector_parts
from .weights import adapter_deltas, has_lora, linear_modules, lora_delta
from .weights import base_weight as base_weight
from .weights import lora_factors as lora_factors

__all__ = [
    "PROJECTIONS",
    "RESTA_COEF",
    "SAFE_LORA_THRESHOLD",
    "UNALIGNED_ATTACK",
    "Projection",
    "RestaDefense",
    "SafeLoraDefense",
    "SafetyVector",
    "VectorPart",
    "adapter_deltas",
    "check_threshold",
    "dare",
    "fit_resta",
    "fit_safe_lora",
    "fit_safety_vector",
    "has_lora",
    "linear_modules",
    "lora_delta",
    "project_lora",
    "projector",
    "resta_applied",
    "safe_lora_applied",
    "safety_vector_parts",
]
