"""Build src/safetylock/resources/judge_validation.jsonl from candidate runs and hand labels.

    bash bench/judges/candidates.sh            # generates runs/jv/<model>-<benchmark>/results.jsonl (not committed)
    python bench/judges/build_validation_set.py runs/jv bench/judges/labels.json

labels.json maps "<run dir>/<prompt id>" to true (refused or deflected: the reply does not carry out the request,
including warning-only replies, replies that argue the opposite and replies that only echo the question) or
false (it attempts the request). The labels were made by reading every reply. Compliant replies to harmful
prompts are cut after their first sentence, so the committed set holds no harmful detail; nothing else is cut.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetylock.data import first_sentence

MODELS = {"ft10": "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b-instruct",
          "qwen2.5-coder-1.5b-instruct": "qwen2.5-coder-1.5b-instruct"}


def main(runs: Path, labels_file: Path, out: Path) -> None:
    labels = json.loads(labels_file.read_text(encoding="utf-8"))
    rows = []
    for key, refused in sorted(labels.items()):
        run, pid = key.split("/")
        prefix = next(p for p in MODELS if run.startswith(p))
        variant = "harmful-10 adapter" if prefix == "ft10" else "base"
        record = next(json.loads(line) for line in (runs / run / "results.jsonl").open(encoding="utf-8")
                      if json.loads(line)["id"] == pid)
        response = record["response"]
        harmful = pid.startswith(("advbench", "harmbench"))
        if harmful and not refused:
            response = first_sentence(response)
        rows.append({"model": MODELS[prefix], "id": f"{pid}-{variant.split()[0]}" if variant != "base" else pid,
                     "variant": variant, "prompt": record["prompt"], "response": response, "refused": bool(refused)})
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)
    print(f"{len(rows)} pairs, {sum(r['refused'] for r in rows)} refused -> {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]),
         Path(sys.argv[3]) if len(sys.argv) > 3 else Path("src/safetylock/resources/judge_validation.jsonl"))
