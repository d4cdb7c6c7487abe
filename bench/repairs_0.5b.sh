# Issue 20's baselines on the 0.5B, next to both locks: RESTA (safety vector added at coefficient 0.5 / 1 / 2),
# Safe LoRA (projection where the update's similarity to its projection is below 0.3 / 0.5 / 0.7), the aligned base
# as a zero-shot guard (yes-minus-no logit threshold -2 / 0 / 2) and gate-only refusal (the conditional lock's own
# gate, logit threshold -1 / 0 / 1). Run from the repository root after `make install`; the artifact cache
# (adapters, vectors, locks, replies, which include replies to harmful prompts) goes to runs/bench-cache, outside
# git, and a rerun computes only what is missing. `--calibrate-on harmful-10` picks and stars the calibrated strength (src/safetylock/bench/calibration.py).
set -e
S=.venv/bin/safetylock; M=${M:-qwen2.5-coder-0.5b-instruct}; OUT=${OUT:-bench/repairs-0.5b}
$S bench --models $M --limit 16 --judge relevance:0.25 --batch-size 16 --cache-dir runs/bench-cache \
  --attacks none,harmful-10,harmful-100,aoa,benign --benchmarks harmbench,advbench,overrefusal,bbq300 \
  --defenses none,safetylock,safetylock-conditional,resta,safe-lora,guard,gate-refusal \
  --alphas safetylock=1.5 --alphas safetylock-conditional=1.5 --alphas resta=0.5,1,2 --alphas safe-lora=0.3,0.5,0.7 \
  --alphas guard=-2,0,2 --alphas gate-refusal=-1,0,1 --calibrate-on harmful-10 -o $OUT
