# Issue 20's baselines on the 1.5B's four fine-tunes next to the runtime default (the base-refusal screen): RESTA (coefficient
# 0.5 / 1 / 2), Safe LoRA (similarity threshold 0.5 / 0.7), the aligned base as a zero-shot guard (yes-minus-no logit
# threshold -1 / 0 / 1) and gate-only refusal (the conditional lock's gate, threshold 0 / 1), on every attack.
# Two strengths each (the 0.5B's calibrated one and its neighbour), and a third for RESTA and the guard, whose first two
# left no strength within the benign budget (guard 1: the 1.5B's guard scores benign extract prompts -0.24..1.0);
# `--calibrate-on harmful-10` stars the calibrated one. The baked and conditional locks' rows on the same settings
# are in bench/grid-1.5b (bench/grid_1.5b.sh). Run from the repository root after `make install`; the artifact
# cache (adapters, vectors, replies, which include replies to harmful prompts) goes to runs/bench-cache, outside
# git, and a rerun computes only what is missing. The harmful-100 adapter (the attack, and the base's harmful
# fine-tune RESTA and Safe LoRA reverse) takes about 70 min to train here: copy one trained by
# `safetylock finetune -m qwen2.5-coder-1.5b-instruct --attack harmful-100` into the cache under its key to reuse it.
set -e
S=.venv/bin/safetylock; M=${M:-qwen2.5-coder-1.5b-instruct}; OUT=${OUT:-bench/repairs-1.5b}
ATTACKS=${ATTACKS:-harmful-10,harmful-100,aoa,benign}
COMMON="--models $M --limit 16 --judge relevance:0.25 --batch-size 16 --cache-dir runs/bench-cache"
$S bench $COMMON --attacks $ATTACKS --benchmarks harmbench,advbench,overrefusal,bbq300 \
  --defenses none,base-refusal,resta,safe-lora,guard,gate-refusal \
  --alphas resta=0.5,1,2 --alphas safe-lora=0.5,0.7 --alphas guard=-1,0,1 --alphas gate-refusal=0,1 \
  --calibrate-on harmful-10 -o $OUT
# the base itself on the same prompts (the reference every row is read against)
$S bench $COMMON --attacks none --benchmarks harmbench,advbench,overrefusal,bbq300 --defenses none -o $OUT/base
