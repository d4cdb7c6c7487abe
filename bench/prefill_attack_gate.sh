# The prefilling attack against the conditional lock, the gate reading the last tokens (before) or the template
# tokens found by their ids (now); bench/PREFILL_ATTACK.md. Needs runs/bench-cache from bench/RERUN.md section 1.
set -e
L=runs/bench-cache/artifacts/safetylock-conditional-e6687922e4fdbcabcd08417e.safetensors
A=runs/bench-cache/adapters/f56600b09d67e13b28125029
M=qwen2.5-coder-0.5b-instruct
.venv/bin/python - <<'PY'
from dataclasses import replace
from transformers import AutoTokenizer
from safetylock.lock import Lock
from safetylock.lock.positions import template_token_ids
from safetylock.models import model_source
lock = Lock.load("runs/bench-cache/artifacts/safetylock-conditional-e6687922e4fdbcabcd08417e.safetensors")
tok = AutoTokenizer.from_pretrained(str(model_source("qwen2.5-coder-0.5b-instruct")))
lock.with_gate(replace(lock.gate, template_ids=template_token_ids(tok))).save("runs/lock-h10-ids.safetensors")
PY
S=.venv/bin/safetylock
for B in harmbench strongreject; do
  $S eval -m $M --benchmark $B --limit 16 --prompt-attack prefill -o runs/pf/$B-base --batch-size 16
  $S eval -m $M --adapter $A --benchmark $B --limit 16 --prompt-attack prefill -o runs/pf/$B-ft --batch-size 16
  $S eval -m $M --adapter $A --lock $L --conditional --benchmark $B --limit 16 --prompt-attack prefill -o runs/pf/$B-cond-last --batch-size 16
  $S eval -m $M --adapter $A --lock runs/lock-h10-ids.safetensors --conditional --benchmark $B --limit 16 --prompt-attack prefill -o runs/pf/$B-cond-ids --batch-size 16
done
