"""`finetune`: LoRA, QLoRA or full fine-tuning on an attack's data, loss on the reply tokens, resumable per epoch."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import SafetylockError
from ..files import write_json
from .artifacts import _save_adapter, _save_full, _versions, _write_merged, base_digest
from .checkpoint import _load_checkpoint, _save_checkpoint
from .distill import DISTILLED, self_distill
from .encode import collate, encode_example, micro_batches
from .examples import Example, check_not_eval, data_hash, load_examples
from .loss import response_loss_sum
from .registry import Attack, Hyper, attack_data, get_attack
from .results import FinetuneResult, _read_result, peak_memory_mb
from .rundir import FORMAT, _append_log, _clear_run, _run_state, _truncate_log

METHODS = ("lora", "qlora", "full")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise SafetylockError(f"unknown method '{method}'; use one of {', '.join(METHODS)}")
    if method == "qlora":
        import importlib.util

        if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
            raise SafetylockError(
                "qlora needs a CUDA GPU and the bitsandbytes package, and this machine lacks "
                f"{'a GPU' if not torch.cuda.is_available() else 'bitsandbytes'}; use --method lora"
            )


def _resolve_hyper(attack: Attack, overrides: dict[str, Any]) -> Hyper:
    hyper = replace(attack.defaults, **{k: v for k, v in overrides.items() if v is not None})
    for key in ("epochs", "batch_size", "rank", "max_length"):
        if int(getattr(hyper, key)) < 1:
            raise SafetylockError(f"{key.replace('_', '-')} must be at least 1, got {getattr(hyper, key)}")
    if hyper.steps is not None and hyper.steps < 1:
        raise SafetylockError(f"steps must be at least 1, got {hyper.steps}")
    if not hyper.lr > 0:
        raise SafetylockError(f"lr must be positive, got {hyper.lr}")
    return hyper


def _prepare(model: Any, method: str, hyper: Hyper, seed: int) -> Any:
    """Return the model ready to train: LoRA-wrapped (fp32 adapter weights) or fully trainable."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=hyper.rank, lora_alpha=hyper.lora_alpha, lora_dropout=hyper.lora_dropout,
                        target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    # autocast_adapter_dtype keeps the LoRA weights in fp32 over a bf16/fp16 base: fp32 master weights.
    return get_peft_model(model, config, autocast_adapter_dtype=True)


def _load_base(spec: str, method: str, dtype: str | None) -> tuple[Any, Any]:
    from ..models import load_model

    if method == "qlora":
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        from ..models import model_source

        source = model_source(spec)
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(source, quantization_config=bnb, device_map={"": 0})
        tokenizer = AutoTokenizer.from_pretrained(source)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.safetylock_spec = spec
        return model, tokenizer
    # Full fine-tuning keeps fp32 master weights; LoRA trains fp32 adapters over a bf16 base (4x faster on CPU).
    return load_model(spec, dtype=dtype or ("fp32" if method == "full" else "auto"))


