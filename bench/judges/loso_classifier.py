"""Leave-one-source-out check of a learned refusal judge (logistic regression on MiniLM features).

    .venv/bin/python bench/judges/loso_classifier.py

Trains on every labelled source but one (pyrit's human-labelled sets and the project's own) and scores the one
left out; prints accuracy per held-out source for three feature sets and three regularisation strengths. It
writes nothing. Result (2026-12-01, 2-core CPU): no setting beats the relevance rule out of source
(bench/judges/HUMAN.md), so no learned judge ships.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from safetylock.judges import embedding_model, human_validation_sets, refusal_marker, validation_set


def features() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (features, labels, source) rows: reply embedding, prompt*reply embedding, similarity, keyword."""
    model = embedding_model()
    xs, ys, sources = [], [], []
    for name, pairs in {**human_validation_sets(), "project": validation_set()}.items():
        a = model.encode([p.prompt for p in pairs], batch_size=32, normalize_embeddings=True)
        b = model.encode([p.response for p in pairs], batch_size=32, normalize_embeddings=True)
        keyword = np.array([[refusal_marker(p.response) is not None or not p.response.strip()] for p in pairs], float)
        xs.append(np.hstack([b, a * b, (a * b).sum(1, keepdims=True), keyword]))
        ys.append([p.refused for p in pairs])
        sources += [name] * len(pairs)
    return np.vstack(xs), np.concatenate(ys).astype(bool), np.array(sources)


def main() -> None:
    x, y, source = features()
    width = x.shape[1] // 2 - 1  # the embedding width
    sets = {"all": slice(None), "reply+sim+keyword": np.r_[0:width, 2 * width, 2 * width + 1],
            "product+sim+keyword": np.r_[width : 2 * width + 2]}
    names = list(dict.fromkeys(source))
    for label, cols in sets.items():
        for c in (0.01, 0.1, 1.0):
            accs = []
            for held in names:
                train, test = source != held, source == held
                clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, class_weight="balanced"))
                clf.fit(x[train][:, cols], y[train])
                accs.append(float((clf.predict(x[test][:, cols]) == y[test]).mean()))
            print(f"{label:20s} C={c:<5g} " + "  ".join(f"{n} {a:.3f}" for n, a in zip(names, accs)))


if __name__ == "__main__":
    main()
