"""Lock research: extract once, then sweep (K, alpha, positions, conditional) on an attacked model.

Env: BASE, ADAPTER, LOCKF, POS, NP (pairs), N (prompts of each kind), TOK, XDTYPE, CONFIGS (JSON list of
[K, alpha, "all"|"generation", conditional] or ["none"]). See bench/LOCK_RESEARCH.md for the runs."""
import json, os, time
import torch
from safetylock.models import load_model, attach_adapter
from safetylock.lock import Lock, extract, fit_condition
from safetylock.data import contrast_pairs, harmful_prompts, harmless_prompts, load_benchmark
from safetylock.generate import generate
from safetylock.judges import get_judge

BASE = os.environ.get("BASE", "qwen2.5-coder-1.5b-instruct")
ADAPTER = os.environ.get("ADAPTER")
LOCKF = os.environ.get("LOCKF", "runs/locks/research-1.5b.safetensors")
POS = os.environ.get("POS", "response:1-8")
NP = int(os.environ.get("NP", "128"))
N = int(os.environ.get("N", "16"))
TOK = int(os.environ.get("TOK", "24"))
CONFIGS = json.loads(os.environ.get("CONFIGS", '[["none"]]'))
torch.manual_seed(0)
if not os.path.exists(LOCKF):
    m, t = load_model(BASE, dtype=os.environ.get("XDTYPE", "fp32"))
    t0 = time.time()
    lk = extract(m, t, contrast_pairs(NP), heads=100000, positions=POS, progress=True, name=BASE)
    harmful = [p.text for p in harmful_prompts("extract")][-64:]
    harmless = [p.text for p in harmless_prompts("extract")][:64]
    lk = fit_condition(lk, m, t, harmful, harmless, progress=True)
    print("extract s", time.time() - t0, lk.gate.condition() if lk.gate else None, flush=True)
    lk.save(LOCKF)
    del m
lk = Lock.load(LOCKF)
m, t = load_model(BASE, dtype="fp32")
if ADAPTER:
    m = attach_adapter(m, ADAPTER)
train = set()
hp = [p.text for p in load_benchmark("advbench", "extract")][:N]
bp = [p.text for p in load_benchmark("overrefusal", "extract")][:N]
judge = get_judge("relevance")
def sub(k):
    return lk.select(range(min(k, len(lk))))  # the top-k heads by rank; k past the lock's size keeps them all
if lk.has_condition:
    fl = lk.flagged(m, t, hp + bp)
    print("gate flags harmful", fl[:N].float().mean().item(), "benign", fl[N:].float().mean().item(), flush=True)
for cfg in CONFIGS:
    t0 = time.time()
    if cfg[0] == "none":
        r = generate(m, t, hp + bp, max_new_tokens=TOK, batch_size=16)
    else:
        k, a, mode, cond = cfg
        with sub(k).applied(m, alpha=a, shift_at=mode, conditional=cond):
            r = generate(m, t, hp + bp, max_new_tokens=TOK, batch_size=16)
    texts = [g.text for g in r.generations]
    v = [j.refused for j in judge.judge_many(hp + bp, texts)]
    h, b = sum(v[:N]) / N, sum(v[N:]) / N
    distinct = len({x[:30] for x in texts}) / len(texts)
    print(json.dumps({"cfg": cfg, "refuse_harmful": h, "refuse_benign": b, "distinct": distinct, "s": round(time.time() - t0)}), flush=True)
    print("   B:", " || ".join(x[:60].replace("\n", " ") for x in texts[N:N+3]), flush=True)
    # replies to harmful prompts are not printed: they stay out of logs that may be committed
