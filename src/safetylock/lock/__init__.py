"""SafetyLock: per-head safety directions from the aligned base, applied to its fine-tuned descendants.

Extraction teacher-forces (prompt, safe reply, unsafe reply) triples through the base model, reads every
attention head's output (the head's slice of `o_proj`'s input), fits one logistic probe per head on a split
by pair, keeps the K heads whose probes generalise best, and stores for each the unit mass-mean direction
(mean safe - mean unsafe) and the standard deviation of projections on it.

Applying a lock with strength alpha adds `alpha * std * direction` to each chosen head's output:
at run time through forward pre-hooks on `o_proj` (`Lock.applied`), or permanently as `o_proj.bias += W_o @ delta`
(`Lock.bake`), which is the same function of the input because o_proj is linear. `export_locked` writes a baked
checkpoint that plain `transformers` loads with the bias intact.

Beyond the paper: an optional harmfulness gate (`Gate`, fitted by `fit_condition` or `gates`) on the prompt's
post-instruction template tokens lets `applied(..., conditional=True)` shift only the sequences it flags.

One file per concern, in pipeline order:
    positions   which tokens a spec like "response:1-8" names
    capture     reading head outputs at those tokens (`head_activations`)
    method      the probe maths: split, fit per head, rank (change this to find directions another way)
    extraction  `extract`: pairs -> `Lock`
    artifact    the `Lock` itself, its file format and its fit to a model
    apply       run-time hooks and bake, each returning the record that takes it off again
    gate_artifact  the harmfulness gate as its own object and file (`Gate`), swappable on a lock (`with_gate`)
    gate        fitting the built-in gate and deciding with it at run time, inside the prompt's pass
    transfer    do the directions still separate on the fine-tuned model (`check_transfer`)
    export      a baked checkpoint plain transformers loads (`export_locked`)
    inspect     heat maps and a text summary
"""

from __future__ import annotations

from .artifact import DEFAULT_ALPHA, DEFAULT_HEADS, DEFAULT_POSITIONS, FORMAT, FORMAT_VERSION, SHAPE_KEYS, SOFT_KEYS
from .artifact import Item, Lock, Pair
from .positions import PositionTerm, encode_item, parse_positions, select_positions, template_token_count
from .capture import Activations, head_activations
from .method import HeadFit, fit_heads, rank_heads, split_pairs
from .extraction import extract
from .apply import BakedBias, BakeRecord, HookRecord, unbake
from .gate_artifact import GATE_READS, Gate
from .gate import fit_condition, gate_reading, gate_reads, with_gate_file
from .transfer import TransferReport, check_transfer, direction_accuracy
from .export import EXPORT_KIND, EXPORT_LAYOUT, export_locked
from .inspect import describe, heatmap_text, plot_heatmap

# Private helpers, importable from here as they were before the split into files.
from .artifact import _hash_rows as _hash_rows, _library_version as _library_version
from .positions import _MARK as _MARK, _TERM as _TERM, _range as _range
from .capture import _run_quietly as _run_quietly, _StopForward as _StopForward
from .apply import _HookState as _HookState, _project as _project, _shift_hook as _shift_hook
from .gate import _condition_features as _condition_features, _prompt_split as _prompt_split
from .export import _LLAMA_KEYS as _LLAMA_KEYS, _export_refusal as _export_refusal, _export_state as _export_state
from .export import _llama_config as _llama_config, _verify_export as _verify_export
from .inspect import _SHADES as _SHADES

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_HEADS",
    "DEFAULT_POSITIONS",
    "EXPORT_KIND",
    "EXPORT_LAYOUT",
    "FORMAT",
    "FORMAT_VERSION",
    "GATE_READS",
    "Gate",
    "SHAPE_KEYS",
    "SOFT_KEYS",
    "Activations",
    "BakeRecord",
    "BakedBias",
    "HeadFit",
    "HookRecord",
    "Item",
    "Lock",
    "Pair",
    "PositionTerm",
    "TransferReport",
    "check_transfer",
    "describe",
    "direction_accuracy",
    "encode_item",
    "export_locked",
    "extract",
    "fit_condition",
    "gate_reading",
    "gate_reads",
    "fit_heads",
    "head_activations",
    "heatmap_text",
    "parse_positions",
    "plot_heatmap",
    "rank_heads",
    "select_positions",
    "split_pairs",
    "template_token_count",
    "unbake",
    "with_gate_file",
]
