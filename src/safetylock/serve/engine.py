"""The engine: one worker thread that owns the locked base and its adapters and generates queued jobs in batches."""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..arch import o_proj_path
from ..base_refusal import base_reply_ids, check_tokens, refusing
from ..deployment import Deployment
from ..errors import SafetylockError, check_alpha
from ..generate import eos_token_ids, model_device
from ..screen import REFUSAL_MESSAGE, message_token_ids
from .adapters import ADAPTER_NAME, _module_paths_ancestors, _recorded_base, _weights_digest
from .api import ApiError
from .jobs import Event, Job
from .metrics import Metrics


@dataclass
class _Row:
    job: Job
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already emitted
    live: bool = True


def _chat_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """Return the prompt text for a whole conversation, open for the assistant's reply (as `format_chat`)."""
    if tokenizer.chat_template is None:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _context_length(model: Any) -> int:
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _failure(exc: Exception) -> str:
    """Return the error text a request gets when its generation fails."""
    return f"generation failed ({type(exc).__name__}: {str(exc)[:200]})"


class Engine:
    """Owns a locked base model, its adapters, the request queue and the worker thread that generates."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        lock: Any,
        *,
        alpha: float | None = None,
        name: str = "base",
        max_batch: int = 8,
        max_prompt_tokens: int | None = None,
        max_queue: int = 256,
        batch_window: float = 0.005,
        force: bool = False,
        conditional: bool = False,
        base_refusal: int | None = None,
        refusal_message: str = REFUSAL_MESSAGE,
    ) -> None:
        if max_batch < 1:
            raise SafetylockError("max_batch must be at least 1")
        alpha = None if alpha is None else check_alpha(alpha, "--alpha")  # -3 would bake an unlock
        self.base = model
        self.tokenizer = tokenizer
        self.lock = lock
        self.name = name
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_window = batch_window
        self.context_length = _context_length(model)
        self.max_prompt_tokens = min(max_prompt_tokens or self.context_length - 1, self.context_length - 1)
        self.metrics = Metrics()
        self.adapters: dict[str, str] = {}
        self.peft: Any = None
        self.eos = set(eos_token_ids(model, tokenizer))
        self.device = model_device(model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos)
        self._model_lock = threading.Lock()  # the worker's batches and adapter loads take turns
        self._tok_lock = threading.Lock()  # fast tokenizers are not safe to call from two threads
        self._cv = threading.Condition()
        self._pending: list[Job] = []
        self._closed = False
        self.metrics.queue_depth = lambda: len(self._pending)
        # The base-refusal screen (base_refusal.py) for adapter requests: the served base, the adapter off, writes
        # its first `base_refusal` reply tokens; where they refuse, the request gets `refusal_message` instead.
        self.base_refusal = None if base_refusal is None else check_tokens(base_refusal)
        self.refusal_ids = message_token_ids(tokenizer, refusal_message)

        self.digest = _weights_digest(model)  # before baking: adapters record the unlocked base's digest
        self.conditional = conditional
        # Baked into the base, or runtime hooks gated by the lock's harmfulness probe (benign prompts run unshifted).
        # Either way the deployment keeps the record of exactly what it changed, which `lock_intact` reads.
        self.deployment = Deployment(name, lock=lock, mode="conditional" if conditional else "baked", alpha=alpha,
                                     force=force, model=model, tokenizer=tokenizer)
        self.deployment.open()
        assert self.deployment.record is not None
        self.alpha = self.deployment.record.alpha
        self._locked_modules = {o_proj_path(model, layer) for layer in self.deployment.record.layers}
        model.eval()
        self._worker = threading.Thread(target=self._run, name="safetylock-serve-worker", daemon=True)
        self._worker.start()

    @classmethod
    def from_spec(cls, spec: str, lock_path: str | Path | Any, *, alpha: float | None = None,
                  adapters: dict[str, str] | None = None, dtype: str = "auto", device: str | None = None,
                  name: str | None = None, conditional: bool | None = False, base_refusal: int | None = None,
                  **options: Any) -> Engine:
        """Return an engine for a model spec with the lock file applied and the adapters loaded.

        `conditional` None applies the lock the way `resolve_mode` picks (conditional with a harmfulness probe).
        `lock_path` is a lock file or a `Lock` already read (the CLI reads it once to pick its defaults).
        """
        from ..deployment import resolve_mode
        from ..lock import Lock
        from ..models import load_model

        if alpha is not None:  # before the model loads, which takes minutes for a real one
            alpha = check_alpha(alpha, "--alpha")
        if base_refusal is not None:
            base_refusal = check_tokens(base_refusal)
        lock = lock_path if isinstance(lock_path, Lock) else Lock.load(Path(lock_path))
        if conditional is None:
            conditional = resolve_mode(lock, None) == "conditional"
        elif conditional and not lock.has_condition:
            where = "this lock" if isinstance(lock_path, Lock) else str(lock_path)
            raise SafetylockError(f"{where} has no harmfulness probe; extract it with --conditional to serve it so")
        model, tokenizer = load_model(spec, dtype=dtype, device=device)
        served = name or (Path(spec).name if Path(spec).expanduser().exists() else spec)
        engine = cls(model, tokenizer, lock, alpha=alpha, name=served, conditional=conditional,
                     base_refusal=base_refusal, **options)
        try:
            for adapter_name, path in (adapters or {}).items():
                engine.add_adapter(adapter_name, path)
        except Exception:
            engine.close()
            raise
        return engine

    # -- the lock ---------------------------------------------------------------------------------------

    def lock_intact(self) -> bool:
        """Return whether the lock is exactly as applied: every baked bias holds its value, or every hook is in place."""
        return self.deployment.intact()

    def lock_info(self) -> dict[str, Any]:
        """Return the lock as the admin sees it (/health, /v1/models): alpha, fingerprint, what is baked, the mode."""
        return {"locked": True, **{k: v for k, v in self.deployment.status().items() if k != "locked"},
                "base_refusal_tokens": self.base_refusal}

    # -- adapters ---------------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [self.name, *self.adapters]

    def adapter_mismatch(self, adapter_dir: Path) -> str | None:
        """Return why a LoRA adapter cannot run on the locked base, or None when it can."""
        from safetensors import safe_open

        from ..models import adapter_mismatch

        config_file = adapter_dir / "adapter_config.json"
        if not config_file.is_file():
            return f"{adapter_dir} is not a LoRA adapter directory (no adapter_config.json)"
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            return f"adapter_config.json is unreadable ({exc})"
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            return f"only LoRA adapters can be served (this one is {config.get('peft_type')})"
        if str(config.get("bias", "none")) != "none":
            return f"the adapter trains biases (bias={config.get('bias')!r}), which would overwrite the baked lock"
        for entry in config.get("modules_to_save") or []:
            for path in self._locked_modules:
                if any(a == entry or a.endswith("." + entry) for a in _module_paths_ancestors(path)):
                    return f"modules_to_save '{entry}' would replace the locked module '{path}'"
        recorded = _recorded_base(adapter_dir)
        if recorded:
            lock_fp = (getattr(self.lock, "metadata", {}) or {}).get("fingerprint") or {}
            keys = [k for k in recorded if k in lock_fp and k != "name" and recorded[k] != lock_fp[k]]
            if keys:
                diff = ", ".join(f"{k}: adapter {recorded[k]} vs lock {lock_fp[k]}" for k in keys[:3])
                return f"it was trained on another base than the lock's ({diff})"
            if self.digest and recorded.get("digest") and recorded["digest"] != self.digest:
                return (f"it was trained on a base with other weights (digest {recorded['digest']} vs "
                        f"{self.digest}); serve it on the base (and dtype) it was trained on")
        why = adapter_mismatch(self.base, adapter_dir)
        if why:
            return why
        weights = adapter_dir / "adapter_model.safetensors"
        if not weights.is_file():
            return "no adapter_model.safetensors (only safetensors adapters are served)"
        modules = dict(self.base.named_modules())
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():
                path = key.removeprefix("base_model.model.")
                if ".lora_B." in key:
                    module = modules.get(path.split(".lora_B.")[0])
                    out = handle.get_slice(key).get_shape()[0]
                    if module is not None and getattr(module, "out_features", out) != out:
                        return f"'{path.split('.lora_B.')[0]}' gives {module.out_features} outputs, the adapter expects {out}"
                elif ".lora_" not in key:
                    return f"the adapter carries a non-LoRA weight '{key}'; only LoRA weights are served"
        return None

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Load a LoRA adapter under `name` after checking it fits the locked base and leaves the lock alone."""
        from peft import PeftModel

        from ..models import quiet_peft

        if not ADAPTER_NAME.match(name or ""):
            raise SafetylockError(f"adapter name '{name}' is not valid; use letters, digits and . _ : - (at most 64)")
        adapter_dir = Path(path).expanduser()
        if not adapter_dir.is_dir():
            raise SafetylockError(f"adapter directory {adapter_dir} does not exist")
        with self._model_lock:
            if name in self.names:
                raise SafetylockError(f"a model named '{name}' is already served")
            why = self.adapter_mismatch(adapter_dir)
            if why:
                self.metrics.add(adapters_rejected=1)
                raise SafetylockError(f"adapter {adapter_dir} does not fit the locked base: {why}")
            try:
                with quiet_peft():
                    if self.peft is None:
                        self.peft = PeftModel.from_pretrained(self.base, str(adapter_dir), adapter_name=name)
                    else:
                        self.peft.load_adapter(str(adapter_dir), adapter_name=name)
                self.peft.eval()
            except Exception as exc:
                self._drop_adapter(name)
                self.metrics.add(adapters_rejected=1)
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise SafetylockError(f"could not load adapter {adapter_dir}: {first}") from None
            if not self.lock_intact():
                self._drop_adapter(name)
                self.metrics.add(adapters_rejected=1)
                raise SafetylockError(f"adapter {adapter_dir} changed the baked lock; it was unloaded")
            self.adapters[name] = str(adapter_dir)
            self.metrics.add(adapters_added=1)

    def _drop_adapter(self, name: str) -> None:
        if self.peft is not None and name in getattr(self.peft, "peft_config", {}):
            with contextlib.suppress(Exception):
                self.peft.delete_adapter(name)

    # -- requests ---------------------------------------------------------------------------------------

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """Return the prompt token ids of a conversation under the model's chat template."""
        with self._tok_lock:
            text = _chat_text(self.tokenizer, messages)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def submit(self, job: Job) -> None:
        """Queue a job for the worker."""
        with self._cv:
            if self._closed:
                raise ApiError(503, "the server is shutting down", code="shutting_down", kind="server_error")
            if len(self._pending) >= self.max_queue:
                raise ApiError(429, f"the queue is full ({self.max_queue} waiting); retry later",
                               code="queue_full", kind="rate_limit_error")
            self._pending.append(job)
            self._cv.notify()

    def close(self) -> None:
        """Stop the worker; waiting jobs get an error event."""
        with self._cv:
            self._closed = True
            waiting, self._pending = self._pending, []
            self._cv.notify_all()
        for job in waiting:
            job.send(Event("error", "the server is shutting down"))
        self._worker.join(timeout=30)
        self.deployment.close()

    def _next_batch(self) -> list[Job] | None:
        with self._cv:
            while not self._pending and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
        if self.batch_window > 0:
            time.sleep(self.batch_window)  # requests sent together arrive a few ms apart
        with self._cv:
            self._pending = [j for j in self._pending if not j.cancelled.is_set()]
            if not self._pending:
                return []
            head = self._pending[0].model
            batch = [j for j in self._pending if j.model == head][: self.max_batch]
            taken = {id(j) for j in batch}
            self._pending = [j for j in self._pending if id(j) not in taken]
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._serve(batch)

    def _serve(self, batch: list[Job]) -> None:
        """Generate a batch; if it fails, run each request it had not yet answered alone, so only the bad one errors."""
        try:
            with self._model_lock:
                self.metrics.batch(len(batch))
                self._generate(batch)
        except Exception as exc:  # one bad batch must never take the server down, nor its other requests
            self.metrics.add(generation_errors=1)
            message = _failure(exc)
            for job in batch:
                if job.answered:
                    continue
                if len(batch) > 1 and not job.heard:
                    self._serve([job])
                else:  # alone it is the cause; with text already sent a rerun could not take it back
                    job.send(Event("error", message))

    def _model_for(self, name: str) -> tuple[Any, contextlib.AbstractContextManager[Any]]:
        if self.peft is None:
            return self.base, contextlib.nullcontext()
        if name == self.name:
            return self.peft, self.peft.disable_adapter()
        self.peft.set_adapter(name, inference_mode=True)
        return self.peft, contextlib.nullcontext()

    def _padded(self, jobs: list[Job]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the jobs' prompts left-padded into (ids, mask) on the model's device."""
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for r, job in enumerate(jobs):
            ids[r, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids, dtype=torch.long)
            mask[r, width - len(job.prompt_ids):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _screened(self, jobs: list[Job]) -> list[Job]:
        """Answer the adapter jobs whose prompt the served base starts to refuse with the fixed refusal; return the rest."""
        assert self.base_refusal is not None
        ids, mask = self._padded(jobs)
        first = base_reply_ids(self.peft, ids, mask, self.base_refusal, self.pad_id)
        flags = refusing([self._decode([int(t) for t in row if int(t) != self.pad_id]) for row in first]).tolist()
        self.metrics.add(screened_requests=len(jobs), screen_refusals=sum(flags))
        for job, flagged in zip(jobs, flags):
            if flagged and not job.cancelled.is_set():
                shown = self.refusal_ids[: job.max_tokens]
                job.send(Event("delta", self._decode(shown)))
                job.send(Event("done", finish_reason="stop" if len(shown) == len(self.refusal_ids) else "length",
                               completion_tokens=len(shown)))
        return [job for job, flagged in zip(jobs, flags) if not flagged]

    @torch.inference_mode()
    def _generate(self, jobs: list[Job]) -> None:
        """Generate a batch of jobs for one model, left-padded, emitting each row's text as it grows."""
        if self.base_refusal is not None and self.peft is not None and jobs[0].model != self.name:
            jobs = self._screened(jobs)
            if not jobs:
                return
        rows = []
        for job in jobs:
            generator = None
            if job.temperature > 0:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(job.seed if job.seed is not None else secrets.randbits(63))
            rows.append(_Row(job, generator))
        ids, mask = self._padded(jobs)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        model, context = self._model_for(jobs[0].model)
        cache = None
        with context:
            for _ in range(max(j.max_tokens for j in jobs)):
                out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                            use_cache=True, logits_to_keep=1)
                cache = out.cache
                logits = out.logits[:, -1, :].float()
                chosen = logits.argmax(-1)
                for r, row in enumerate(rows):
                    if not row.live:
                        continue
                    if row.job.cancelled.is_set():
                        row.live = False
                        continue
                    try:  # a row's own failure ends that row only
                        token = int(chosen[r]) if row.generator is None else self._sample(logits[r], row)
                        chosen[r] = token
                        self._advance(row, token)
                    except Exception as exc:
                        row.live = False
                        self.metrics.add(generation_errors=1)
                        row.job.send(Event("error", _failure(exc)))
                if not any(row.live for row in rows):
                    break
                ids = chosen[:, None]
                mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
                positions = positions[:, -1:] + 1
        for row in rows:
            if row.live:  # only reachable if max_tokens ran out on the last step
                self._finish(row, "length")

    @staticmethod
    def _sample(logits: torch.Tensor, row: _Row) -> int:
        # In float64, where every positive temperature is > 0 (1e-300 is 0 in float32), and shifted so the top
        # logit is 0: a tiny temperature then gives 0 and -inf, not inf - inf = NaN.
        logits = logits.double()
        probs = torch.softmax((logits - logits.max()) / row.job.temperature, dim=-1)
        if row.job.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < row.job.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _advance(self, row: _Row, token: int) -> None:
        job = row.job
        if token in self.eos:
            self._emit(row, self._decode(row.ids))
            self._finish(row, "stop", counted=len(row.ids) + 1)
            return
        row.ids.append(token)
        text = self._decode(row.ids)
        hits = [i for i in (text.find(s) for s in job.stop) if i >= 0]
        if hits:
            self._emit(row, text[: min(hits)])
            self._finish(row, "stop")
            return
        if len(row.ids) >= job.max_tokens:
            self._emit(row, text)
            self._finish(row, "length")
            return
        # Hold back what could still become a stop string, and a trailing half of a UTF-8 character.
        hold = max((len(s) for s in job.stop), default=1) - 1
        stable = text.rstrip("\ufffd")
        self._emit(row, stable[: max(0, len(stable) - hold)])

    def _emit(self, row: _Row, text: str) -> None:
        if len(text) > row.sent:
            row.job.send(Event("delta", text[row.sent:]))
            row.sent = len(text)

    @staticmethod
    def _finish(row: _Row, reason: str, counted: int | None = None) -> None:
        row.live = False
        row.job.send(Event("done", finish_reason=reason, completion_tokens=counted or len(row.ids)))
