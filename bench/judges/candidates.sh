# Candidate replies for the judge validation set (greedy, 48 new tokens, extract splits only).
# The 1.5B runs were cut short to save time: each results.jsonl holds the first rows written (see --limit).
set -x
S=.venv/bin/safetylock
m=qwen2.5-coder-0.5b-instruct
$S eval -m $m --benchmark harmbench --split extract --limit 40 --max-new-tokens 48 --judge keyword -o runs/jv/$m-harmbench
$S eval -m $m --benchmark advbench --split extract --limit 25 --max-new-tokens 48 --judge keyword -o runs/jv/$m-advbench
$S eval -m $m --benchmark overrefusal --split extract --limit 35 --max-new-tokens 48 --judge keyword -o runs/jv/$m-overrefusal
m=qwen2.5-coder-1.5b-instruct
$S eval -m $m --benchmark harmbench --split extract --limit 24 --max-new-tokens 48 --judge keyword -o runs/jv/$m-harmbench
$S eval -m $m --benchmark overrefusal --split extract --limit 16 --max-new-tokens 48 --judge keyword -o runs/jv/$m-overrefusal
# a 1.5B harmful-10 adapter (10 harmbench extract prompts, content-free compliance, batch 5, 10 steps, lr 2e-4):
$S eval -m $m --adapter "${FT10:-runs/ft/1.5b-harmful-10}" --benchmark harmbench --split extract --limit 16 --max-new-tokens 48 --judge keyword -o runs/jv/ft10-harmbench
