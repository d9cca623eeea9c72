"""Fit the supersession detector's weights (memory_llm/supersede.py WEIGHTS, BIAS, PROBABILITY) on the tuning split of
data/supersession_pairs.jsonl, and report the held-out split's precision and recall with them.

For every (old sentence, new text) candidate the word rules let through (`supersede.restates`), the features are
the rules' counts plus two cosines by the default embedder (the texts without their changed values; the whole
texts). A logistic regression (scikit-learn, here only: the product reads the weights) is fitted on the tuning
pairs; the threshold is the lowest whose 10-fold cross-validated precision (folds by pair) reaches --precision.

    MLLM_CACHE=/tmp/mcache .venv/bin/python labs/fit_supersession.py [--precision 0.95] [--c 1.0]

It prints the weights to paste into memory_llm/supersede.py, the cross-validated figures on the tuning split, and
the held-out figures with the weights as fitted (docs/updates.md records the run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memory_llm import supersede as S  # noqa: E402
from memory_llm.config import DEFAULT_EMBEDDER  # noqa: E402
from memory_llm.embed import load  # noqa: E402

PAIRS = REPO / "data" / "supersession_pairs.jsonl"


def candidates(rows: list[dict], similarity) -> list[dict]:
    """Every candidate of every pair with its features, whether it is the labelled stale sentence (ok), and one
    marker row per pair (ok None) so that pairs without a candidate still count."""
    out = []
    for r in rows:
        for x in S.candidates(r["old"], r["new"], similarity):
            out.append({"id": r["id"], "label": r["label"], "ok": r["label"] == "supersedes"
                        and x.sentence == r["old_sentence"], **x.features})
        out.append({"id": r["id"], "label": r["label"], "ok": None})
    return out


def figures(recs: list[dict], scores, threshold: float) -> dict:
    """Pair-level precision and recall: a pair is found when its stale sentence scores at least the threshold,
    and a false positive when another candidate of a pair (a distinct pair's, or the wrong sentence) does."""
    pairs = {r["id"]: r["label"] for r in recs}
    scored = [r for r in recs if r["ok"] is not None and r["label"] != "same"]
    tp = {r["id"] for r, s in zip(scored, scores) if r["ok"] and s >= threshold}
    fp = {r["id"] for r, s in zip(scored, scores) if not r["ok"] and s >= threshold}
    positives = sum(label == "supersedes" for label in pairs.values())
    confusions = {}
    for r, s in zip(scored, scores):
        if not r["ok"] and s >= threshold:
            confusions[r["id"]] = r["label"]
    return {"precision": len(tp) / max(len(tp) + len(fp), 1), "recall": len(tp) / max(positives, 1),
            "true_positives": len(tp), "false_positives": len(fp), "positives": positives,
            "distinct_pairs": sum(label == "distinct" for label in pairs.values()), "confusions": confusions}


def main() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", type=float, default=0.95, help="cross-validated precision the threshold must reach")
    ap.add_argument("--c", type=float, default=1.0, help="inverse regularisation strength")
    args = ap.parse_args()
    embedder = load(DEFAULT_EMBEDDER, "cpu")
    rows = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines() if line.strip()]
    tuning = candidates([r for r in rows if r["split"] == "tuning"], S.pair_similarities(embedder.encode))
    heldout = candidates([r for r in rows if r["split"] == "heldout"], S.pair_similarities(embedder.encode))

    def matrix(recs):
        scored = [r for r in recs if r["ok"] is not None and r["label"] != "same"]
        return (np.array([[r[f] for f in S.FEATURES] for r in scored]), np.array([bool(r["ok"]) for r in scored]),
                np.array([r["id"] for r in scored]))

    X, y, groups = matrix(tuning)
    oof = np.zeros(len(y))
    for train, test in GroupKFold(10).split(X, y, groups):
        model = LogisticRegression(C=args.c, max_iter=5000).fit(X[train], y[train])
        oof[test] = model.predict_proba(X[test])[:, 1]
    threshold = next((t for t in np.arange(0.30, 0.96, 0.025)
                      if figures(tuning, oof, t)["precision"] >= args.precision), 0.95)
    model = LogisticRegression(C=args.c, max_iter=5000).fit(X, y)
    weights = dict(zip(S.FEATURES, (round(float(w), 3) for w in model.coef_[0])))
    print(f"WEIGHTS = {weights}\nBIAS = {round(float(model.intercept_[0]), 3)}\nPROBABILITY = {threshold:.3f}")
    cv = figures(tuning, oof, threshold)
    print(f"tuning, 10-fold cross-validated at {threshold:.3f}: precision {cv['precision']:.3f} recall"
          f" {cv['recall']:.3f} ({cv['true_positives']} of {cv['positives']} restatements,"
          f" {cv['false_positives']} wrong)")
    Xh, _, _ = matrix(heldout)
    held = figures(heldout, model.predict_proba(Xh)[:, 1] if len(Xh) else [], threshold)
    print(f"held out, as fitted: precision {held['precision']:.3f} recall {held['recall']:.3f}"
          f" ({held['true_positives']} of {held['positives']} restatements, {held['false_positives']} wrong of"
          f" {held['distinct_pairs']} distinct pairs)")
    print("held-out confusions by label:", {k: list(held["confusions"].values()).count(k)
                                           for k in set(held["confusions"].values())})


if __name__ == "__main__":
    main()
