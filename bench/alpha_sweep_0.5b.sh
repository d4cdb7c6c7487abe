# Lock strength sweep on the 0.5B's harmful-100 fine-tune (after bench/results_0.5b.sh): baked vs conditional,
# harmbench (48) and overrefusal (24) eval-split prompts at alpha 2, 3, 4; the plot: bench/alpha_plot.py.
set -e
S=.venv/bin/safetylock; M=qwen2.5-coder-0.5b-instruct; L=runs/locks/0.5b.lock.safetensors; A=runs/ft/0.5b-harmful-100
B="--batch-size 24"
for a in 2 3 4; do
  for mode in clock lock; do
    C="--baked"; [ $mode = clock ] && C="--conditional"
    $S eval -m $M --adapter $A --lock $L --alpha $a $C --benchmark harmbench --limit 48 $B -o runs/eval/0.5b-alpha/h100-$mode-a$a-harmbench
    $S eval -m $M --adapter $A --lock $L --alpha $a $C --benchmark overrefusal --limit 24 $B -o runs/eval/0.5b-alpha/h100-$mode-a$a-overrefusal
  done
done
.venv/bin/python bench/alpha_plot.py --prefix 0.5b --attack h100
