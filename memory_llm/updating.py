"""What is true now: deciding, when memories are learned, what they keep, repeat or supersede, and reading a
memory's history.

A new memory supersedes an older one when it comes from the same source (a re-learned file's changed chunk, a text
learned again under the same key), when the user says so (`learn --supersedes ID`, `update`, a correction that
contradicts a cited memory), or when the detector (memory_llm.supersede) finds that it restates the older one with
other values. Superseded memories are kept (store/supersessions.py) and every decision can be reverted (`restore`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from memory_llm.errors import InputError
from memory_llm.store import Memory, Store
from memory_llm.store.records import NewChunk
from memory_llm.store.supersessions import Supersession
from memory_llm.statements import sentences, stale_values, values
from memory_llm.supersede import CANDIDATE_SIMILARITY, batched_similarity, detect, pair_similarities

logger = logging.getLogger(__name__)

NEIGHBOURS = 8  # stored memories nearest a new chunk: checked for a repeat and for a restatement
SUCCESSOR_SIMILARITY = 0.5  # a re-learned source's changed chunk is succeeded by its most similar new chunk, if this close
NEAR_TEXT = 0.9  # near-duplicate texts: difflib's ratio of their words at least this (and the same values)


@dataclass
class Plan:
    """What one source's learn stores: its new chunks, the unchanged chunks it keeps, what it supersedes."""

    chunks: list[NewChunk] = field(default_factory=list)
    kept: dict[int, int] = field(default_factory=dict)  # memory id → position
    supersessions: list[Supersession] = field(default_factory=list)
    duplicates: int = 0
    near_duplicates: int = 0
    replaced: bool = False  # the source had memories before


def same_text(a: str, b: str) -> bool:
    """Whether two texts are what a user would call the same text: the same values, exactly (a change of one
    value or of letter case in a code makes another memory), and nearly the same words."""
    import difflib

    if values(a) != values(b):
        return False
    wa, wb = a.lower().split(), b.lower().split()
    return difflib.SequenceMatcher(None, wa, wb, autojunk=False).ratio() >= NEAR_TEXT


