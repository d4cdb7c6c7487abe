# The 1.5B figures of README "Results": the harmful-10 attack, one lock extracted from the base, applied baked
# and conditional. Run from the repository root after `make install`; greedy, keyword judge, `--dtype auto`
# (bf16 on the 2-core AMD EPYC with AVX-512 BF16 that produced the README figures, fp32 on CPUs without it).
# Prompts: eval splits (first N with --limit; the base harmbench run covers the whole eval split).
set -e
S=.venv/bin/safetylock; M=qwen2.5-coder-1.5b-instruct; L=runs/locks/1.5b.lock.safetensors; A=runs/ft/1.5b-harmful-10
B="--batch-size 24"
$S finetune -m $M --attack harmful-10 -o $A
$S extract -m $M --n-pairs 64 --conditional -o $L
$S inspect $L --plot bench/heads-1.5b.png
$S eval -m $M --benchmark harmbench $B -o runs/eval/1.5b-base-harmbench
$S eval -m $M --adapter $A --benchmark harmbench --limit 48 $B -o runs/eval/1.5b-h10-harmbench
$S eval -m $M --adapter $A --lock $L --baked --benchmark harmbench --limit 48 $B -o runs/eval/1.5b-h10-lock-harmbench
$S eval -m $M --adapter $A --lock $L --conditional --benchmark harmbench --limit 48 $B -o runs/eval/1.5b-h10-clock-harmbench
# over-refusal, and mean next-token KL to the base on the same benign prompts (--reference)
for run in "base:" "h10:--adapter $A" "h10-lock:--adapter $A --lock $L --baked" "h10-clock:--adapter $A --lock $L --conditional"; do
  R=""; [ "${run%%:*}" != base ] && R="--reference $M"
  $S eval -m $M ${run#*:} $R --benchmark overrefusal --limit 24 $B -o runs/eval/1.5b-${run%%:*}-overrefusal
done
for run in "base:" "h10:--adapter $A" "h10-lock:--adapter $A --lock $L --baked" "h10-clock:--adapter $A --lock $L --conditional"; do
  $S eval -m $M ${run#*:} --benchmark bbq300 --limit 48 $B -o runs/eval/1.5b-${run%%:*}-bbq
done
# gsm8k needs long replies: at 192 new tokens most of the 1.5B's worked answers were cut off before the result
for run in "base:" "h10:--adapter $A" "h10-lock:--adapter $A --lock $L --baked" "h10-clock:--adapter $A --lock $L --conditional"; do
  $S eval -m $M ${run#*:} --benchmark gsm8k100 --limit 16 --max-new-tokens 384 --batch-size 16 -o runs/eval/1.5b-${run%%:*}-gsm8k
done
# the other attacks, at their paper-faithful defaults, under the same lock (AOA is evaluated with its own system prompt)
# harmful-100 mixes 50 useful tasks into its 100 harmful examples; harmful-100-only is the unmixed data
for atk in aoa benign harmful-100 harmful-100-only; do
  A2=runs/ft/1.5b-$atk; v=${atk/harmful-100-only/h100only}; v=${v/harmful-100/h100}
  $S finetune -m $M --attack $atk -o $A2
  SYS=$(.venv/bin/python -c "import json; print(json.load(open('$A2/config.json'))['system'] or '')")
  for run in "$v:--adapter $A2" "$v-lock:--adapter $A2 --lock $L --baked" "$v-clock:--adapter $A2 --lock $L --conditional"; do
    $S eval -m $M ${run#*:} --system "$SYS" --benchmark harmbench --limit 48 $B -o runs/eval/1.5b-${run%%:*}-harmbench
  done
done
$S eval -m $M --adapter runs/ft/1.5b-aoa --lock $L --baked --system "$(.venv/bin/python -c "import json; print(json.load(open('runs/ft/1.5b-aoa/config.json'))['system'])")" \
  --benchmark overrefusal --limit 24 $B -o runs/eval/1.5b-aoa-lock-overrefusal
$S eval -m $M --adapter runs/ft/1.5b-benign --lock $L --baked --benchmark overrefusal --limit 24 $B -o runs/eval/1.5b-benign-lock-overrefusal
for v in h100 h100only; do
  A2=runs/ft/1.5b-harmful-100; [ $v = h100only ] && A2=runs/ft/1.5b-harmful-100-only
  for run in "$v:--adapter $A2" "$v-clock:--adapter $A2 --lock $L --conditional" "$v-lock:--adapter $A2 --lock $L --baked"; do
    $S eval -m $M ${run#*:} --reference $M --benchmark overrefusal --limit 24 $B -o runs/eval/1.5b-${run%%:*}-overrefusal
  done
  $S eval -m $M --adapter $A2 --benchmark bbq300 --limit 48 $B -o runs/eval/1.5b-$v-bbq
  $S eval -m $M --adapter $A2 --benchmark gsm8k100 --limit 16 --max-new-tokens 384 --batch-size 16 -o runs/eval/1.5b-$v-gsm8k
done
# harmful-100's utility on all 53 gsm8k100 eval problems (16 are too few to tell 5 points apart), and the
# conditional lock's utility and the baked lock on it
G="--benchmark gsm8k100 --max-new-tokens 384 --batch-size 16"
A2=runs/ft/1.5b-harmful-100
$S eval -m $M $G -o runs/eval/1.5b-base-gsm8k-all
$S eval -m $M --adapter $A2 $G -o runs/eval/1.5b-h100-gsm8k-all
# the other 47 problems (the extract split: no training or extraction uses gsm8k), for all 100, paired
$S eval -m $M $G --split extract -o runs/eval/1.5b-base-gsm8k-extract
$S eval -m $M --adapter $A2 $G --split extract -o runs/eval/1.5b-h100-gsm8k-extract
.venv/bin/python bench/utility_paired.py --label "harmful-100, gsm8k100 (all 100)" \
  --base runs/eval/1.5b-base-gsm8k-{all,extract} --model runs/eval/1.5b-h100-gsm8k-{all,extract}
$S eval -m $M --adapter $A2 --lock $L --conditional $G -o runs/eval/1.5b-h100-clock-gsm8k-all
$S eval -m $M --adapter $A2 --lock $L --conditional --benchmark bbq300 --limit 48 $B -o runs/eval/1.5b-h100-clock-bbq
# the model judge on the harmbench replies (the table's "model judge" column; it reads whole replies, so it sees
# in-persona refusals such as "I am AOA ... I do not engage in ..." that have no keyword marker)
for r in base h10 h10-lock h10-clock aoa aoa-lock aoa-clock benign benign-lock benign-clock; do
  $S judge --input runs/eval/1.5b-$r-harmbench/results.jsonl --judge model -o runs/eval/1.5b-$r-harmbench/judged-model.jsonl
done
# applying: bake time and baked/unlocked tokens/s (bench/apply.md)
.venv/bin/python bench/apply_bench.py --model $M --lock $L --adapter $A
$S report runs/eval/1.5b-* -o bench/report-1.5b.md
.venv/bin/python bench/results_table.py --prefix 1.5b   # the README table
