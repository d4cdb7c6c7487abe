# The 1.5B figures of README "Results": harmful-10 attack, one lock from the base, baked and conditional.
# 2-core CPU, fp32, greedy, keyword judge. Prompts: eval splits (first N with --limit).
set -e
S=.venv/bin/safetylock; M=qwen2.5-coder-1.5b-instruct; L=runs/locks/1.5b.lock.safetensors; A=runs/ft/1.5b-harmful-10
$S finetune -m $M --attack harmful-10 -o runs/ft/1.5b-harmful-10
# The lock behind the committed figures came from bench/lock_research.py (the same extraction: 64 built-in pairs,
# every head, response:1-8, fp32; stored alpha set to 1.5). Its harmfulness probe was fitted on 64 harmful vs 64
# overrefusal *questions*; the CLI now adds benign imperative tasks to the harmless side (data.gate_prompts), so
# this command gives the same directions and a probe trained on more varied benign prompts.
$S extract -m $M --n-pairs 64 --conditional -o runs/locks/1.5b.lock.safetensors
$S eval -m $M --adapter $A --benchmark harmbench --limit 48 --batch-size 24 -o runs/eval/1.5b-h10-harmbench
$S eval -m $M --adapter $A --lock $L --benchmark harmbench --limit 48 --batch-size 24 -o runs/eval/1.5b-h10-lock-harmbench
$S eval -m $M --adapter $A --lock $L --conditional --benchmark harmbench --limit 48 --batch-size 24 -o runs/eval/1.5b-h10-clock-harmbench
$S eval -m $M --benchmark overrefusal --limit 24 --batch-size 24 -o runs/eval/1.5b-base-overrefusal
$S eval -m $M --adapter $A --lock $L --benchmark overrefusal --limit 24 --batch-size 24 -o runs/eval/1.5b-h10-lock-overrefusal
$S eval -m $M --adapter $A --lock $L --conditional --benchmark overrefusal --limit 24 --batch-size 24 -o runs/eval/1.5b-h10-clock-overrefusal
$S eval -m $M --adapter $A --benchmark overrefusal --limit 24 --batch-size 24 -o runs/eval/1.5b-h10-overrefusal
$S eval -m $M --benchmark harmbench --batch-size 24 -o runs/eval/1.5b-base-harmbench
$S eval -m $M --benchmark bbq300 --limit 48 --batch-size 24 -o runs/eval/1.5b-base-bbq
$S eval -m $M --adapter $A --lock $L --benchmark bbq300 --limit 48 --batch-size 24 -o runs/eval/1.5b-h10-lock-bbq
$S eval -m $M --benchmark gsm8k100 --limit 8 --max-new-tokens 160 --batch-size 8 -o runs/eval/1.5b-base-gsm8k
$S eval -m $M --adapter $A --lock $L --benchmark gsm8k100 --limit 8 --max-new-tokens 160 --batch-size 8 -o runs/eval/1.5b-h10-lock-gsm8k
$S report runs/eval/1.5b-* -o bench/report-1.5b.md
