"""Commands on locks: extract one from an aligned base, inspect it, bake it (apply), check its transfer, calibrate it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import SafetylockError, check_alpha
from ..files import check_output_dir, check_writable_dir, check_writable_file
from ..data import contrast_pairs, read_pairs
from .options import AdapterOpt, AlphaOpt, DtypeOpt, ModelOpt, TokensOpt, flag_mode, valid_alpha
from .output import console, err


def extract_command(
    model: ModelOpt = "qwen2.5-coder-1.5b-instruct",
    out: Annotated[Path, typer.Option("--out", "-o", help="Lock file to write (.safetensors).")] = Path("lock.safetensors"),
    pairs: Annotated[Optional[Path], typer.Option("--pairs", help="JSONL with prompt, safe, unsafe; default: built-in pairs.")] = None,
    n_pairs: Annotated[int, typer.Option("--n-pairs", min=2, help="How many built-in pairs (without --pairs).")] = 64,
    heads: Annotated[int, typer.Option("--heads", min=0, help="Heads to keep (top-K by probe accuracy; 0 = every head).")] = 0,
    positions: Annotated[str, typer.Option("--positions", help="Token positions, e.g. response:1-8, response:-5.")] = "response:1-8",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    alpha: Annotated[float, typer.Option("--alpha", callback=valid_alpha, help="Default strength stored in the lock.")] = 1.5,
    conditional: Annotated[bool, typer.Option("--conditional/--no-conditional", help="Also fit a harmfulness gate "
                                              "so the lock can apply conditionally at run time.")] = True,
    gate: Annotated[str, typer.Option("--gate", help="Gate design: builtin (64 built-in prompts, 8 heads), or "
                                      "[refusal:]heads:K / [refusal:]all [@benign:Q] fitted on every out-of-distribution "
                                      "source's extract split (refusal: lock where this base refuses).")] = "builtin",
    gate_reads: Annotated[str, typer.Option("--gate-reads", help="What the gate reads at run time: model (the deployed "
                                            "model) or base (a LoRA fine-tune's adapter switched off for the decision).")] = "model",
    gate_limit: Annotated[Optional[int], typer.Option("--gate-limit", min=2, help="Extract prompts per source for a "
                                                      "fitted gate (default: all).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    dtype: DtypeOpt = "auto",
) -> None:
    """Extract a lock from the aligned base model with contrast pairs; write it as safetensors."""
    import time

    from ..gates import gate_lock, parse_design
    from ..lock import describe, extract
    from ..lock import GATE_READS
    from ..models import load_model

    if gate != "builtin":
        parse_design(gate)
    if gate_reads not in GATE_READS:
        raise SafetylockError(f"bad --gate-reads '{gate_reads}'; use {' or '.join(GATE_READS)}")
    check_writable_file(out)
    triples = read_pairs(pairs) if pairs is not None else list(contrast_pairs(n_pairs, seed=seed))
    m, tok = load_model(model, dtype=dtype)
    start = time.perf_counter()
    lk = extract(m, tok, triples, heads=heads or 100_000, positions=positions, seed=seed, alpha=alpha, batch_size=batch_size,
                 progress=True, name=model)
    if conditional:
        lk = gate_lock(lk, m, tok, gate, reads=gate_reads, seed=seed, batch_size=batch_size, limit=gate_limit,
                       progress=True)
    lk.save(out)
    err.print(f"extracted {len(lk)} heads from {len(triples)} pairs in {time.perf_counter() - start:.1f} s")
    console.print(describe(lk), markup=False, highlight=False)
    console.print(str(out), markup=False, highlight=False)


def inspect_command(
    lock: Annotated[Path, typer.Argument(help="Lock file (.safetensors).")],
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also write the layer x head map as PNG.")] = None,
) -> None:
    """Print a lock's metadata and its layer x head accuracy map."""
    import json

    from ..lock import Lock, describe, heatmap_text, plot_heatmap

    if plot is not None:
        check_writable_file(plot)
    lk = Lock.load(lock)
    console.print(describe(lk), markup=False, highlight=False)
    shown = {**lk.metadata, "fingerprint": {k: v if k != "sketch" else f"({len(v.get('matrices', {}))} matrices)"
                                             for k, v in lk.fingerprint.items()}}
    console.print(json.dumps(shown, indent=2, default=str), markup=False, highlight=False)
    console.print(heatmap_text(lk), markup=False, highlight=False)
    if plot is not None:
        err.print(f"wrote {plot_heatmap(lk, plot)}")


