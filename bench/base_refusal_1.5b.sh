#!/usr/bin/env bash
# The base-refusal screen through its real hooks on qwen2.5-coder-1.5b-instruct + its LoRA fine-tunes (harmful-10,
# AOA and benign; ATTACKS=... adds others; M, OUT and FT_PREFIX run another model): every out-of-distribution
# source (first 32 eval prompts) and the four prompt attacks (first 4 per harmful source), next to the base and
# the undefended fine-tune on the same prompts.
# PROMPT_ATTACKS= (empty) runs plain prompts only; UNDEFENDED= leaves the undefended fine-tunes out; RESTORE=1 adds
# each fine-tune under base-refusal-restore (column +restore).
# 2-core CPU: about 50 min per fine-tune (seconds per prompt, harmful-10: base 0.65, fine-tune 2.43, fine-tune +
# screen 4.05); resumable: each eval resumes from OUT/cache, so a rerun with one more attack only runs that one.
set -euo pipefail
M=${M:-qwen2.5-coder-1.5b-instruct}
OUT=${OUT:-bench/base-refusal-1.5b}
ATTACKS=${ATTACKS:-harmful-10 aoa benign}  # ATTACKS="... harmful-100" adds the harmful-100 fine-tune (not run yet)
FT_PREFIX=${FT_PREFIX:-runs/ft/1.5b}  # fine-tunes of M: set it with M, or another model reuses the 1.5B adapters
adapters=()
for a in $ATTACKS; do
  ft=$FT_PREFIX-$a
  [ -f "$ft/result.json" ] || safetylock finetune -m "$M" --attack "$a" -o "$ft"
  adapters+=(--adapter "$a=$ft")
done
PROMPT_ATTACKS=${PROMPT_ATTACKS-prefill,two-turn,persona,jailbreak:aim}
flags=()
[ -n "${UNDEFENDED-1}" ] && flags+=(--undefended)
[ -n "${RESTORE:-}" ] && flags+=(--restore)
python bench/base_refusal_ood.py -m "$M" "${adapters[@]}" "${flags[@]}" --limit 32 --batch-size 16 \
  --prompt-attacks "$PROMPT_ATTACKS" --attack-prompts 4 -o "$OUT"
