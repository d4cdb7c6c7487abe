#!/usr/bin/env bash
# The base-refusal screen through its real hooks on qwen2.5-coder-1.5b-instruct + its harmful-10 LoRA fine-tune:
# every out-of-distribution source (first 32 eval prompts) and the four prompt attacks (first 4 per harmful
# source), next to the base and the undefended fine-tune on the same prompts. 2-core CPU: about 50 min.
set -euo pipefail
M=${M:-qwen2.5-coder-1.5b-instruct}
FT=${FT:-runs/ft/1.5b-harmful-10}
OUT=${OUT:-bench/base-refusal-1.5b}
[ -f "$FT/result.json" ] || safetylock finetune -m "$M" --attack harmful-10 -o "$FT"
python bench/base_refusal_ood.py -m "$M" --adapter "harmful-10=$FT" --undefended --limit 32 --batch-size 16 \
  --prompt-attacks prefill,two-turn,persona,jailbreak:aim --attack-prompts 4 -o "$OUT"
