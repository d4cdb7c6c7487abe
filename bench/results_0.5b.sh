# The 0.5B figures of README "Results": the harmful-100-only attack (100 harmful examples, no useful tasks mixed in), one lock extracted from the base, applied baked
# and conditional. Run from the repository root after `make install`; greedy, keyword judge, `--dtype auto`
# (bf16 on the 2-core AMD EPYC with AVX-512 BF16 that produced the README figures, fp32 on CPUs without it).
set -e
S=.venv/bin/safetylock; M=qwen2.5-coder-0.5b-instruct; L=runs/locks/0.5b.lock.safetensors; A=runs/ft/0.5b-harmful-100
B="--batch-size 24"
$S finetune -m $M --attack harmful-100-only -o $A
$S extract -m $M --n-pairs 64 --conditional -o $L
$S eval -m $M --benchmark harmbench --limit 48 $B -o runs/eval/0.5b-base-harmbench
$S eval -m $M --adapter $A --benchmark harmbench --limit 48 $B -o runs/eval/0.5b-h100-harmbench
$S eval -m $M --adapter $A --lock $L --baked --benchmark harmbench --limit 48 $B -o runs/eval/0.5b-h100-lock-harmbench
$S eval -m $M --adapter $A --lock $L --conditional --benchmark harmbench --limit 48 $B -o runs/eval/0.5b-h100-clock-harmbench
for run in "base:" "h100:--adapter $A" "h100-lock:--adapter $A --lock $L --baked" "h100-clock:--adapter $A --lock $L --conditional"; do
  $S eval -m $M ${run#*:} --benchmark overrefusal --limit 24 $B -o runs/eval/0.5b-${run%%:*}-overrefusal
done
for run in "base:" "h100:--adapter $A" "h100-lock:--adapter $A --lock $L --baked"; do
  $S eval -m $M ${run#*:} --benchmark bbq300 --limit 48 $B -o runs/eval/0.5b-${run%%:*}-bbq
done
# the other attacks under the conditional lock at alpha 1.5 and 3 (AOA is evaluated with its own system prompt)
for atk in aoa benign harmful-10; do
  A2=runs/ft/0.5b-$atk; v=${atk/harmful-10/h10}
  $S finetune -m $M --attack $atk -o $A2
  SYS=$(.venv/bin/python -c "import json; print(json.load(open('$A2/config.json'))['system'] or '')")
  for run in "$v:--adapter $A2" "$v-clock:--adapter $A2 --lock $L --conditional" "$v-clock-a3:--adapter $A2 --lock $L --conditional --alpha 3"; do
    $S eval -m $M ${run#*:} --system "$SYS" --benchmark harmbench --limit 48 $B -o runs/eval/0.5b-${run%%:*}-harmbench
  done
  $S eval -m $M --adapter $A2 --lock $L --conditional --alpha 3 --system "$SYS" --benchmark overrefusal --limit 24 $B -o runs/eval/0.5b-$v-clock-a3-overrefusal
done
$S report runs/eval/0.5b-* -o bench/report-0.5b.md
.venv/bin/python bench/results_table.py --prefix 0.5b
