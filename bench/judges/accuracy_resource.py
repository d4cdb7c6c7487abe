"""Write src/safetylock/resources/judge_accuracy.json from the `judge --validate` results in bench/judges/.

    for j in keyword relevance:0.25 relevance:0.2 relevance:0.05; do
      safetylock judge --validate --judge $j -o bench/judges/human-${j/:/-}.json
    done
    .venv/bin/python bench/judges/accuracy_resource.py

Every summary.json and results table quotes the judge's accuracy from that file (`judges.validated_accuracy`);
a test checks it agrees with the human-*.json files here.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetylock.judges import ACCURACY_RESOURCE

HERE = Path(__file__).parent
RESOURCE = HERE.parents[1] / "src" / "safetylock" / "resources" / ACCURACY_RESOURCE


def spec(judge: dict) -> str:
    return f"relevance:{judge['threshold']:g}" if judge["name"] == "relevance" else judge["name"]


def table() -> dict:
    judges = {}
    for path in sorted(HERE.glob("human-*.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        judges[spec(result["judge"])] = {
            src: {"n": v["n"], "accuracy": round(v["accuracy"], 4), "accuracy_ci": [round(x, 4) for x in v["accuracy_ci"]],
                  "precision": round(v["precision"], 4), "recall": round(v["recall"], 4)}
            for src, v in result["sources"].items()}
    return {"measured_by": "safetylock judge --validate (bench/judges/HUMAN.md)", "judges": judges}


if __name__ == "__main__":
    RESOURCE.write_text(json.dumps(table(), indent=1) + "\n", encoding="utf-8")
    print(RESOURCE)
