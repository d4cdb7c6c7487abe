"""A deployment: the one way a lock or a baseline defense goes onto a model, and comes off again.

`Deployment(spec, adapter=..., lock=... or defense=..., mode=..., alpha=..., dtype=...)` names what runs.
`open()` loads the model (unless one is handed in), applies the lock (baked into the o_proj biases, or
conditionally by run-time hooks) or the defense, and returns the ready model; `close()` takes it off again
from the record the apply returned, so the model computes exactly what it did before. `describe()` is what
an eval pins in config.json, `status()` what the server shows its admin. The CLI (chat, eval), `run_eval`,
the server, `calibrate`, the bench, the demo and `baselines.LockDefense` all apply a lock through here.

The lock file is read once, when the deployment is made: its mode and every check come from that copy.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .errors import SafetylockError, check_alpha
from .files import sha256_file, sha256_text

if TYPE_CHECKING:
    from .baselines import Defense
    from .lock import BakeRecord, HookRecord, Lock

MODES = ("baked", "conditional", "base-refusal")


def content_hash(path: str | Path | None) -> str | None:
    """Return the sha256 of a file, or of a directory's files (names and bytes, sorted); None for no path."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return sha256_text(*(f"{p.relative_to(path)}:{sha256_file(p)}" for p in files))
    return None


def resolve_mode(lock: Lock, mode: str | None, base_at_hand: bool = False) -> str:
    """Return how `lock` goes onto a model: `mode` when given, else the runtime default.

    The default where the aligned base can be asked (`base_at_hand`: the fine-tune is a LoRA adapter on it, or
    the base is loaded beside a merged fine-tune) is "base-refusal": the base writes the first reply tokens of
    each prompt, and where they refuse the user gets a fixed refusal (`base_refusal.BaseRefusal`). Out of
    distribution it is the one design that held every fine-tune's harm at the base's rate (README
    "Out-of-distribution results"), where the lock's gate, fit on two prompt sources, rarely fired. With no
    base to ask: conditional for a lock with a harmfulness probe, else baked.
    """
    if mode is None:
        if base_at_hand:
            return "base-refusal"
        return "conditional" if lock.has_condition else "baked"
    if mode not in MODES:
        raise SafetylockError(f"a lock applies {', '.join(MODES[:-1])} or {MODES[-1]}, not '{mode}'")
    return mode


