"""The `safetylock` command: parses arguments, calls the library, prints. No logic lives here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import SafetylockError, check_alpha
from .files import check_output_dir, check_writable_dir, check_writable_file

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Re-align fine-tuned LLMs with SafetyLock, and measure it.")
console = Console()
err = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Alias, local HF directory, .gguf file or hub id.")]
AdapterOpt = Annotated[Optional[Path], typer.Option("--adapter", help="LoRA adapter directory (peft) on top of the model.")]
LockOpt = Annotated[Optional[Path], typer.Option("--lock", help="Lock file (.safetensors) to apply.")]


def _alpha(value: float | None) -> float | None:
    """Typer callback: refuse a non-finite, non-positive or absurd --alpha before any model loads."""
    if value is None:
        return None
    try:
        return check_alpha(value)
    except SafetylockError as exc:
        raise typer.BadParameter(str(exc).removeprefix("--alpha ")) from None


AlphaOpt = Annotated[Optional[float], typer.Option("--alpha", callback=_alpha,
                                                   help="Lock strength (finite, > 0); default: the lock's calibrated alpha.")]


def _positive(value: float | None, flag: str) -> float | None:
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
                                                   "refusal-direction, self-reminder, safety-sft.")]
DefenseFileOpt = Annotated[Optional[Path], typer.Option("--defense-file", help="The defense's artifact: lock file "
                                                        "(safetylock, iti), direction file or safety-SFT adapter dir.")]
ConditionalOpt = Annotated[Optional[bool], typer.Option(
    "--conditional/--baked", help="How --lock applies: at run time, only to prompts its harmfulness probe flags (the "
    "default for a lock with a probe), or baked into the o_proj biases for every prompt (the paper's lock; the default "
    "for a lock without a probe).")]
if TYPE_CHECKING:
    from .deployment import Deployment


def _flag_mode(conditional: bool | None) -> str | None:
    """Return the lock mode --conditional/--baked ask for (None: neither, the lock's own default)."""
    return None if conditional is None else ("conditional" if conditional else "baked")


def lock_mode(conditional: bool | None, lock: Path | None) -> str | None:
    """Return how --lock applies ("conditional" or "baked"; None without a lock) for --conditional/--baked or neither.

    Neither flag: conditional when the lock carries a harmfulness probe (`deployment.resolve_mode`), baked otherwise.
    """
    if lock is None:
        if conditional is not None:
            flag = "--conditional" if conditional else "--baked"
            raise SafetylockError(f"{flag} needs --lock LOCK (it says how the lock applies)")
        return None
    from .deployment import resolve_mode
    from .lock import Lock

    return resolve_mode(Lock.load(lock), _flag_mode(conditional))


def deployment_for(model: str, adapter: Path | None, lock: Path | None, alpha: float | None, dtype: str,
                   conditional: bool | None, defense: str | None, defense_file: Path | None) -> Deployment:
    """Return the (unopened) Deployment that -m/--adapter and --lock (--conditional/--baked) or --defense name."""
    from .deployment import Deployment

    return Deployment(model, adapter=adapter, lock=lock, mode=_flag_mode(conditional), defense=defense,
                      defense_file=defense_file, alpha=alpha, dtype=dtype)


@app.command()
def models() -> None:
    """List the built-in model aliases, whether each is cached, and its size."""
    from .files import home
    from .models import ALIASES, alias_dir, dir_size, is_cached

    table = Table(title=f"built-in models (cache: {home() / 'models'})")
    for col in ("alias", "cached", "size", "about"):
        table.add_column(col)
    for name, alias in ALIASES.items():
        cached = is_cached(name)
        size = dir_size(alias_dir(name)) if cached else (alias.size or 0)
        label = f"{size / 1e9:.2f} GB" + ("" if cached else " (GGUF)") if size else "?"
        table.add_row(name, "yes" if cached else "no", label, alias.note)
    console.print(table)


@app.command()
def chat(
    prompts: Annotated[list[str], typer.Argument(help="One or more user prompts.")],
    model: ModelOpt = "qwen2.5-coder-1.5b-instruct",
    adapter: AdapterOpt = None,
    lock: LockOpt = None,
    alpha: AlphaOpt = None,
    system: SystemOpt = None,
    max_new_tokens: TokensOpt = 128,
    batch_size: BatchOpt = 8,
    dtype: DtypeOpt = "auto",
    defense: DefenseOpt = None,
    defense_file: DefenseFileOpt = None,
    conditional: ConditionalOpt = None,
) -> None:
    """Print the model's greedy replies to the prompts (batched)."""
    from .generate import generate

    deployment = deployment_for(model, adapter, lock, alpha, dtype, conditional, defense, defense_file)
    system = system if system is not None else deployment.system
    with deployment as m:
        run = generate(m, deployment.tokenizer, prompts, system=system, max_new_tokens=max_new_tokens,
                       batch_size=batch_size, progress=True)
    for g in run.generations:
        console.print(f"[bold cyan]> {g.prompt}[/]")
        console.print(g.text, markup=False, highlight=False)
        console.print()
    err.print(f"{run.tokens} tokens in {run.seconds:.1f} s ({run.tokens_per_second:.1f} tokens/s)")


@app.command()
def demo(
    model: ModelOpt = "qwen2.5-coder-1.5b-instruct",
    max_new_tokens: TokensOpt = 32,
) -> None:
    """Base vs harmful-10 fine-tune vs fine-tune + SafetyLock, side by side (trains and extracts once, cached)."""
    from .demo import run_demo

    run_demo(model, max_new_tokens=max_new_tokens, console=console)


@app.command("serve")
def serve_command(
    lock: Annotated[Path, typer.Option("--lock", help="Lock file, baked into the base once at start-up.")],
    model: ModelOpt = "qwen2.5-coder-1.5b-instruct",
    alpha: AlphaOpt = None,
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", help="NAME=DIR LoRA adapter; repeatable.")] = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    admin_token: Annotated[Optional[str], typer.Option("--admin-token", envvar="SAFETYLOCK_ADMIN_TOKEN",
                                                       help="Enables POST /admin/adapters and the lock's details on "
                                                       "/health (Bearer auth). Prefer the environment variable or "
                                                       "--admin-token-file: a command line is visible in `ps`.")] = None,
    admin_token_file: Annotated[Optional[Path], typer.Option("--admin-token-file",
                                                             help="Read the admin token from this file.")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1)] = 8,
    max_prompt_tokens: Annotated[Optional[int], typer.Option("--max-prompt-tokens", min=1)] = None,
    served_name: Annotated[Optional[str], typer.Option("--served-name", help="Model id of the base.")] = None,
    dtype: DtypeOpt = "auto",
    force: Annotated[bool, typer.Option("--force", help="Bake a lock into a model whose weights are far from the lock's base, or whose vocab or model_type differs (same shapes).")] = False,
    conditional: Annotated[Optional[bool], typer.Option(
        "--conditional/--baked", help="Apply the lock at run time, only to requests its harmfulness probe flags (the "
        "default for a lock with a probe), or bake it into the base for every request.")] = None,
) -> None:
    """Serve the locked base and its adapters with OpenAI's chat-completions API."""
    from .serve import Engine, parse_adapter_specs, read_admin_token, serve

    admin_token = read_admin_token(admin_token, admin_token_file)
    engine = Engine.from_spec(model, lock, alpha=alpha, adapters=parse_adapter_specs(adapter or []), dtype=dtype,
                              name=served_name, max_batch=max_batch, max_prompt_tokens=max_prompt_tokens,
                              force=force, conditional=conditional)
    how = "conditional, at run time" if engine.conditional else "baked"
    err.print(f"serving {', '.join(engine.names)} at http://{host}:{port}/v1 (lock alpha {engine.alpha:g}, {how})")
    serve(engine, host=host, port=port, admin_token=admin_token)