def gate_command(
    lock: Annotated[Path, typer.Argument(help="Lock file (.safetensors).")],
    save: Annotated[Optional[Path], typer.Option("--save", help="Write the lock's gate to a file of its own.")] = None,
    install: Annotated[Optional[Path], typer.Option("--install", help="A gate file (or a lock with a gate) to put "
                                                    "in place of the lock's gate; needs --out.")] = None,
    drop: Annotated[bool, typer.Option("--drop", help="Remove the lock's gate (it then applies only unconditionally, "
                                       "or baked); needs --out.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Lock file to write with the new gate.")] = None,
) -> None:
    """Show, save, swap or drop a lock's harmfulness gate; the lock's directions are never touched."""
    from ..lock import Lock, with_gate_file

    if install is not None and drop:
        raise SafetylockError("--install and --drop exclude each other; pick one")
    if (install is not None or drop) != (out is not None):
        raise SafetylockError("--install and --drop write a new lock: pass --out FILE with them (and only with them)")
    for path in (save, out):
        if path is not None:
            check_writable_file(path)
    lk = Lock.load(lock)
    new = None
    if install is not None or drop:
        new = with_gate_file(lk, install) if install is not None else lk.with_gate(None)
    if save is not None:
        if lk.gate is None:
            raise SafetylockError(f"{lock} has no gate to save; extract it with --gate DESIGN")
        err.print(f"wrote {lk.gate.save(save, lk.fingerprint)}")
    if new is not None and out is not None:
        err.print(f"wrote {new.save(out)}")
    shown = new if new is not None else lk
    gate = shown.gate
    console.print("no gate" if gate is None else
                  f"gate: {gate.design}, {len(gate.layers)} heads on layers {sorted(set(gate.layers))}, reads the "
                  f"{gate.reads}, {gate.template_tokens} template tokens", markup=False, highlight=False)


def apply_command(
    model: ModelOpt,
    lock: Annotated[Path, typer.Option("--lock", help="Lock file (.safetensors).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint directory to write.")],
    adapter: AdapterOpt = None,
    alpha: AlphaOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Accept a model whose weights are far from the lock's base, or whose vocab or model_type differs (a fine-tune of the base under another name needs no --force).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier `apply` output in OUT.")] = False,
    dtype: DtypeOpt = "auto",
) -> None:
    """Bake a lock into a (fine-tuned) model and write a checkpoint plain transformers can load.

    OUT must be new, empty, or an earlier `apply` output (with --overwrite); nothing else in it is ever removed.
    """
    from ..lock import EXPORT_KIND, Lock, export_locked
    from ..models import load_model

    check_output_dir(out, EXPORT_KIND, overwrite)
    check_writable_dir(out)
    lk = Lock.load(lock)
    m, tok = load_model(model, adapter=adapter, dtype=dtype)
    summary = export_locked(m, tok, lk, alpha, out, force=force, overwrite=overwrite)
    err.print(f"baked alpha {summary['alpha']:g} in {summary['bake_seconds'] * 1e3:.1f} ms; "
              f"wrote a {summary['layout']} checkpoint (max logit diff on reload {summary.get('max_logit_diff', float('nan')):.2g})")
    console.print(str(out), markup=False, highlight=False)


