# Old code vs new code on the same lock and adapter (bench/RERUN.md section 2). Usage, from the repository root
# after bench/RERUN.md's section 1 filled runs/bench-cache:  bash bench/same_code_check.sh OLD_COMMIT LOCK ADAPTER
set -e
OLD=${1:?old commit}; L=${2:?lock file}; A=${3:?adapter dir}; M=qwen2.5-coder-0.5b-instruct
git worktree add -f /tmp/safetylock-old "$OLD"
trap 'git worktree remove --force /tmp/safetylock-old' EXIT
for v in old new; do
  if [ $v = old ]; then PP=/tmp/safetylock-old/src; else PP=src; fi
  run() { PYTHONPATH=$PP .venv/bin/python -c "import sys; sys.argv=['safetylock']+sys.argv[1:]; from safetylock.cli import main; main()" "$@"; }
  run eval -m $M --lock "$L" --baked --benchmark bbq300 --limit 16 -o runs/same/$v-baked-bbq --batch-size 16
  run eval -m $M --adapter "$A" --lock "$L" --conditional --benchmark overrefusal --limit 16 -o runs/same/$v-cond-over --batch-size 16
  run eval -m $M --adapter "$A" --lock "$L" --conditional --benchmark harmbench --limit 16 -o runs/same/$v-cond-harm --batch-size 16
done
for k in baked-bbq cond-over cond-harm; do
  .venv/bin/python - "$k" <<'PY'
import json, sys
k = sys.argv[1]
rows = {v: [json.loads(l) for l in open(f"runs/same/{v}-{k}/results.jsonl")] for v in ("old", "new")}
drop = {"seconds", "tokens_per_second"}
same = sum({a: b for a, b in r.items() if a not in drop} == {a: b for a, b in s.items() if a not in drop}
           for r, s in zip(rows["old"], rows["new"]))
print(f"{k}: {same}/{len(rows['old'])} rows identical")
PY
done
