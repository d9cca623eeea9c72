"""Sweep the lexical side's weight in the fusion of dense and lexical candidates: recall@3 of the right document on
SQuAD questions and FK chat probes, tuning and held-out splits (bench_served's), every document of the split learned.

The dense and lexical candidate lists of each probe are fetched once (as retrieve.retrieve fetches them) and fused
offline for each weight, two ways:
  rrf     score(id) = Σ w_ranking / (rrf_k + rank), w = 1 for dense, W for lexical (what retrieve does, W = 1)
  convex  score(id) = cosine(id) + W · bm25(id) / max bm25 of the query's candidates (txtai's hybrid kind: scores,
          not ranks; a candidate missing from one list gets 0 there, or its cosine when known)

    MLLM_CACHE=/tmp/mcache .venv/bin/python labs/sweep_fusion.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _benchmd import log, table  # noqa: E402
from bench_served import FK_TUNING, fk_split, squad_split  # noqa: E402

WEIGHTS = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0]
CONVEX = [0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]


def fuse(rankings, weights, k=60):
    scores: dict[int, float] = {}
    for ranking, w in zip(rankings, weights):
        for rank, (item, _) in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + w / (k + rank)
    return sorted(scores, key=lambda i: (-scores[i], i))


def convex(dense, lexical, w):
    top = max((s for _, s in lexical), default=0.0)
    scores = {i: float(s) for i, s in dense}
    for i, s in lexical:
        scores[i] = scores.get(i, 0.0) + (w * s / top if top > 0 else 0.0)
    return sorted(scores, key=lambda i: (-scores[i], i))


def convex_exact(dense, lexical, w, cosine):
    """convex, with a lexical-only candidate's true cosine (`cosine(id)`) instead of 0 on the dense side."""
    top = max((s for _, s in lexical), default=0.0)
    scores = {i: float(s) for i, s in dense}
    for i, s in lexical:
        scores[i] = scores.get(i, cosine(i)) + (w * s / top if top > 0 else 0.0)
    return sorted(scores, key=lambda i: (-scores[i], i))


def recall_at_3(probes, lists, source, rank) -> float:
    hits = 0
    for p, candidates in zip(probes, lists):  # (dense, lexical[, the probe's vector]) per probe
        seen: list[str] = []
        for i in rank(*candidates):
            if source[i] not in seen:
                seen.append(source[i])
            if len(seen) == 3:
                break
        hits += p["tags"][0] in seen
    return hits / len(probes)


def main() -> None:
    from memory_llm import MemoryLLM
    from memory_llm.config import DEFAULT_EMBEDDER
    from memory_llm.embed import load

    from memory_llm.config import Settings

    embedder = load(DEFAULT_EMBEDDER, precision=Settings().embed_precision)  # documents as learn embeds them
    questions = load(DEFAULT_EMBEDDER)  # questions as ask embeds them (float32)
    rows, convex_rows, exact_rows = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for set_name in ("squad", "fk"):
            for split in ("tuning", "heldout"):
                docs, probes = squad_split(split, 10 ** 6) if set_name == "squad" else \
                    fk_split(split, FK_TUNING if split == "tuning" else 130 - FK_TUNING, Path(tmp))
                m = MemoryLLM(Path(tmp) / f"{set_name}-{split}", embedder=embedder)
                for d in docs:
                    m.learn(text=d["text"], source=d["id"])
                source = {i: mem.source for i, mem in m.store.get(m.store.memory_ids()).items()}
                vectors = questions.encode([p["input"] for p in probes])
                lists = [(m.store.dense(v, 20, "default"), m.store.lexical(p["input"], 20, "default"))
                         for p, v in zip(probes, vectors)]
                recall = [recall_at_3(probes, lists, source, lambda d, x, w=w: fuse([d, x], [1.0, w]))
                          for w in WEIGHTS]
                rows.append([set_name, split, len(probes)] + [f"{r:.3f}" for r in recall])
                recall = [recall_at_3(probes, lists, source, lambda d, x, w=w: convex(d, x, w)) for w in CONVEX]
                convex_rows.append([set_name, split, len(probes)] + [f"{r:.3f}" for r in recall])
                stored = m.store.embeddings(m.store.memory_ids())
                with_vectors = [(dense, lexical, v) for (dense, lexical), v in zip(lists, vectors)]
                exact = [recall_at_3(probes, with_vectors, source,
                                     lambda d, x, v, w=w: convex_exact(d, x, w, lambda i: float(stored[i] @ v)))
                         for w in CONVEX]
                exact_rows.append([set_name, split, len(probes)] + [f"{r:.3f}" for r in exact])
                log(f"{set_name} {split}: {rows[-1]} {convex_rows[-1]}")
                m.close()
    print(table(["set", "split", "probes"] + [f"rrf W={w:g}" for w in WEIGHTS], rows))
    print()
    print(table(["set", "split", "probes"] + [f"convex W={w:g}" for w in CONVEX], convex_rows))
    print()
    print(table(["set", "split", "probes"] + [f"exact W={w:g}" for w in CONVEX], exact_rows))


if __name__ == "__main__":
    main()
