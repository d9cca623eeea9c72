"""Retrieval: dense (vector index) and lexical (FTS5/BM25) candidates of live memories fused, by their scores
(convex, the default) or by their ranks (reciprocal-rank fusion); the Retriever owns the filters (namespace, live
only) and reports conflicts among what it found."""

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


class Retriever:
    """Retrieval and its filters in one place: the namespace, and live memories only (a superseded memory is out
    of the vector index and lexical search; `history=True` ranks superseded ones too, marked by their status).
    Among the hits, two live memories that still disagree (the detector's rule, memory_llm.supersede, short of a
    supersession: each holds a value of the same statement) are reported as a conflict, the newer one first.

    Args:
        store: the home's store.
        embedder: the home's embedder.
        settings: fusion, lexical_weight, rrf_k.
    """

    def __init__(self, store: Store, embedder: Embedder, settings):
        self.store, self.embedder, self.settings = store, embedder, settings

    def search(self, query: str | Sequence[str], k: int = 4, namespace: str | None = None, vectors=None,
               floor: float = 0.0, history: bool = False) -> list[Hit]:
        """The k best memories for a query (or several, e.g. a conversation's turns), dense and lexical candidates
        of every query fused (settings.fusion: "convex", scores with the lexical side weighted lexical_weight, or
        "rrf", ranks). `vectors` are the queries' embeddings when the caller has them.

        With a `floor` (`ask`'s source floor), a memory whose best cosine similarity to a query is below it is left
        out, however well it ranks lexically: a memory beyond every query's dense candidates is below the last of
        them, so it is left out when that is below the floor (and kept otherwise, its similarity unknown)."""
        s = self.settings
        queries = [query] if isinstance(query, str) else [q for q in query if q.strip()]
        if k <= 0 or not queries or not queries[0].strip():
            return []
        fetch = max(4 * k, 20)
        vectors = self.embedder.encode(queries) if vectors is None else vectors
        superseded = self.store.superseded_vectors(namespace) if history else ([], None)
        pairs, similarity, bound = [], {}, -1.0
        for q, vector in zip(queries, vectors):
            dense = self.store.dense(vector, fetch, namespace)
            if superseded[1] is not None:  # superseded memories are not in the index: scored exactly
                scores = superseded[1] @ np.asarray(vector, dtype=np.float32).reshape(-1)
                dense = sorted(dense + [(i, float(x)) for i, x in zip(superseded[0], scores)],
                               key=lambda p: -p[1])[:fetch]
            pairs.append((dense, self.store.lexical(q, fetch, namespace, superseded=history)))
            for i, sc in dense:
                similarity[i] = max(similarity.get(i, -1.0), float(sc))
            bound = max(bound, float(dense[-1][1]) if len(dense) == fetch else -1.0)  # beyond: below this
        if s.fusion == "convex":
            found = {i for dense, _ in pairs for i, _ in dense}
            stored = self.store.embeddings(list({i for _, lexical in pairs for i, _ in lexical} - found))
            exact: dict[tuple[int, int], float] = {}
            for q, vector in enumerate(vectors):
                for i, v in stored.items():
                    exact[q, i] = float(np.dot(v, vector)) if v.shape == np.shape(vector) else 0.0
                    similarity[i] = max(similarity.get(i, -1.0), exact[q, i])  # known now: the floor reads it
            ranked = convex(pairs, s.lexical_weight, lambda q, i: exact.get((q, i), 0.0))
        else:
            ranked = rrf([r for p in pairs for r in p], s.rrf_k)
        fused = [f for f in ranked if floor <= 0 or similarity.get(f[0], bound) >= floor][:k]
        memories = self.store.get([i for i, _, _ in fused])
        return [Hit(memories[i], score, ranks[0], ranks[1], similarity.get(i)) for i, score, ranks in fused
                if i in memories]

    def conflicts(self, hits: Sequence[Hit]) -> list[dict]:
        """Pairs of live hits that still disagree: the newer may restate the older with other values (the
        detector's probability at least CONFLICT_PROBABILITY, short of a supersession). Each: {"newer", "older",
        "sentence" (the older one's), "old_values", "new_values", "probability"}."""
        from memory_llm.supersede import CONFLICT_PROBABILITY, batched_similarity, detect

        live = [h.memory for h in hits if h.memory.live]
        pairs = [(a, b) for a in live for b in live if (a.valid_from, a.id) > (b.valid_from, b.id)]  # a the newer
        similarity = batched_similarity(self.embedder.encode, [(b.live_text, a.live_text) for a, b in pairs],
                                        CONFLICT_PROBABILITY)
        return [{"newer": a.id, "older": b.id, "sentence": r.sentence, "old_values": r.old_values,
                 "new_values": r.new_values, "probability": round(r.probability, 3)}
                for a, b in pairs for r in detect(b.live_text, a.live_text, similarity, threshold=CONFLICT_PROBABILITY)]

    @staticmethod
    def read_as(hits: Sequence[Hit], conflicts: Sequence[dict] = ()) -> list[str]:
        """The hits as the model reads them: dated, what is still true of each, and where two disagree the older
        one's disagreeing sentence left out (the newer one leads); a hit left with nothing is left out."""
        from dataclasses import replace

        hidden: dict[int, tuple[str, ...]] = {}
        for c in conflicts:
            hidden[c["older"]] = hidden.get(c["older"], ()) + (c["sentence"],)
        out = []
        for h in hits:
            m = h.memory
            if m.id in hidden:
                m = replace(m, stale_sentences=m.stale_sentences + hidden[m.id])
                if not m.live_text.strip():
                    continue
            out.append(m.prompt_text)
        return out

    @staticmethod
    def newer_first(hits: list[Hit], conflicts: Sequence[dict]) -> list[Hit]:
        """The hits with the newer memory of each conflict moved just before the older one."""
        order = [h.memory.id for h in hits]
        for c in conflicts:
            if c["newer"] in order and c["older"] in order and order.index(c["newer"]) > order.index(c["older"]):
                order.remove(c["newer"])
                order.insert(order.index(c["older"]), c["newer"])
        by_id = {h.memory.id: h for h in hits}
        return [by_id[i] for i in order]


def pack(hits: Sequence[Hit], count_tokens: Callable[[str], int], budget: int) -> list[Hit]:
    """Keep hits in rank order while their texts fit the token budget (at least the first one, truncated
    by the caller's model window if need be)."""
    kept, used = [], 0
    for hit in hits:
        n = count_tokens(hit.memory.prompt_text)
        if kept and used + n > budget:
            continue
        kept.append(hit)
        used += n
    return kept
