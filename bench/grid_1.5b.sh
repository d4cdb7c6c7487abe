# The `safetylock bench` runs behind bench/grid-1.5b (README "Benchmark"), its alpha sweep, gsm8k and attack-strength
# runs. Run from the repository root after `make install`. Same settings as bench/grid_0.5b.sh (16 eval prompts per
# benchmark, judge relevance:0.25, greedy, 48 new tokens, bf16 on the 2-core AMD EPYC with AVX-512 BF16).
# The artifact cache (adapters, locks, generations, which include replies to harmful prompts) goes to
# runs/bench-cache, outside git; a rerun computes only what is missing.
set -e
S=.venv/bin/safetylock; M=qwen2.5-coder-1.5b-instruct
COMMON="--models $M --limit 16 --judge relevance:0.25 --batch-size 16 --cache-dir runs/bench-cache"
$S bench $COMMON --attacks none,harmful-10,harmful-100,aoa,benign --benchmarks harmbench,advbench,overrefusal,bbq300 \
  --alphas safetylock=1.5 --alphas safetylock-conditional=1.5 -o bench/grid-1.5b
# the alpha sweep on the base and the harmful-10 fine-tune (the cells above are reused from the cache)
$S bench $COMMON --attacks none,harmful-10 --benchmarks harmbench,advbench,overrefusal,bbq300 \
  --alphas safetylock=0.75,1.5 --alphas safetylock-conditional=1.5,3 --alphas iti=5,15 --alphas refusal-direction=1,3 \
  -o bench/grid-1.5b-sweep
# gsm8k100 (16 eval prompts, 384 new tokens: worked answers) of every attacked model: bench/gsm8k-1.5b
$S bench $COMMON --attacks none,harmful-10,harmful-100,aoa,benign --defenses none --benchmarks gsm8k100 --math-tokens 384 \
  -o bench/gsm8k-1.5b
# the same 32 problems at 128 new tokens, undefended and under both locks (128 cuts most answers off, so the accuracies
# mean little; it shows the conditional lock leaves every gsm8k reply as the fine-tune writes it): bench/gsm8k-1.5b-128
$S bench --models $M --limit 32 --judge relevance:0.25 --batch-size 32 --cache-dir runs/bench-cache \
  --attacks none,harmful-10,harmful-100,aoa,benign --defenses none,safetylock,safetylock-conditional --benchmarks gsm8k100 \
  --math-tokens 128 --alphas safetylock=1.5 --alphas safetylock-conditional=1.5 -o bench/gsm8k-1.5b-128
.venv/bin/python bench/same_replies.py bench/gsm8k-1.5b-128/results.json --defense safetylock-conditional
.venv/bin/python bench/same_replies.py bench/gsm8k-1.5b-128/results.json --defense safetylock
# the attack-strength axis: harmful-10 trained 5 / 10 / 20 / 40 optimizer steps: bench/strength-1.5b
$S bench $COMMON --attacks harmful-10 --attack-steps 5,10,20,40 --defenses none,safetylock-conditional \
  --benchmarks harmbench,overrefusal --alphas safetylock-conditional=1.5,3 -o bench/strength-1.5b
# AOA's in-persona refusals, re-judged by the model judge from the cached replies; the base for comparison
.venv/bin/python bench/rejudge_cells.py bench/grid-1.5b/results.json --attack aoa --defense none --defense safetylock \
  --defense safetylock-conditional --defense refusal-direction --defense self-reminder --judge model
.venv/bin/python bench/rejudge_cells.py bench/grid-1.5b/results.json --attack none --defense none --judge model
