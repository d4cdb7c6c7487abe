"""Commands that measure replies: evaluate a prompt set, judge (prompt, response) pairs, report runs side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import SafetylockError
from ..files import check_writable_dir, check_writable_file
from .options import (AdapterOpt, BaseModelOpt, BatchOpt, ConditionalOpt, DefenseFileOpt, DefenseOpt, DtypeOpt,
                      LockOpt, ModelOpt, StrengthOpt, SystemOpt, deployment_for, mode_line)
from .output import console, err


def eval_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (results.jsonl, summary.json).")],
    model: ModelOpt = "qwen2.5-coder-1.5b-instruct",
    adapter: AdapterOpt = None,
    lock: LockOpt = None,
    alpha: StrengthOpt = None,
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
    base_model: BaseModelOpt = None,
    prompt_attack: Annotated[Optional[str], typer.Option("--prompt-attack", help="prefill, two-turn, persona or jailbreak:NAME (NAME: aim, refusal_suppression, prefix_injection, code_nesting, hypothetical_response, evil_confidant, text_continuation, dev_mode_compact).")] = None,
) -> None:
    """Generate, judge and summarise a prompt set; resumes into the same OUTDIR."""
    import json

    from ..evaluate import run_eval

    deployment = deployment_for(model, adapter, lock, alpha, dtype, conditional, defense, defense_file, base_model)
    if (line := mode_line(deployment)) is not None:
        err.print(line, markup=False, highlight=False, soft_wrap=True)
    check_writable_dir(out)
    system = system if system is not None else deployment.system
    summary = run_eval(deployment=deployment, benchmark=benchmark, prompts_file=prompts, column=column, kind=kind,
                       split=split, judge=judge, limit=limit, max_new_tokens=max_new_tokens, system=system,
                       batch_size=batch_size, reference=reference, overwrite=overwrite, outdir=out,
                       prompt_attack=prompt_attack)
    console.print_json(json.dumps(summary))


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

    from ..judges import HUMAN_SOURCES, get_judge, judge_file, validate_by_source

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
            from ..files import write_json

            write_json(out, result)
            err.print(f"wrote {out}")
        return
    if input is None or out is None:
        raise SafetylockError("judge needs --input FILE and -o OUT.jsonl (or --validate)")
    from ..data import read_table
    from ..files import atomic_file

    check_writable_file(out)
    records = read_table(input)
    if not records:
        raise SafetylockError(f"{input} holds no rows to judge; it needs a prompt and a response column")
    rows = judge_file(records, get_judge(judge))
    with atomic_file(out) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    refused = sum(r["judgment"]["refused"] for r in rows)
    err.print(f"{len(rows)} rows judged by {judge}: {refused} refused ({refused / len(rows):.1%}); wrote {out}")


def report_command(
    outdirs: Annotated[list[Path], typer.Argument(help="Evaluation output directories.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write markdown here (and .json beside it).")] = None,
) -> None:
    """Print a side-by-side table of evaluation runs."""
    from ..evaluate import report, write_report

    if out is not None:
        check_writable_file(out)
    md, _ = report(outdirs)
    if out is not None:
        write_report(outdirs, out)
    console.print(md, markup=False, highlight=False)
