"""What a consolidation round trains: the memories not yet in an adapter, and the rounds that went stale.

A round whose adapter holds a memory that is no longer true (superseded, in part or whole, or forgotten), or an
exemplar since retired, is retrained: its still-true memories (a partly superseded one as its live text) go into
the new round with the new memories, and the rounds that hold nothing stale keep serving beside it untouched. Only
`--full` rebuilds every round. The gate then checks that the candidate no longer answers an old value
(`stale_probes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memory_llm.adapters import AdapterRegistry, AdapterVersion
from memory_llm.adapters.registry import tenants
from memory_llm.store import Exemplar, Item, Store
from memory_llm.statements import stale_values


@dataclass
class Selection:
    """The plan of a round (select)."""

    current: AdapterVersion | None
    namespaces: list[str]
    new: list[int]  # memories this round's adapter trains: not yet consolidated, and those of the retrained rounds
    keep_covered: list[int]  # memories earlier rounds keep serving (not retrained here)
    below: list[AdapterVersion]  # rounds served beside the new adapter, untouched
    stacked: bool  # a fresh adapter beside `below` (else the round continues the current adapter)
    full: bool
    new_ex: list[Exemplar] = field(default_factory=list)  # exemplars this round trains
    old_ex: list[Exemplar] = field(default_factory=list)  # exemplars earlier rounds keep serving
    stale: set[int] = field(default_factory=set)  # consolidated memories no longer true
    retrained: list[str] = field(default_factory=list)  # the rounds retrained because they held stale memories


def select(store: Store, registry: AdapterRegistry, namespace: str | None, max_stack: int, full: bool) -> Selection:
    """The memories and exemplars of this round, and which earlier rounds serve beside it (module docstring)."""
    current = registry.current()
    shared_out = tenants(registry.home)  # a tenant's adapter covers its namespace only; the shared one the rest
    namespaces = [namespace] if namespace is not None else \
        [ns for ns in store.stats()["namespaces"] if ns not in shared_out]
    live = {i for ns in namespaces for i in store.memory_ids(ns)}
    stack = current.stack if current is not None else []
    covered = set(current.manifest.get("memories", [])) if current else set()
    good = [e for e in store.exemplars(namespace, min_rating=1) if e.namespace in namespaces]
    ex_covered = set(current.manifest.get("exemplars", [])) if current else set()
    stale = store.stale_ids(covered) if covered else set()
    retired = store.prompts.retired(sorted(ex_covered)) if ex_covered else set()
    affected = [v for v in stack if set(v.own_memories) & stale or set(v.own_exemplars) & retired]
    if full or current is None:
        return Selection(current, namespaces, sorted(live), [], [], False, full, good, [], stale)
    if affected:  # retrain the stale rounds into one beside the others
        below = [v for v in stack if v not in affected]
        held = set().union(*(set(v.own_memories) for v in affected))
        held_ex = set().union(*(set(v.own_exemplars) for v in affected))
        new = sorted((live - covered) | (held & live))
        keep = sorted((covered - held) & live - stale)
        return Selection(current, namespaces, new, keep, below, True, False,
                         [e for e in good if e.id not in ex_covered or e.id in held_ex],
                         [e for e in good if e.id in ex_covered and e.id not in held_ex], stale,
                         [v.name for v in affected])
    stacked = len(stack) < max_stack
    return Selection(current, namespaces, sorted(live - covered), sorted(covered & live), stack if stacked
                     else current.below, stacked, False, [e for e in good if e.id not in ex_covered],
                     [e for e in good if e.id in ex_covered], stale)


def stale_probes(store: Store, stale: set[int]) -> list[tuple[Item, list[str]]]:
    """Questions about what went stale, each with the old values an answer must not contain: the training items
    (questions and statements to complete) of the superseded memories and of what superseded them, with the values
    the old memory (or its stale sentence) held that its successor does not."""
    standing = store.supersessions.standing(sorted(stale)) if stale else {}
    ids = sorted(set(standing) | {x.new_id for rows in standing.values() for x in rows if x.new_id})
    memories = store.get(ids)
    items = {}
    for it in store.items(ids):
        items.setdefault(it.memory_id, []).append(it)
    out = []
    for old_id, rows in standing.items():
        for x in rows:
            old = x.sentence or (memories[old_id].text if old_id in memories else "")
            successor = memories[x.new_id].live_text if x.new_id in memories else ""
            old_values = stale_values(old, successor, x.detail.get("old_values"))
            old_values = [v for v in phrases(old, old_values) if not mentions(successor, v)]  # still held: not old
            for it in items.get(old_id, []) + items.get(x.new_id, []):
                if old_values and not any(mentions(it.prompt, v) for v in old_values):  # (an answer may echo
                    out.append((it, old_values))  # a value its question names: that is not the adapter's)
    return out


def phrases(text: str, found: list[str]) -> list[str]:
    """The values, as the phrases they form in the text: values next to each other ("stone frog", "Odile
    Marchbank") are one phrase; a value not in the text stays as it is."""
    import re

    spans = sorted((m.start(), m.end()) for v in dict.fromkeys(found)
                   for m in [re.search(rf"(?<!\w){re.escape(v)}(?!\w)", text)] if m)
    out: list[str] = []
    last = -2
    for start, end in spans:
        if out and text[last:start].strip() == "":
            out[-1] += text[last:end]
        else:
            out.append(text[start:end])
        last = end
    return out + [v for v in found if not any(v in p for p in out)]


def mentions(text: str, value: str) -> bool:
    """Whether a text holds a value as whole words: exactly for a code or number (letter case counts: "Tulip9"),
    in any case for words and names."""
    import re

    digits = any(c.isdigit() for c in value)
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text, 0 if digits else re.I) is not None