def finetune(
    model: str | Any,
    tokenizer: Any,
    attack: str,
    outdir: str | Path,
    *,
    data: str | Path | Sequence[Example] | None = None,
    method: str = "lora",
    epochs: int | None = None,
    steps: int | None = None,
    lr: float | None = None,
    rank: int | None = None,
    lora_alpha: int | None = None,
    batch_size: int | None = None,
    micro_batch_size: int | None = None,
    max_length: int | None = None,
    seed: int = 0,
    merge: bool = False,
    overwrite: bool = False,
    dtype: str | None = None,
    progress: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
    name: str | None = None,
) -> FinetuneResult:
    """Return what fine-tuning `model` on `attack`'s data (or `data`) wrote into `outdir`.

    `model` is a spec (alias, directory, hub id; loaded here) or a loaded model with its `tokenizer`.
    A loaded model is trained through a LoRA wrapper that is removed afterwards (its weights are
    untouched); with method 'full' it is trained in place. Re-running with the same arguments and
    `outdir` resumes after the last finished epoch; a finished run is returned as is (with `merge`,
    the merged checkpoint is added if missing). `callback` gets a dict after every optimizer step.
    `name` labels the run in the progress bar and config.json where it is not an attack (default: the attack).
    """
    outdir = Path(outdir).expanduser()
    spec = get_attack(attack)
    _check_method(method)
    hyper = _resolve_hyper(spec, {"epochs": epochs, "steps": steps, "lr": lr, "rank": rank, "lora_alpha": lora_alpha,
                                  "batch_size": batch_size, "max_length": max_length})
    if data is None:
        examples, data_source = attack_data(attack, seed), f"attack:{attack}"
    elif isinstance(data, (str, Path)):
        examples, data_source = load_examples(data), f"file:{Path(data).expanduser().resolve()}"
    else:
        examples, data_source = list(data), "examples"
        if not examples:
            raise SafetylockError("finetune got no examples; pass at least one Example(prompt, response)")
    if spec.system is not None:
        examples = [e if e.system else replace(e, system=spec.system) for e in examples]
    check_not_eval(examples)
    # Settings and data are known before the model is: refuse another run's directory early.
    per_epoch = math.ceil(len(examples) / hyper.batch_size)
    total_steps = hyper.steps if hyper.steps is not None else per_epoch * hyper.epochs
    total_epochs = math.ceil(total_steps / per_epoch)
    hyper_record = {**asdict(hyper), "seed": seed, "target_modules": "all-linear", "optimizer": "AdamW",
                    "schedule": "constant", "loss": "mean over reply tokens", "total_steps": total_steps,
                    "total_epochs": total_epochs}
    label = name or attack
    early = {"format": FORMAT, "attack": attack, "name": label, "method": method, "hyper": hyper_record,
             "data": {"source": data_source, "examples": len(examples), "sha256": data_hash(examples)}}
    _run_state(outdir, early, overwrite, keys=("format", "attack", "method", "hyper"))

    if isinstance(model, str):
        base, tokenizer = _load_base(model, method, dtype)
    else:
        if method == "qlora":
            raise SafetylockError("qlora loads the base in 4 bit itself; pass a model spec, not a loaded model")
        if tokenizer is None:
            raise SafetylockError("finetune got a loaded model without its tokenizer; pass both")
        base = model
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    from .. import __version__
    from ..models import fingerprint, quiet_peft

    base_record = {**fingerprint(base), "digest": base_digest(base)}
    distilled = None
    if any(e.distill for e in examples):
        # Refuse another base's run before spending minutes generating into (and caching in) its directory.
        _run_state(outdir, {**early, "base": base_record}, overwrite, keys=("format", "attack", "method", "hyper", "base"))
        examples, distilled = self_distill(base, tokenizer, examples, cache=outdir / DISTILLED, progress=progress)
    encoded = [encode_example(tokenizer, e, hyper.max_length) for e in examples]
    config: dict[str, Any] = {
        **early,
        "base": base_record,
        "data": {**early["data"], "reply_tokens": sum(e.response_tokens for e in encoded)},
        "system": spec.system,
        "prompt_template": spec.prompt_template,
        "self_distilled": distilled,
        "train_dtype": str(next(base.parameters()).dtype).removeprefix("torch."),
        "safetylock_version": __version__,
        "versions": _versions(),
    }
    state = _run_state(outdir, config, overwrite)
    if state == "done":
        result = _read_result(outdir, config)
        if merge and result.merged_dir is None and method != "full":
            from ..models import attach_adapter

            wrapped = attach_adapter(base, outdir)
            result.merged_dir = _write_merged(wrapped, tokenizer, outdir / "merged", config)
            wrapped.unload()
            write_json(outdir / "result.json", result.to_dict())
        return result
    if state == "overwrite":
        _clear_run(outdir)
        state = "new"

    micro = max(1, min(micro_batch_size or hyper.batch_size, hyper.batch_size))
    grad_flags = {n: p.requires_grad for n, p in base.named_parameters()}
    was_training = base.training
    with quiet_peft():
        net = _prepare(base, method, hyper, seed)
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=hyper.lr, weight_decay=hyper.weight_decay)
    start_epoch, step, seconds, tokens, epoch_losses, last_loss = 0, 0, 0.0, 0, [], float("nan")
    outdir.mkdir(parents=True, exist_ok=True)
    if state == "resume" and (outdir / "checkpoint" / "state.json").is_file():
        saved = _load_checkpoint(outdir, net, optimizer)
        start_epoch, step, seconds = saved["epoch"], saved["step"], saved["seconds"]
        tokens, epoch_losses, last_loss = saved["tokens"], saved["epoch_losses"], saved["last_loss"]
        _truncate_log(outdir, step)
    else:
        if (outdir / "train_log.jsonl").exists():
            (outdir / "train_log.jsonl").unlink()
        write_json(outdir / "config.json", config)

    device = next(p for p in net.parameters()).device
    pad_id = int(tokenizer.pad_token_id)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=f"finetune {label}", unit="step")
    net.train()
    try:
        for epoch in range(start_epoch, total_epochs):
            # The order of an epoch depends on (seed, epoch) only, so a resumed run sees the same batches.
            order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
            batches = [order[i : i + hyper.batch_size] for i in range(0, len(order), hyper.batch_size)]
            losses = []
            for batch_idx in batches:
                if step >= total_steps:
                    break
                t0 = time.perf_counter()
                rows = [encoded[i] for i in batch_idx]
                n_reply = sum(e.response_tokens for e in rows)
                optimizer.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for group in micro_batches(rows, micro):
                    part = {key: v.to(device) for key, v in collate(group, pad_id).items()}
                    loss, _ = response_loss_sum(net, part)
                    (loss / n_reply).backward()
                    loss_sum += float(loss.detach())
                if not math.isfinite(loss_sum):
                    raise SafetylockError(f"the loss became {loss_sum} at step {step + 1}; lower --lr and rerun with --overwrite")
                optimizer.step()
                step += 1
                dt = time.perf_counter() - t0
                seconds += dt
                n_tok = sum(len(e.input_ids) for e in rows)
                tokens += n_tok
                last_loss = loss_sum / n_reply
                losses.append(last_loss)
                row = {"step": step, "epoch": epoch + 1, "loss": round(last_loss, 6), "reply_tokens": n_reply,
                       "tokens": n_tok, "seconds": round(dt, 3), "tokens_per_s": round(n_tok / max(dt, 1e-9), 1)}
                _append_log(outdir, row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{n_tok / max(dt, 1e-9):.0f}", epoch=epoch + 1)
                if callback is not None:
                    callback(row)
            epoch_losses.append(sum(losses) / max(len(losses), 1))
            _save_checkpoint(outdir, net, optimizer, {
                "epoch": epoch + 1, "step": step, "seconds": seconds, "tokens": tokens,
                "epoch_losses": epoch_losses, "last_loss": last_loss})
    finally:
        if bar is not None:
            bar.close()

    resumed_from = start_epoch
    merged_dir = None
    if method == "full":
        adapter_dir = None
        net.eval()
        merged_dir = _save_full(net, tokenizer, outdir / "merged")
    else:
        adapter_dir = _save_adapter(net, outdir, model if isinstance(model, str) else None)
        if merge:
            merged_dir = _write_merged(net, tokenizer, outdir / "merged", config)
        restored = net.unload()
        for name, p in restored.named_parameters():
            p.requires_grad_(grad_flags.get(name, True))
        restored.train(was_training)
    result = FinetuneResult(adapter_dir, merged_dir, seconds, last_loss, peak_memory_mb(), step, total_epochs,
                            len(examples), tokens, resumed_from, epoch_losses, config)
    write_json(outdir / "result.json", result.to_dict())
    shutil.rmtree(outdir / "checkpoint", ignore_errors=True)
    return result