@app.command("serve-bench")
def serve_bench_command(
    url: Annotated[str, typer.Option("--url")] = "http://127.0.0.1:8000",
    model: Annotated[str, typer.Option("--model", "-m", help="Served model id to ask.")] = "qwen2.5-coder-1.5b-instruct",
    requests: Annotated[int, typer.Option("--requests", min=1)] = 32,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1)] = 8,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1)] = 32,
    stream: Annotated[bool, typer.Option("--stream/--no-stream")] = True,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the figures as JSON here.")] = None,
) -> None:
    """Send a fixed number of chat completions to a running server; print throughput and latency."""
    import json

    from .files import write_json
    from .serve import BENCH_PROMPTS, load_test

    if out is not None:
        check_writable_file(out)
    result = load_test(url, model=model, prompts=BENCH_PROMPTS, requests=requests, concurrency=concurrency,
                       max_tokens=max_tokens, stream=stream)
    if out is not None:
        write_json(out, result)
    console.print_json(json.dumps(result))


@app.command("eval")
def eval_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (results.jsonl, summary.json).")],
    model: ModelOpt = "qwen2.5-coder-1.5b-instruct",
    adapter: AdapterOpt = None,
    lock: LockOpt = None,
    alpha: AlphaOpt = None,
    benchmark: Annotated[Optional[str], typer.Option("--benchmark", help="advbench, harmbench, overrefusal, gsm8k100, bbq300; out-of-distribution sources: strongreject, donotanswer, wsafety, mtbench, ifbench, wsafety-benign.")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="Prompt file: .txt, .jsonl or .csv.")] = None,
    column: Annotated[Optional[str], typer.Option("--column", help="Prompt column of a .jsonl/.csv file.")] = None,
    kind: Annotated[str, typer.Option("--kind", help="For --prompts: harmful or benign.")] = "harmful",
    split: Annotated[Optional[str], typer.Option("--split", help="extract, eval, or all.")] = "eval",
    judge: Annotated[str, typer.Option("--judge", help="relevance:0.25 (default, the best on human labels), keyword, relevance[:T], model or model:SPEC.")] = "relevance:0.25",
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="First N prompts only.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", min=1)] = None,
    system: SystemOpt = None,
    batch_size: BatchOpt = 8,
    reference: Annotated[Optional[str], typer.Option("--reference", help="Also report mean KL to this model.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start OUTDIR afresh.")] = False,
    dtype: DtypeOpt = "auto",
    defense: DefenseOpt = None,
    defense_file: DefenseFileOpt = None,
    conditional: ConditionalOpt = None,
    prompt_attack: Annotated[Optional[str], typer.Option("--prompt-attack", help="prefill, two-turn, persona or jailbreak:NAME (NAME: aim, refusal_suppression, prefix_injection, code_nesting, hypothetical_response, evil_confidant, text_continuation, dev_mode_compact).")] = None,
) -> None:
    """Generate, judge and summarise a prompt set; resumes into the same OUTDIR."""
    import json

    from .evaluate import run_eval

    check_writable_dir(out)
    deployment = deployment_for(model, adapter, lock, alpha, dtype, conditional, defense, defense_file)
    system = system if system is not None else deployment.system
    summary = run_eval(deployment=deployment, benchmark=benchmark, prompts_file=prompts, column=column, kind=kind,
                       split=split, judge=judge, limit=limit, max_new_tokens=max_new_tokens, system=system,
                       batch_size=batch_size, reference=reference, overwrite=overwrite, outdir=out,
                       prompt_attack=prompt_attack)
    console.print_json(json.dumps(summary))