class Deployment:
    """A model to run and what protects it: spec + adapter + a lock (baked or conditional) or a baseline defense.

    `lock` is a lock file or a `Lock`; `mode` "baked", "conditional" or "base-refusal" (None: base-refusal where
    the base can be asked, else conditional when the lock has a harmfulness probe, else baked; `resolve_mode`).
    `defense` is a baseline's name (built from `defense_file` by `make_defense`) or a `Defense`. `model` (and
    `tokenizer`) hand in a model already loaded, which `open` then uses instead of loading `spec`.
    `base_model` (a spec or a loaded model) is the aligned base the base-refusal screen asks when the fine-tune
    is merged or fully fine-tuned (an adapter's own base is asked with the adapter off). `force` as in `Lock.validate`: off, a model that does not descend from the lock's base is
    refused. Also a context manager: `with Deployment(...) as model: ...`.
    """

    def __init__(
        self,
        spec: str | None = None,
        *,
        adapter: str | Path | None = None,
        lock: str | Path | Lock | None = None,
        mode: str | None = None,
        defense: str | Defense | None = None,
        defense_file: str | Path | None = None,
        alpha: float | None = None,
        dtype: str = "auto",
        device: str | None = None,
        force: bool = False,
        model: Any = None,
        tokenizer: Any = None,
        base_model: str | Path | Any = None,
    ) -> None:
        if spec is None and model is None:
            raise SafetylockError("a deployment needs a model spec or a loaded model")
        if defense is not None and mode is not None:
            raise SafetylockError("--conditional/--baked apply to --lock; with --defense use --defense "
                                  "safetylock-conditional or --defense safetylock")
        if lock is None and mode is not None:
            flag = "--conditional" if mode == "conditional" else "--baked"
            raise SafetylockError(f"{flag} needs --lock LOCK (it says how the lock applies)")
        if defense is None and defense_file is not None:
            raise SafetylockError("--defense-file needs --defense NAME")
        if lock is not None and defense is not None:
            raise SafetylockError("pass either --lock or --defense (use --defense safetylock --defense-file LOCK)")
        if base_model is not None and lock is None:
            raise SafetylockError("--base-model is the aligned base the base-refusal screen asks: it goes with --lock "
                                  "(the screen is then the default)")
        self.base_model = base_model  # a spec, or a loaded model; loaded in open() and let go in close()
        self.spec = spec if spec is not None else str(getattr(model, "safetylock_spec", None) or "")
        self.adapter = Path(adapter) if adapter is not None else None
        self.dtype = dtype
        self.device = device
        self.force = force
        self.alpha = check_alpha(alpha, "alpha") if lock is not None and alpha is not None else alpha
        self.lock_path: Path | None = None
        self.lock: Lock | None = None
        self.mode: str | None = None
        if lock is not None:
            from .lock import Lock as _Lock

            self.lock_path = None if isinstance(lock, _Lock) else Path(lock)
            self.lock = lock if isinstance(lock, _Lock) else _Lock.load(Path(lock))
            from .arch import has_adapter

            on_adapter = adapter is not None or (model is not None and has_adapter(model))
            self.mode = resolve_mode(self.lock, mode, base_at_hand=on_adapter or base_model is not None)
            if self.mode == "base-refusal" and alpha is not None:
                raise SafetylockError("--alpha is the lock's strength; the base-refusal screen (the default on an "
                                      "adapter) has none: leave --alpha out, or pass --conditional or --baked")
            if self.mode == "conditional" and not self.lock.has_condition:
                where = str(self.lock_path) if self.lock_path is not None else "this lock"
                raise SafetylockError(f"{where} has no harmfulness probe; extract it without --no-conditional, "
                                      "or pass --baked")
        self.defense_file = Path(defense_file) if defense_file is not None else None
        self.defense: Defense | None
        if isinstance(defense, str):
            from .baselines import make_defense

            self.defense = make_defense(defense, self.defense_file, force=force)
            self.defense_name: str | None = defense
        else:
            self.defense = defense
            self.defense_name = defense.name if defense is not None else None
        self._given = (model, tokenizer) if model is not None else None
        self.model: Any = None
        self.tokenizer: Any = tokenizer
        self.record: BakeRecord | HookRecord | None = None
        self.screen: Any = None  # the BaseRefusal in force in "base-refusal" mode (its counts after a run)
        self.apply_seconds: float | None = None
        self._stack: contextlib.ExitStack | None = None

    # -- what it is -------------------------------------------------------------------------------------

    @property
    def system(self) -> str | None:
        """The defense's system prompt (self-reminder), or None."""
        return self.defense.system if self.defense is not None else None

    @property
    def is_open(self) -> bool:
        return self._stack is not None

    def describe(self) -> dict[str, Any]:
        """Return what this deployment runs, as JSON: every setting that changes a reply, with its files' hashes.

        These are the keys an eval pins in config.json (`lock_mode` only with a lock), so a resumed run never
        mixes deployments; `alpha` is the one asked for (None: the lock's own).
        """
        out: dict[str, Any] = {
            "model": self.spec,
            "adapter": str(self.adapter) if self.adapter is not None else None,
            "lock": str(self.lock_path) if self.lock_path is not None else None,
            "adapter_sha256": content_hash(self.adapter),
            "lock_sha256": content_hash(self.lock_path),
            "defense": self.defense_name,
            "defense_file": str(self.defense_file) if self.defense_file is not None else None,
            "defense_sha256": content_hash(self.defense_file),
            "alpha": self.alpha,
            "dtype": self.dtype,
        }
        if self.base_model is not None:
            out["base_model"] = str(self.base_model) if isinstance(self.base_model, (str, Path)) else "(loaded)"
        if self.lock is not None:
            out["lock_mode"] = self.mode
        return out

    def status(self) -> dict[str, Any]:
        """Return the lock as applied now: its alpha, its base's fingerprint (no sketch), what is baked, the mode."""
        from .lock import BakeRecord

        record = self.record
        fingerprint = {k: v for k, v in (self.lock.fingerprint if self.lock is not None else {}).items()
                       if k != "sketch"}  # the sketch is 3 KB of floats
        return {"locked": record is not None, "alpha": record.alpha if record is not None else self.alpha,
                "fingerprint": fingerprint, "baked_parameters": len(record) if isinstance(record, BakeRecord) else 0,
                "conditional": self.mode == "conditional", "mode": self.mode}

    def intact(self) -> bool:
        """Return whether the applied lock is still exactly in place (its baked biases, or all its hooks)."""
        return self.record is not None and self.record.intact()

    # -- putting it on and taking it off ------------------------------------------------------------------

    def open(self) -> Any:
        """Return the ready model: loaded (unless handed in), with the lock or defense applied."""
        if self._stack is not None:
            raise SafetylockError("this deployment is already open; close it first")
        stack = contextlib.ExitStack()
        try:
            if self._given is not None:
                model, tokenizer = self._given
            else:
                from .models import load_model

                model, tokenizer = load_model(self.spec, adapter=self.adapter, dtype=self.dtype, device=self.device)
            base = self._base_model() if self.mode == "base-refusal" else None  # a load, not timed as applying
            start = time.perf_counter()
            ready = model
            if self.mode == "base-refusal":
                ready = stack.enter_context(self._screen(model, tokenizer, base))
            elif self.lock is not None:
                record = self._apply_lock(model)
                stack.callback(record.undo)
                self.record = record
            elif self.defense is not None:
                ready = stack.enter_context(self.defense.applied(model, self.alpha))
            self.apply_seconds = time.perf_counter() - start
        except BaseException:
            self.record = None
            stack.close()
            raise
        self._stack = stack
        self.model, self.tokenizer = ready, tokenizer
        return ready

    def _apply_lock(self, model: Any) -> BakeRecord | HookRecord:
        from .lock.apply import bake, install

        assert self.lock is not None
        if self.mode == "conditional":
            return install(self.lock, model, self.alpha, conditional=True, force=self.force)
        return bake(self.lock, model, self.alpha, self.force)

    def _screen(self, model: Any, tokenizer: Any, base: Any) -> contextlib.AbstractContextManager[Any]:
        """Return the base-refusal screen's context on `model`, once the lock's passport check passes.

        The lock's shift is not applied in this mode; the lock still says which base the fine-tune must descend
        from, so a screen never runs on a model the lock was not made for, nor asks a base that is not the lock's."""
        from .base_refusal import BaseRefusal

        assert self.lock is not None
        self.lock.validate(model, force=self.force)
        if base is not None:
            self.lock.validate(base, force=self.force)
        screen = BaseRefusal(tokenizer, base=base)
        self.screen = screen
        return screen.applied(model)

    def _base_model(self) -> Any:
        """Return the aligned base to ask as a second model (loaded from its spec at each open), or None."""
        if self.base_model is None or not isinstance(self.base_model, (str, Path)):
            return self.base_model
        from .models import load_model

        base, _ = load_model(str(self.base_model), dtype=self.dtype, device=self.device)
        return base

    def close(self) -> None:
        """Take the lock or defense off exactly (from its record), and let go of the model; a no-op when closed."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        try:
            stack.close()
        finally:
            self.record = None
            self.model = None
            if self.screen is not None:
                self.screen.base = None  # let go of a second model; its counts stay readable
            if self._given is None:
                self.tokenizer = None

    def __enter__(self) -> Any:
        return self.open()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


__all__ = ["MODES", "Deployment", "content_hash", "resolve_mode"]
