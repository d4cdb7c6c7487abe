"""Commands that run the benchmarks: the attacks x defenses grid, the out-of-distribution run, generation speed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import SafetylockError
from ..files import check_writable_dir
from .options import AdapterOpt, AlphaOpt, BatchOpt, DtypeOpt, ModelOpt, SystemOpt, TokensOpt, split_list
from .output import console, err


def bench_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (results.json, RESULTS.md, PNG plots).")],
    models: Annotated[Optional[list[str]], typer.Option("--models", help="Base models (repeatable or comma list).")] = None,
    attacks: Annotated[Optional[list[str]], typer.Option("--attacks", help="Attacks: NAME, NAME@STEPS or none.")] = None,
    defenses: Annotated[Optional[list[str]], typer.Option("--defenses", help="Defenses (default: all).")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Eval prompts per benchmark.")] = 8,
    benchmarks: Annotated[Optional[str], typer.Option("--benchmarks", help="Comma list (default: harmbench, "
                                                      "advbench, overrefusal, gsm8k100, bbq300).")] = None,
    alphas: Annotated[Optional[list[str]], typer.Option("--alphas", help="DEFENSE=A,B,... strengths to sweep; repeatable.")] = None,
    attack_steps: Annotated[Optional[str], typer.Option("--attack-steps", help="Attack-strength axis, e.g. 5,10,20.")] = None,
    judge: Annotated[str, typer.Option("--judge", help="relevance:0.25 (default, the best on human labels), keyword, relevance[:T], model or model:SPEC.")] = "relevance:0.25",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Reply tokens on harmful and benign prompts.")] = 48,
    math_tokens: Annotated[int, typer.Option("--math-tokens", min=1, help="Reply tokens on gsm8k100 (worked answers).")] = 384,
    pairs: Annotated[int, typer.Option("--pairs", min=2, help="Contrast pairs for the lock and ITI.")] = 64,
    sft_steps: Annotated[int, typer.Option("--sft-steps", min=1, help="Safety-SFT optimizer steps.")] = 10,
    batch_size: BatchOpt = 8,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Artifact cache (default OUT/cache).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Recompute everything, ignoring the cache.")] = False,
    dtype: DtypeOpt = "auto",
    calibrate_on: Annotated[Optional[str], typer.Option("--calibrate-on", help="Attack whose fine-tune picks each "
                                                        "swept defense's calibrated strength (e.g. harmful-10).")] = None,
) -> None:
    """Run the attacks x defenses grid (cached), and write a results table and plots."""
    from ..baselines import DEFENSES
    from ..bench import BenchSettings, parse_alphas, run_bench
    from ..models import DEFAULT_MODEL

    try:
        steps = [int(v) for v in attack_steps.split(",") if v.strip()] if attack_steps else None
    except ValueError:
        raise SafetylockError(f"--attack-steps must be integers separated by commas, got '{attack_steps}'") from None
    from ..bench import BENCHMARKS

    check_writable_dir(out)
    if cache_dir is not None:
        check_writable_dir(cache_dir)
    settings = BenchSettings(limit=limit, benchmarks=tuple(split_list([benchmarks] if benchmarks else None, BENCHMARKS)),
                             judge=judge, max_new_tokens=max_new_tokens, math_tokens=math_tokens, pairs=pairs,
                             sft_steps=sft_steps, batch_size=batch_size, dtype=dtype)
    result = run_bench(split_list(models, (DEFAULT_MODEL,)), split_list(attacks, ("harmful-10",)),
                       split_list(defenses, DEFENSES), out, alphas=parse_alphas(alphas or []), attack_steps=steps,
                       fresh=fresh, settings=settings, cache_dir=cache_dir, calibrate_on=calibrate_on)
    err.print(f"{len(result['rows'])} cells; computed {len(result['computed'])} item(s), the rest from the cache")
    console.print((out / "RESULTS.md").read_text(encoding="utf-8"), markup=False, highlight=False)


def ood_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (ood.json, OOD.md; replies cached under cache/).")],
    model: ModelOpt = "qwen2.5-coder-1.5b-instruct",
    adapter: AdapterOpt = None,
    attack: Annotated[str, typer.Option("--attack", help="The fine-tune's name in the tables (e.g. harmful-10).")] = "none",
    designs: Annotated[Optional[str], typer.Option("--designs", help="Gate designs, comma list: builtin, or "
                                                   "[refusal:]heads:K / [refusal:]all, each optionally @benign:Q or "
                                                   "@deployed:Q (refusal: labels = the base refuses; default: "
                                                   "the designs listed in docs/ood.md).")] = None,
    prompt_attacks: Annotated[Optional[str], typer.Option("--prompt-attacks", help="Comma list: prefill, two-turn, "
                                                          "persona, jailbreak:NAME, or all.")] = None,
    attack_prompts: Annotated[int, typer.Option("--attack-prompts", min=1, help="Eval prompts per harmful source under each prompt attack.")] = 8,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Eval prompts per source (default: the whole eval split).")] = None,
    fit_limit: Annotated[Optional[int], typer.Option("--fit-limit", min=2, help="Extract prompts per source for the gates (default: all).")] = None,
    judge: Annotated[str, typer.Option("--judge", help="Judge (default relevance:0.25, the best on human labels).")] = "relevance:0.25",
    alpha: AlphaOpt = None,
    pairs: Annotated[int, typer.Option("--pairs", min=2, help="Contrast pairs per fold's lock.")] = 64,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 40,
    verify: Annotated[int, typer.Option("--verify", min=0, help="Prompts per harmful source re-run through the real conditional hooks.")] = 8,
    verify_design: Annotated[Optional[str], typer.Option("--verify-design", help="The design --verify re-runs (default: "
                                                         "the first one other than builtin).")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Cache of features, fold locks and replies "
                                                      "(default OUT/cache); share one across fine-tunes of one base.")] = None,
    system: SystemOpt = None,
    batch_size: BatchOpt = 8,
    dtype: DtypeOpt = "auto",
) -> None:
    """Leave each prompt source out of fitting in turn; measure the gate and the locks on it (out of distribution)."""
    from ..ood import DESIGNS, OODSettings, ood_markdown, run_ood
    from ..prompt_attacks import prompt_attack_names

    check_writable_dir(out)
    attacks = split_list([prompt_attacks] if prompt_attacks else None, ())
    if attacks == ["all"]:
        attacks = [a for a in prompt_attack_names() if a != "none"]
    settings = OODSettings(model=model, adapter=str(adapter) if adapter else None, attack=attack, system=system,
                           designs=tuple(split_list([designs] if designs else None, DESIGNS)), judge=judge,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, pairs=pairs, alpha=alpha, limit=limit,
                           fit_limit=fit_limit, prompt_attacks=tuple(attacks), attack_prompts=attack_prompts,
                           verify=verify, verify_design=verify_design, dtype=dtype,
                           cache_dir=str(cache_dir) if cache_dir else None)
    if verify_design is not None and verify_design not in settings.designs:
        raise SafetylockError(f"--verify-design '{verify_design}' is not among --designs; add it there")
    result = run_ood(settings, out)
    console.print(ood_markdown(result), markup=False, highlight=False)


def bench_generate_command(
    model: ModelOpt = "qwen2.5-coder-0.5b-instruct",
    prompts: Annotated[int, typer.Option("--prompts", min=1, help="How many overrefusal prompts.")] = 16,
    max_new_tokens: TokensOpt = 48,
    batch_size: BatchOpt = 8,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("bench"),
    dtype: DtypeOpt = "auto",
) -> None:
    """Time batched generation against a one-prompt-at-a-time loop; write generation.json and .md."""
    import json

    from ..evaluate import write_generation_bench

    check_writable_dir(out)
    result = write_generation_bench(model, out, n_prompts=prompts, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, dtype=dtype)
    console.print_json(json.dumps(result))