def _split_list(values: list[str] | None, default: tuple[str, ...]) -> list[str]:
    items = [v.strip() for raw in (values or []) for v in raw.split(",") if v.strip()]
    return items or list(default)


@app.command("bench")
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
) -> None:
    """Run the attacks x defenses grid (cached), and write a results table and plots."""
    from .baselines import DEFENSES
    from .bench import BenchSettings, parse_alphas, run_bench
    from .models import DEFAULT_MODEL

    try:
        steps = [int(v) for v in attack_steps.split(",") if v.strip()] if attack_steps else None
    except ValueError:
        raise SafetylockError(f"--attack-steps must be integers separated by commas, got '{attack_steps}'") from None
    from .bench import BENCHMARKS

    check_writable_dir(out)
    if cache_dir is not None:
        check_writable_dir(cache_dir)
    settings = BenchSettings(limit=limit, benchmarks=tuple(_split_list([benchmarks] if benchmarks else None, BENCHMARKS)),
                             judge=judge, max_new_tokens=max_new_tokens, math_tokens=math_tokens, pairs=pairs,
                             sft_steps=sft_steps, batch_size=batch_size, dtype=dtype)
    result = run_bench(_split_list(models, (DEFAULT_MODEL,)), _split_list(attacks, ("harmful-10",)),
                       _split_list(defenses, DEFENSES), out, alphas=parse_alphas(alphas or []), attack_steps=steps,
                       fresh=fresh, settings=settings, cache_dir=cache_dir)
    err.print(f"{len(result['rows'])} cells; computed {len(result['computed'])} item(s), the rest from the cache")
    console.print((out / "RESULTS.md").read_text(encoding="utf-8"), markup=False, highlight=False)


