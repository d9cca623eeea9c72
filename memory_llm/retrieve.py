"""Retrieval: dense (vector index) and lexical (FTS5/BM25) candidates fused, by their scores (convex, the default) or
by their ranks (reciprocal-rank fusion)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from memory_llm.embed import Embedder
from memory_llm.store import Hit, Store


def rrf(rankings: Sequence[Sequence[tuple[int, float]]], k: int = 60) -> list[tuple[int, float, list[int | None]]]:
    """Reciprocal-rank fusion: score(id) = Σ 1 / (k + rank). Returns (id, score, rank per ranking), best first."""
    scores: dict[int, float] = {}
    ranks: dict[int, list[int | None]] = {}
    for r, ranking in enumerate(rankings):
        for rank, (item, _) in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
            ranks.setdefault(item, [None] * len(rankings))[r] = rank
    order = sorted(scores, key=lambda i: (-scores[i], i))
    return [(i, scores[i], ranks[i]) for i in order]


def convex(pairs: Sequence[tuple[Sequence[tuple[int, float]], Sequence[tuple[int, float]]]],
           weight: float = 0.2, cosine: Callable[[int, int], float] | None = None
           ) -> list[tuple[int, float, list[int | None]]]:
    """Score fusion of (dense, lexical) candidate lists, one pair per query: score(id) = Σ over queries of
    cosine(id) + weight · bm25(id) / the query's best bm25. A candidate only the lexical side found has its
    cosine from `cosine(query index, id)` (its stored embedding; 0 without it); one absent from the lexical list
    adds 0 there. Returns (id, score, [dense rank, lexical rank] in the first query that has it), best first.
    Chosen over rrf on the tuning splits (labs/sweep_fusion.py): recall@3 0.955 vs 0.940 on SQuAD questions,
    0.998 vs 0.994 on FK."""
    scores: dict[int, float] = {}
    ranks: dict[int, list[int | None]] = {}
    for q, (dense, lexical) in enumerate(pairs):
        top = max((float(s) for _, s in lexical), default=0.0)
        near = {item: float(s) for item, s in dense}
        for item, s in lexical:
            if item not in near:
                near[item] = cosine(q, item) if cosine is not None else 0.0
        for item, s in near.items():
            scores[item] = scores.get(item, 0.0) + s
        for item, s in lexical:
            scores[item] += weight * float(s) / top if top > 0 else 0.0
        for r, ranking in enumerate((dense, lexical)):
            for rank, (item, _) in enumerate(ranking, 1):
                slot = ranks.setdefault(item, [None, None])
                slot[r] = slot[r] or rank
    order = sorted(scores, key=lambda i: (-scores[i], i))
    return [(i, scores[i], ranks[i]) for i in order]


def retrieve(store: Store, embedder: Embedder, query: str | Sequence[str], k: int = 4, namespace: str | None = None,
             rrf_k: int = 60, vectors=None, floor: float = 0.0, fusion: str = "convex",
             lexical_weight: float = 0.2) -> list[Hit]:
    """The k best memories for a query (or several, e.g. a conversation's turns), dense and lexical
    candidates of every query fused (`fusion`: "convex", scores with the lexical side weighted `lexical_weight`,
    or "rrf", ranks with constant `rrf_k`). `vectors` are the queries' embeddings when the caller has them.

    With a `floor` (`ask`'s source floor), a memory whose best cosine similarity to a query is below it is left
    out, however well it ranks lexically: a memory beyond every query's dense candidates is below the last of
    them, so it is left out when that is below the floor (and kept otherwise, its similarity unknown)."""
    queries = [query] if isinstance(query, str) else [q for q in query if q.strip()]
    if k <= 0 or not queries or not queries[0].strip():
        return []
    fetch = max(4 * k, 20)
    vectors = embedder.encode(queries) if vectors is None else vectors
    pairs, similarity, bound = [], {}, -1.0
    for q, vector in zip(queries, vectors):
        dense = store.dense(vector, fetch, namespace)
        pairs.append((dense, store.lexical(q, fetch, namespace)))
        for i, s in dense:
            similarity[i] = max(similarity.get(i, -1.0), float(s))
        bound = max(bound, float(dense[-1][1]) if len(dense) == fetch else -1.0)  # beyond: below this
    if fusion == "convex":
        found = {i for dense, _ in pairs for i, _ in dense}
        stored = store.embeddings(list({i for _, lexical in pairs for i, _ in lexical} - found))
        exact: dict[tuple[int, int], float] = {}
        for q, vector in enumerate(vectors):
            for i, v in stored.items():
                exact[q, i] = float(np.dot(v, vector)) if v.shape == np.shape(vector) else 0.0
                similarity[i] = max(similarity.get(i, -1.0), exact[q, i])  # known now: the floor reads it
        ranked = convex(pairs, lexical_weight, lambda q, i: exact.get((q, i), 0.0))
    else:
        ranked = rrf([r for p in pairs for r in p], rrf_k)
    fused = [f for f in ranked if floor <= 0 or similarity.get(f[0], bound) >= floor][:k]
    memories = store.get([i for i, _, _ in fused])
    return [Hit(memories[i], score, ranks[0], ranks[1], similarity.get(i)) for i, score, ranks in fused
            if i in memories]


def pack(hits: Sequence[Hit], count_tokens: Callable[[str], int], budget: int) -> list[Hit]:
    """Keep hits in rank order while their texts fit the token budget (at least the first one, truncated
    by the caller's model window if need be)."""
    kept, used = [], 0
    for hit in hits:
        n = count_tokens(hit.memory.text)
        if kept and used + n > budget:
            continue
        kept.append(hit)
        used += n
    return kept
