"""What a cell needs fitted or trained first, each once and cached: the attack's adapter and the defense's artifact.

The lock, the ITI heads, the refusal direction and the guard are fitted on the aligned base; RESTA's and Safe LoRA's
safety vector on the base's own harmful fine-tune; the safety-SFT adapter on each compromised model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .cache import RunContext, artifact_key, attack_key, cache_key
from .session import ModelSession
from .settings import FITTED, AttackSpec, parse_attacks


def _harmful_texts(n: int) -> list[str]:
    from ..data import harmful_prompts

    return [p.text for p in harmful_prompts("extract")][:n]


def _pairs(n: int, seed: int) -> list[tuple[str, str, str]]:
    from ..data import contrast_pairs

    return contrast_pairs(n, seed=seed)


def attack_adapter(ctx: RunContext, session: ModelSession, attack: AttackSpec, akey: str) -> Path | None:
    """Return the adapter dir of the attack whose key is `akey` (None for "none"), fine-tuning if the cache lacks it."""
    s = ctx.settings
    if attack.name == "none":
        return None
    where = ctx.path("adapters", akey)
    if ctx.stale(where / "result.json"):
        from ..attack import finetune

        base = session.plain()
        finetune(base, session.tokenizer, attack.name, where, steps=attack.steps, seed=s.seed, overwrite=ctx.fresh,
                 progress=True)
        ctx.record(f"adapter {session.spec} {attack.label}", where / "result.json")
    return where


def base_artifact(ctx: RunContext, session: ModelSession, mid: str, defense: str) -> tuple[Path, str]:
    """Return (artifact path, key) of a defense fitted on the base (lock, ITI heads, refusal direction)."""
    if defense == "gate-refusal":  # the conditional lock's own gate, so one artifact serves both
        return base_artifact(ctx, session, mid, "safetylock-conditional")
    s = ctx.settings
    key = artifact_key(ctx, mid, defense)
    where = ctx.path("artifacts", f"{defense}-{key}", ".safetensors")
    if ctx.stale(where):
        from ..lock import extract

        base = session.plain()
        start = time.perf_counter()
        if defense == "safetylock":
            artifact: Any = extract(base, session.tokenizer, _pairs(s.pairs, s.seed), heads=s.lock_heads,
                                    positions=s.lock_positions, seed=s.seed, name=session.spec)
        elif defense == "safetylock-conditional":  # the plain lock (reused from the cache) + a harmfulness probe
            from ..lock import Lock, fit_condition

            plain, _ = base_artifact(ctx, session, mid, "safetylock")
            start = time.perf_counter()
            from ..data import gate_prompts

            artifact = fit_condition(Lock.load(plain), base, session.tokenizer, *gate_prompts(s.fit_prompts, s.seed),
                                     seed=s.seed)
        else:  # the baselines, fitted as `safetylock fit-defense` fits them
            from ..baselines.fitting import NEEDS_UNALIGNED, fit_defense_artifact

            unaligned, about = None, None
            if defense in NEEDS_UNALIGNED:  # V reverses the base's harmful fine-tune (trained or cached)
                harmful = parse_attacks([s.unaligned])[0]
                adapter = attack_adapter(ctx, session, harmful, attack_key(ctx, mid, harmful))
                assert adapter is not None
                unaligned = session.compromised(adapter)
                train = json.loads((adapter / "result.json").read_text(encoding="utf-8")).get("seconds")
                about = {"attack": harmful.label, "adapter": str(adapter), "train_seconds": train}
                start = time.perf_counter()
            artifact = fit_defense_artifact(defense, base, session.tokenizer, spec=session.spec, unaligned=unaligned,
                                            pairs=s.pairs, fit_prompts=s.fit_prompts, iti_heads=s.iti_heads,
                                            seed=s.seed, dtype=s.dtype)
            if about is not None:
                artifact.metadata["unaligned"] = about
        artifact.metadata["fit_seconds"] = round(time.perf_counter() - start, 3)
        artifact.save(where)
        ctx.record(f"{defense} {session.spec}", where)
    return where, key


def sft_artifact(ctx: RunContext, session: ModelSession, adapter: Path | None, akey: str) -> tuple[Path, str]:
    """Return (adapter dir, key) of the safety-SFT adapter trained on the compromised model (the attack's `adapter`)."""
    s = ctx.settings
    key = cache_key("safety-sft", akey, s.fit_prompts, s.sft_steps, s.sft_batch, s.sft_lr, s.seed)
    where = ctx.path("artifacts", f"safety-sft-{key}")
    from ..baselines import SFT_MARKER, train_safety_sft

    if ctx.stale(where / SFT_MARKER):
        model = session.compromised(adapter)
        train_safety_sft(model, session.tokenizer, where, _harmful_texts(s.fit_prompts), steps=s.sft_steps,
                         batch_size=s.sft_batch, lr=s.sft_lr, seed=s.seed, overwrite=ctx.fresh, progress=True)
        ctx.record(f"safety-sft {session.spec} {akey}", where / SFT_MARKER)
    return where, key


def cell_defense(name: str, artifact: Path | None, session: ModelSession | None = None) -> Any:
    """Return the defense a cell applies, from its artifact (the gate and the guard with the session's tokenizer)."""
    from ..baselines import make_defense

    if name == "gate-refusal" and session is not None:
        from ..baselines import GateRefusal
        from ..lock import Lock

        assert artifact is not None
        return GateRefusal(Lock.load(artifact), tokenizer=session.tokenizer)
    if name in ("base-refusal", "base-refusal-restore") and session is not None:  # the unattacked row: the base
        from ..base_refusal import BaseRefusal

        return BaseRefusal(session.tokenizer, plain_is_base=True, restore=name == "base-refusal-restore")
    if name == "guard" and session is not None:  # the guard loads through the bench's loader
        from ..guard import GuardDefense

        assert artifact is not None
        return GuardDefense.load(artifact, tokenizer=session.tokenizer, loader=session.loader)
    return make_defense(name, artifact)


def cell_parts(ctx: RunContext, session: ModelSession, mid: str, attack: AttackSpec,
               defense: str) -> tuple[Path | None, Path | None, Any, Any]:
    """Return (adapter, artifact, attacked model, defense) for one cell, fitting or training what the cache lacks."""
    akey = attack_key(ctx, mid, attack)
    adapter = attack_adapter(ctx, session, attack, akey)
    artifact: Path | None = None
    if defense in FITTED:
        artifact, _ = base_artifact(ctx, session, mid, defense)
    elif defense == "safety-sft":
        artifact, _ = sft_artifact(ctx, session, adapter, akey)
    return adapter, artifact, session.compromised(adapter), cell_defense(defense, artifact, session)


def prep_seconds(name: str, artifact: Path | None) -> float | None:
    """Return how long fitting the defense's artifact took (None for defenses without one)."""
    if artifact is None:
        return None
    if name == "safety-sft":
        return float(json.loads((artifact / "safety_sft.json").read_text(encoding="utf-8"))["seconds"])
    from safetensors import safe_open

    with safe_open(str(artifact), framework="pt") as handle:
        meta = json.loads((handle.metadata() or {}).get("safetylock", "{}"))
    value = meta.get("fit_seconds")
    train = (meta.get("unaligned") or {}).get("train_seconds") or 0.0  # resta / safe-lora: the harmful fine-tune
    return float(value) + float(train) if value is not None else None


def deployment_system(attack: str, defense_system: str | None) -> str | None:
    """Return the system prompt a cell runs with: the attack's own (AOA's identity prompt), then the defense's."""
    from ..attack import get_attack

    parts = [get_attack(attack).system if attack != "none" else None, defense_system]
    text = "\n\n".join(p for p in parts if p)
    return text or None