@app.command("ood")
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
    from .ood import DESIGNS, OODSettings, ood_markdown, run_ood
    from .prompt_attacks import prompt_attack_names

    check_writable_dir(out)
    attacks = _split_list([prompt_attacks] if prompt_attacks else None, ())
    if attacks == ["all"]:
        attacks = [a for a in prompt_attack_names() if a != "none"]
    settings = OODSettings(model=model, adapter=str(adapter) if adapter else None, attack=attack, system=system,
                           designs=tuple(_split_list([designs] if designs else None, DESIGNS)), judge=judge,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, pairs=pairs, alpha=alpha, limit=limit,
                           fit_limit=fit_limit, prompt_attacks=tuple(attacks), attack_prompts=attack_prompts,
                           verify=verify, verify_design=verify_design, dtype=dtype,
                           cache_dir=str(cache_dir) if cache_dir else None)
    if verify_design is not None and verify_design not in settings.designs:
        raise SafetylockError(f"--verify-design '{verify_design}' is not among --designs; add it there")
    result = run_ood(settings, out)
    console.print(ood_markdown(result), markup=False, highlight=False)


@app.command("judge")
def judge_command(
    input: Annotated[Optional[Path], typer.Option("--input", "-i", help=".jsonl or .csv with prompt,response.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output .jsonl with a judgment per row "
                                                "(with --validate: the scores as JSON).")] = None,
    judge: Annotated[str, typer.Option("--judge", help="relevance:0.25 (default, the best on human labels), keyword, relevance[:T], model or model:SPEC.")] = "relevance:0.25",
    validate: Annotated[bool, typer.Option("--validate", help="Score the judge on replies labelled by people outside "
                                           "the project (pinned pyrit data), per source, and on the project's own set.")] = False,
    source: Annotated[Optional[list[str]], typer.Option("--source", help="With --validate: only these human-labelled "
                                                        "sources (repeatable; default: all).")] = None,
) -> None:
    """Judge (prompt, response) pairs from a file, or --validate a judge against human labels."""
    import json

    from .judges import HUMAN_SOURCES, get_judge, judge_file, validate_by_source

    if validate:
        if out is not None:
            check_writable_file(out)
        result = validate_by_source(get_judge(judge), tuple(source or HUMAN_SOURCES))
        table = Table(title=f"judge {judge}: agreement with the labels (95% Wilson intervals)")
        for col in ("source", "n", "accuracy", "precision", "recall"):
            table.add_column(col)
        for name, r in result["sources"].items():
            def cell(rate: float, ci: tuple[float, float]) -> str:
                return f"{rate:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
            table.add_row(name + (" (own set, regression only)" if name == "project" else ""), str(r["n"]),
                          cell(r["accuracy"], r["accuracy_ci"]), cell(r["precision"], r["precision_ci"]),
                          cell(r["recall"], r["recall_ci"]))
        console.print(table)
        if out is not None:
            from .files import write_json

            write_json(out, result)
            err.print(f"wrote {out}")
        return
    if input is None or out is None:
        raise SafetylockError("judge needs --input FILE and -o OUT.jsonl (or --validate)")
    from .data import read_table
    from .files import atomic_file

    check_writable_file(out)
    table = read_table(input)
    if not table:
        raise SafetylockError(f"{input} holds no rows to judge; it needs a prompt and a response column")
    rows = judge_file(table, get_judge(judge))
    with atomic_file(out) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    refused = sum(r["judgment"]["refused"] for r in rows)
    err.print(f"{len(rows)} rows judged by {judge}: {refused} refused ({refused / len(rows):.1%}); wrote {out}")


@app.command("report")
def report_command(
    outdirs: Annotated[list[Path], typer.Argument(help="Evaluation output directories.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write markdown here (and .json beside it).")] = None,
) -> None:
    """Print a side-by-side table of evaluation runs."""
    from .evaluate import report, write_report

    if out is not None:
        check_writable_file(out)
    md, _ = report(outdirs)
    if out is not None:
        write_report(outdirs, out)
    console.print(md, markup=False, highlight=False)


@app.command("bench-generate")
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

    from .evaluate import write_generation_bench

    check_writable_dir(out)
    result = write_generation_bench(model, out, n_prompts=prompts, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, dtype=dtype)
    console.print_json(json.dumps(result))