class Updater:
    """Plans what a learn keeps, skips and supersedes; retires exemplars a supersession made stale; reads history.

    Args:
        store: the home's store.
        embedder: the home's embedder (sentence similarities for the detector).
        settings: dedup_threshold.
    """

    def __init__(self, store: Store, embedder, settings):
        self.store, self.embedder, self.settings = store, embedder, settings

    # ---- checks --------------------------------------------------------------------------------------------
    def check_supersedes(self, ids: Sequence[int], namespace: str) -> list[int]:
        """The memory ids a learn is told to supersede, each checked: it exists, is in the namespace, is live."""
        ids = list(dict.fromkeys(int(i) for i in ids))
        found = self.store.get([i for i in ids if 0 < i < 2 ** 63]) if ids else {}
        for i in ids:
            m = found.get(i)
            if m is None:
                raise InputError(f"no memory has id {i}")
            if m.namespace != namespace:
                raise InputError(f"memory {i} is in namespace {m.namespace!r}, not {namespace!r}")
            if not m.live:
                raise InputError(f"memory {i} is already superseded (`mllm history {i}` shows by what)")
        return ids

    # ---- planning ------------------------------------------------------------------------------------------
    def plan(self, namespace: str, uri: str, chunks: list[NewChunk], *, supersedes: Sequence[int] = (),
             reason: str = "user", detect: bool = True) -> Plan:
        """What storing a source's chunks does: keep the source's unchanged chunks, skip repeats of live memories
        elsewhere, succeed the source's changed chunks, and supersede what the new chunks restate or what the user
        named."""
        plan = Plan()
        old = self.store.source_memories(namespace, uri)
        plan.replaced = bool(old)
        unchanged: dict[str, list[Memory]] = {}
        for m in old:
            unchanged.setdefault(m.text, []).append(m)
        fresh: list[NewChunk] = []
        first: int | None = None  # the memory that holds the source's first chunk (for supersedes), if stored
        for c in chunks:
            same = unchanged.get(c.text)
            if same:
                m = same.pop(0)
                plan.kept[m.id] = c.position
                first = m.id if first is None else first
            else:
                fresh.append(c)
        own = {m.id for m in old}
        near = self.store.neighbours(np.stack([c.vector for c in fresh]), NEIGHBOURS, namespace, own) if fresh \
            else []
        stored = self.store.existing_hashes(namespace, [c.content_hash for c in fresh], exclude_uri=uri)
        texts = self.store.get(sorted({i for row in near for i, _ in row}))
        first_fresh: int | str | None = None
        kept_near: list[tuple[int, NewChunk]] = []  # (index in fresh, chunk) of new chunks stored
        for n, c in enumerate(fresh):
            top = next(((i, s) for i, s in near[n] if i in texts), None)
            if c.content_hash in stored or any(c.content_hash == k.content_hash for _, k in kept_near):
                plan.duplicates += 1
                first_fresh = stored.get(c.content_hash) if first_fresh is None else first_fresh
            elif top is not None and top[1] >= self.settings.dedup_threshold and same_text(c.text, texts[top[0]].text) \
                    or any(float(c.vector @ k.vector) >= self.settings.dedup_threshold and same_text(c.text, k.text)
                           for _, k in kept_near):
                plan.near_duplicates += 1
                first_fresh = top[0] if first_fresh is None and top is not None else first_fresh
            else:
                kept_near.append((n, c))
                plan.chunks.append(c)
                first_fresh = "new" if first_fresh is None else first_fresh
        named = set(supersedes)
        plan.supersessions += self._successors([m for ms in unchanged.values() for m in ms if m.id not in named],
                                               plan.chunks, "key" if uri.startswith("key:") else "source")
        successor = (0 if plan.chunks and first_fresh == "new" else None)
        successor_id = first if first is not None else first_fresh if isinstance(first_fresh, int) else None
        for i in supersedes:
            plan.supersessions.append(Supersession(i, successor_id if successor is None else None, reason,
                                                   new_chunk=successor))
        if detect and plan.chunks:
            taken = {x.old_id for x in plan.supersessions if x.sentence is None}
            plan.supersessions += self._detected(namespace, plan.chunks, [near[n] for n, _ in kept_near], texts,
                                                 taken)
        return plan

    def _successors(self, dropped: list[Memory], new: list[NewChunk], reason: str) -> list[Supersession]:
        """A re-learned source's chunks that changed: each succeeded by the most similar new chunk (or by none)."""
        if not dropped:
            return []
        vectors = self.store.embeddings([m.id for m in dropped])
        out = []
        for m in dropped:
            best, score = None, SUCCESSOR_SIMILARITY
            for j, c in enumerate(new):
                v = vectors.get(m.id)
                s = float(v @ c.vector) if v is not None and v.shape == np.shape(c.vector) else -1.0
                if s >= score:
                    best, score = j, s
            out.append(Supersession(m.id, None, reason, new_chunk=best))
        return out

    def _detected(self, namespace: str, chunks: list[NewChunk], near: list[list[tuple[int, float]]],
                  texts: dict[int, Memory], taken: set[int]) -> list[Supersession]:
        """The stored memories (or sentences of them) the new chunks restate with other values; a new chunk that
        became true before what it restates (its valid_from) is the one superseded."""
        out: list[Supersession] = []
        jobs = []  # (new chunk's index, memory id, cosine, older, first text, second text)
        for j, (c, row) in enumerate(zip(chunks, near)):
            for i, cosine in row:
                m = texts.get(i)
                if m is None or cosine < CANDIDATE_SIMILARITY or i in taken or not m.live:
                    continue
                older = c.valid_from is not None and c.valid_from < m.valid_from
                jobs.append((j, i, cosine, older, *((c.text, m.live_text) if older else (m.live_text, c.text))))
        similarity = batched_similarity(self.embedder.encode, [(first, second) for *_, first, second in jobs])
        for j, i, cosine, older, first, second in jobs:
            if i in taken:
                continue
            found = detect(first, second, similarity)
            if not found:
                continue
            whole = {r.sentence for r in found} >= set(sentences(first))
            for r in ([found[0]] if whole else found):
                detail = {**r.as_dict(), "cosine": round(cosine, 3)}
                if older:
                    out.append(Supersession(-1, i, "detected", None if whole else r.sentence, detail,
                                            old_chunk=j))
                else:
                    out.append(Supersession(i, None, "detected", None if whole else r.sentence, detail,
                                            new_chunk=j))
            if whole and not older:
                taken.add(i)
        return out

    def similarities(self, pairs: list[tuple[str, str]]) -> list[float]:
        """The cosine similarity of each (text, text) pair, by the home's embedder."""
        return pair_similarities(self.embedder.encode)(pairs)

    # ---- after a supersession ------------------------------------------------------------------------------
    def stale_values(self, supersessions: Sequence[Supersession]) -> dict[int, list[str]]:
        """Each supersession's stale values (by its id): the detector's, or the old text's values the new lacks."""
        memories = self.store.get(sorted({i for x in supersessions for i in (x.old_id, x.new_id) if i}))
        out = {}
        for x in supersessions:
            old = x.sentence or (memories[x.old_id].text if x.old_id in memories else "")
            new = memories[x.new_id].live_text if x.new_id in memories else ""
            out[x.id] = stale_values(old, new, x.detail.get("old_values"))
        return out

    def retire_exemplars(self, namespace: str, supersessions: Sequence[Supersession]) -> list[int]:
        """Retire the namespace's exemplars whose answer carries a value a supersession made stale (and that cited
        the superseded memory or ask about it). Returns the exemplar ids retired."""
        if not supersessions:
            return []
        exemplars = self.store.exemplars(namespace)
        if not exemplars:
            return []
        stale = self.stale_values(supersessions)
        olds = self.store.get(sorted({x.old_id for x in supersessions}))
        pairs = []
        for e in exemplars:
            cited = set(self.store.logged_answer(e.answer_id).memory_ids) if e.answer_id else set()
            for x in supersessions:
                old = olds.get(x.old_id)
                about = old is not None and bool(_words(e.question) & _words(x.sentence or old.text))
                if any(v in e.answer for v in stale.get(x.id, [])) and (x.old_id in cited or about):
                    pairs.append((e.id, x.id))
                    break
        self.store.prompts.retire(pairs)
        return [e for e, _ in pairs]

    def describe(self, x: Supersession) -> dict:
        """A supersession as a learn reports it, with the text that went stale."""
        old = self.store.get([x.old_id]).get(x.old_id)
        return {**x.as_dict(), "old_text": x.sentence or (old.text if old else None)}

    # ---- corrections ---------------------------------------------------------------------------------------
    def contradicted(self, cited: Sequence[int], question: str, answer: str, correction: str,
                     new_id: int | None) -> list[Supersession]:
        """The cited memories (or sentences) a correction contradicts: the detector's restatements of them by
        "question\\ncorrection", and the sentences whose value the wrong answer repeated while the correction
        gives another."""
        out = []
        memories = [m for m in self.store.get(list(cited)).values() if m.live]
        said = values(correction)
        asked = set(values(question))  # the subject: named by the question, not a value the answer got wrong
        for m in memories:
            found = {r.sentence: r.as_dict() for r in detect(m.live_text, f"{question}\n{correction}",
                                                            self.similarities)}
            for sentence in sentences(m.live_text):
                repeated = [v for v in values(sentence) if v in answer and v not in said and v not in asked]
                if sentence not in found and repeated and [v for v in said if v not in sentence]:
                    found[sentence] = {"sentence": sentence, "old_values": repeated, "new_values": said,
                                       "answer": answer}
            whole = set(found) >= set(sentences(m.live_text))
            for sentence, detail in (list(found.items())[:1] if whole else found.items()):
                out.append(Supersession(m.id, new_id, "correction", None if whole else sentence, detail))
        return out

    # ---- history -------------------------------------------------------------------------------------------
    def history(self, memory_id: int) -> dict:
        """A memory's chain: every memory linked to it by supersessions (before and after), and the supersessions
        in time order with their reasons and reversals."""
        start = self.store.get([memory_id]).get(memory_id)
        if start is None:
            raise InputError(f"no memory has id {memory_id}")
        seen, todo, rows = {memory_id}, [memory_id], {}
        while todo:
            for x in self.store.history(todo.pop()):
                rows[x.id] = x
                for i in (x.old_id, x.new_id):
                    if i is not None and i not in seen:
                        seen.add(i)
                        todo.append(i)
        memories = self.store.get(sorted(seen))
        events = [{**x.as_dict(), "old_text": x.sentence or (memories[x.old_id].text if x.old_id in memories
                                                              else None),
                   "new_text": memories[x.new_id].live_text if x.new_id in memories else None}
                  for x in sorted(rows.values(), key=lambda r: (r.created_at, r.id))]
        return {"memory": start.as_dict(), "memories": [memories[i].as_dict() for i in sorted(memories)],
                "forgotten": sorted(seen - set(memories)), "events": events}


def _words(text: str) -> set[str]:
    """A text's content words, lower-cased (4 letters or more)."""
    import re

    return {w for w in re.findall(r"[a-z0-9]{4,}", text.lower())}