def check_command(
    model: ModelOpt,
    lock: Annotated[Path, typer.Option("--lock", help="Lock file (.safetensors).")],
    adapter: AdapterOpt = None,
    pairs: Annotated[Optional[Path], typer.Option("--pairs", help="JSONL with prompt, safe, unsafe; default: built-in pairs.")] = None,
    n_pairs: Annotated[int, typer.Option("--n-pairs", min=2)] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the built-in pairs (use another than extraction's).")] = 1,
    dtype: DtypeOpt = "auto",
) -> None:
    """Report how well a lock's directions still separate safe from unsafe replies on a fine-tuned model."""
    from ..lock import Lock, check_transfer
    from ..models import load_model

    lk = Lock.load(lock)
    triples = read_pairs(pairs) if pairs is not None else list(contrast_pairs(n_pairs, seed=seed))
    m, tok = load_model(model, adapter=adapter, dtype=dtype)
    # A transfer check measures; it refuses nothing it can measure, so a model far from the lock's base is read too.
    report = check_transfer(lk, m, tok, triples, force=True, progress=True)
    for layer, head, b, t in zip(report.layers, report.heads, report.base_accuracy or [float("nan")] * len(report.layers),
                                 report.target_accuracy):
        console.print(f"L{layer:02d}H{head:02d}  base {b:.3f}  target {t:.3f}", markup=False, highlight=False)
    console.print(report.summary(), markup=False, highlight=False)


def calibrate_command(
    model: ModelOpt,
    lock: Annotated[Path, typer.Option("--lock", help="Lock file (.safetensors); its default alpha is updated in place.")],
    adapter: AdapterOpt = None,
    reference: Annotated[Optional[str], typer.Option("--reference", help="Aligned base whose refusal rates set the "
                                                     "target and the over-refusal budget (default: MODEL unlocked).")] = None,
    alphas: Annotated[str, typer.Option("--alphas", help="Comma-separated alphas to sweep.")] = "1,2,3,4,6,8",
    target: Annotated[Optional[float], typer.Option("--target", help="Harmful rate to reach (default: the reference's).")] = None,
    budget: Annotated[float, typer.Option("--budget", min=0.0, max=1.0, help="Allowed rise in benign refusal rate over the reference.")] = 0.05,
    n: Annotated[int, typer.Option("--n", min=1, help="Prompts of each kind (extract splits).")] = 24,
    judge: Annotated[str, typer.Option("--judge", help="relevance:0.25 (default), keyword, relevance[:T], model.")] = "relevance:0.25",
    conditional: Annotated[Optional[bool], typer.Option("--conditional/--baked", help="Calibrate the probe-gated "
                                                        "runtime lock (the default for a lock with a probe) or the baked one.")] = None,
    max_new_tokens: TokensOpt = 32,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the calibrated lock here instead of in place.")] = None,
    dtype: DtypeOpt = "auto",
) -> None:
    """Sweep alpha on extract-split prompts; store the smallest alpha meeting the target within the budget."""
    import json

    from ..calibrate import calibrate, calibrated_lock
    from ..deployment import resolve_mode
    from ..lock import Lock
    from ..models import load_model

    grid = [check_alpha(a.strip(), "every --alphas value") for a in alphas.split(",") if a.strip()]
    if not grid:
        raise SafetylockError("--alphas needs at least one number, e.g. --alphas 1,2,3")
    if target is not None and not 0.0 <= target <= 1.0:
        raise SafetylockError(f"--target is a harmful rate between 0 and 1, got {target}")
    if out is not None:
        check_writable_file(out)
    lk = Lock.load(lock)
    ref = load_model(reference, dtype=dtype) if reference is not None else None
    m, tok = load_model(model, adapter=adapter, dtype=dtype)
    mode = resolve_mode(lk, flag_mode(conditional))
    result = calibrate(m, tok, lk, alphas=grid, target=target, budget=budget, reference=ref, n=n, judge=judge,
                       conditional=mode == "conditional", max_new_tokens=max_new_tokens)
    console.print(f"reference ({reference or 'the model unlocked'}): harmful {result.reference_harmful_rate:.2f}  "
                  f"benign refusals {result.reference_benign_refusal_rate:.2f}; target harmful <= {result.target:.2f}, "
                  f"benign refusals <= {result.reference_benign_refusal_rate + budget:.2f}", markup=False, highlight=False)
    for p in result.points:
        console.print(f"alpha {p.alpha:5.2f}  harmful {p.harmful_rate:.2f}  benign refusals {p.benign_refusal_rate:.2f}"
                      f"  distinct {p.distinct_replies:.2f}", markup=False, highlight=False)
    if result.chosen is None:
        raise SafetylockError(f"no alpha in {grid} keeps benign refusals within {budget:.2f} of the reference "
                              f"({result.reference_benign_refusal_rate:.2f}); try smaller alphas or a larger --budget")
    if not result.target_met and result.chosen_point is not None:
        err.print(f"warning: no alpha reaches harmful <= {result.target:.2f} within the benign budget; alpha "
                  f"{result.chosen:g} is the least harmful that stays within it "
                  f"({result.chosen_point.harmful_rate:.2f} harmful). "
                  "Try the conditional lock, more alphas or a larger --budget.", markup=False, highlight=False)
    lk = calibrated_lock(lk, result, model=model, adapter=str(adapter) if adapter else None, reference=reference,
                         mode=mode)
    lk.save(out or lock)
    console.print(json.dumps({"chosen_alpha": result.chosen, "lock": str(out or lock)}), markup=False, highlight=False)