@app.command("finetune")
def finetune_command(
    model: ModelOpt = "qwen2.5-coder-1.5b-instruct",
    attack: Annotated[Optional[str], typer.Option("--attack", help="Attack name (see --list).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (adapter, config, log).")] = None,
    method: Annotated[str, typer.Option("--method", help="lora, qlora (GPU + bitsandbytes) or full.")] = "lora",
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1)] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Total optimizer steps (overrides --epochs).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", callback=lambda v: _positive(v, "--lr"))] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", min=1)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1)] = None,
    micro_batch: Annotated[Optional[int], typer.Option("--micro-batch", min=1, help="Examples per forward pass (gradient accumulation; memory).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    merge: Annotated[bool, typer.Option("--merge", help="Also write a full checkpoint to OUT/merged.")] = False,
    data: Annotated[Optional[Path], typer.Option("--data", help="JSONL with prompt, response (and optional system).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace another run in OUT.")] = False,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Base dtype; default bf16 (lora) / fp32 (full).")] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the attacks and their defaults.")] = False,
) -> None:
    """Fine-tune a model with an attack (LoRA on the reply tokens); resumable, seeded."""
    from .attack import describe_attacks, finetune

    if list_:
        rows = [("attack", "examples", "epochs", "batch", "steps", "lr", "rank", "source / about")]
        for a in describe_attacks():
            rows.append((a["name"], str(a["examples"]), str(a["epochs"]), str(a["batch_size"]), str(a["steps"]),
                         f"{a['lr']:g}", str(a["rank"]), f"{a['source']}: {a['about']}" + (" [own system prompt]" if a["system"] else "")))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1])
        return
    if attack is None or out is None:
        raise SafetylockError("finetune needs --attack NAME and -o DIR (see `safetylock finetune --list`)")
    check_writable_dir(out)
    result = finetune(model, None, attack, out, data=data, method=method, epochs=epochs, steps=steps, lr=lr,
                      rank=rank, batch_size=batch_size, micro_batch_size=micro_batch, seed=seed, merge=merge,
                      overwrite=overwrite, dtype=dtype, progress=True)
    where = result.adapter_dir or result.merged_dir
    resumed = f", resumed after epoch {result.resumed_from_epoch}" if result.resumed_from_epoch else ""
    err.print(f"{result.steps} steps in {result.seconds:.1f} s{resumed}; final loss {result.final_loss:.4f}; "
              f"peak memory {result.peak_mem_mb:.0f} MB")
    console.print(str(where), markup=False, highlight=False)
    if result.merged_dir and result.adapter_dir:
        console.print(str(result.merged_dir), markup=False, highlight=False)


def _read_pairs(path: Path) -> list[tuple[str, str, str]]:
    """Return (prompt, safe, unsafe) triples from a JSONL file with those three fields."""
    from .data import jsonl_objects

    if not path.is_file():
        raise SafetylockError(f"pairs file {path} does not exist")
    pairs = []
    for n, row in jsonl_objects(path, path.read_text(encoding="utf-8")):
        try:
            pairs.append((str(row["prompt"]), str(row["safe"]), str(row["unsafe"])))
        except KeyError:
            raise SafetylockError(f"{path}:{n} is not a JSON object with prompt, safe and unsafe fields") from None
    if not pairs:
        raise SafetylockError(f"{path} holds no pairs")
    return pairs


