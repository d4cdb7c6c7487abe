# `safetylock calibrate` on a real model (README "Benchmark ... 1.5B", calibration): the 1.5B's lock on its
# harmful-10 fine-tune, conditional and baked, held to the aligned base (target: the base's harmful rate on the
# advbench extract split; budget: the base's benign refusal rate + 0.05 on the overrefusal extract split).
# Run from the repository root after `bash bench/results_1.5b.sh` (which makes the adapter and the lock; the
# measured run used the bench cache's harmful-10 adapter, the same attack, data, seed and hyperparameters).
# Writes bench/calibrate-1.5b.json (the sweeps, from the calibrated locks' metadata); 2 x 7 minutes here.
set -e
S=.venv/bin/safetylock; M=qwen2.5-coder-1.5b-instruct; L=runs/locks/1.5b.lock.safetensors; A=runs/ft/1.5b-harmful-10
mkdir -p runs/calibrate
for mode in conditional baked; do
  $S calibrate -m $M --adapter $A --lock $L --reference $M --alphas 0.75,1.5,3,4.5 --judge relevance:0.25 --$mode \
    -o runs/calibrate/1.5b-h10-$mode.lock.safetensors
done
.venv/bin/python - <<'PY'
import json
from safetensors import safe_open
out = {}
for mode in ("conditional", "baked"):
    with safe_open(f"runs/calibrate/1.5b-h10-{mode}.lock.safetensors", "pt") as f:
        out[mode] = json.loads(f.metadata()["safetylock"])["calibration"]
with open("bench/calibrate-1.5b.json", "w") as f:
    json.dump(out, f, indent=2, sort_keys=True)
    f.write("\n")
PY