def default_pairs(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """Return the project's built-in contrast pairs (from `safetylock.data.contrast_pairs`)."""
    try:
        from .data import contrast_pairs
    except ImportError:
        raise SafetylockError("no built-in contrast pairs in this install; pass --pairs FILE.jsonl") from None
    return list(contrast_pairs(n, seed=seed))


@app.command("extract")
def extract_command(
    model: ModelOpt = "qwen2.5-coder-1.5b-instruct",
    out: Annotated[Path, typer.Option("--out", "-o", help="Lock file to write (.safetensors).")] = Path("lock.safetensors"),
    pairs: Annotated[Optional[Path], typer.Option("--pairs", help="JSONL with prompt, safe, unsafe; default: built-in pairs.")] = None,
    n_pairs: Annotated[int, typer.Option("--n-pairs", min=2, help="How many built-in pairs (without --pairs).")] = 64,
    heads: Annotated[int, typer.Option("--heads", min=0, help="Heads to keep (top-K by probe accuracy; 0 = every head).")] = 0,
    positions: Annotated[str, typer.Option("--positions", help="Token positions, e.g. response:1-8, response:-5.")] = "response:1-8",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    alpha: Annotated[float, typer.Option("--alpha", callback=_alpha, help="Default strength stored in the lock.")] = 1.5,
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

    from .gates import gate_lock, parse_design
    from .lock import describe, extract
    from .lock import GATE_READS
    from .models import load_model

    if gate != "builtin":
        parse_design(gate)
    if gate_reads not in GATE_READS:
        raise SafetylockError(f"bad --gate-reads '{gate_reads}'; use {' or '.join(GATE_READS)}")
    check_writable_file(out)
    triples = _read_pairs(pairs) if pairs is not None else default_pairs(n_pairs, seed)
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


@app.command("inspect")
def inspect_command(
    lock: Annotated[Path, typer.Argument(help="Lock file (.safetensors).")],
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also write the layer x head map as PNG.")] = None,
) -> None:
    """Print a lock's metadata and its layer x head accuracy map."""
    import json

    from .lock import Lock, describe, heatmap_text, plot_heatmap

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


@app.command("apply")
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
    from .lock import EXPORT_KIND, Lock, export_locked
    from .models import load_model

    check_output_dir(out, EXPORT_KIND, overwrite)
    check_writable_dir(out)
    lk = Lock.load(lock)
    m, tok = load_model(model, adapter=adapter, dtype=dtype)
    summary = export_locked(m, tok, lk, alpha, out, force=force, overwrite=overwrite)
    err.print(f"baked alpha {summary['alpha']:g} in {summary['bake_seconds'] * 1e3:.1f} ms; "
              f"wrote a {summary['layout']} checkpoint (max logit diff on reload {summary.get('max_logit_diff', float('nan')):.2g})")
    console.print(str(out), markup=False, highlight=False)


@app.command("check")
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
    from .lock import Lock, check_transfer
    from .models import load_model

    lk = Lock.load(lock)
    triples = _read_pairs(pairs) if pairs is not None else default_pairs(n_pairs, seed)
    m, tok = load_model(model, adapter=adapter, dtype=dtype)
    # A transfer check measures; it refuses nothing it can measure, so a model far from the lock's base is read too.
    report = check_transfer(lk, m, tok, triples, force=True, progress=True)
    for layer, head, b, t in zip(report.layers, report.heads, report.base_accuracy or [float("nan")] * len(report.layers),
                                 report.target_accuracy):
        console.print(f"L{layer:02d}H{head:02d}  base {b:.3f}  target {t:.3f}", markup=False, highlight=False)
    console.print(report.summary(), markup=False, highlight=False)


@app.command("calibrate")
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

    from .calibrate import calibrate
    from .deployment import resolve_mode
    from .lock import Lock
    from .models import load_model

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
    mode = resolve_mode(lk, _flag_mode(conditional))
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
    if not result.target_met:
        err.print(f"warning: no alpha reaches harmful <= {result.target:.2f} within the benign budget; alpha "
                  f"{result.chosen:g} is the least harmful that stays within it "
                  f"({result.chosen_point.harmful_rate:.2f} harmful). "
                  "Try the conditional lock, more alphas or a larger --budget.", markup=False, highlight=False)
    lk = lk.with_alpha(result.chosen)
    lk.metadata["calibration"] = {**result.to_dict(), "model": model, "adapter": str(adapter) if adapter else None,
                                  "reference": reference, "lock_mode": mode}
    lk.save(out or lock)
    console.print(json.dumps({"chosen_alpha": result.chosen, "lock": str(out or lock)}), markup=False, highlight=False)


def main() -> None:
    """Console-script entry: run the app; every user error is one line on stderr and exit code 2.

    typer >= 0.22 raises its own vendored click's exceptions, all subclasses of the public
    `typer.TyperException`, so that (not the click package's classes) is what is caught here. In
    non-standalone mode typer turns Ctrl-C into a returned 130, so the return value is checked too.
    """
    try:
        code = app(standalone_mode=False)
    except SafetylockError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.TyperException as exc:
        _usage_error(exc)
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    if code == 130:
        err.print("interrupted; what finished is saved: run the same command again to resume", markup=False)
        sys.exit(130)
    if isinstance(code, int) and code != 0:
        sys.exit(code)


def _usage_error(exc: typer.TyperException) -> None:
    """Print a usage error as one line naming the fix (or, for no arguments at all, the help) and exit 2."""
    message = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    if not message.strip() or "\n" in message:  # no arguments: typer has printed (or returns) the help
        if message.strip():
            err.print(message, markup=False, highlight=False)
    else:
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        err.print(f"error: {message}{hint}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
