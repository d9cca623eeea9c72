"""Adapters from several consolidation rounds can serve side by side (Recipe.max_stack), each with its own router.
The activation score tells memory prompts from generic ones but not one round's memories from another's (on
Fictional Knowledge both rounds' adapters scored both rounds' probes alike; docs/lab-notes.md), so a RouterStack
chooses the adapter by content: each adapter keeps the sentence embeddings of its trained prompts (keys.npy, the
home's embedder), a prompt goes to the adapter holding its nearest key, and that adapter's own router decides
whether it acts. Without keys (adapters made before them) or an embedder, the prompt gets the adapter it excites
most (score ÷ threshold) among those whose threshold it reaches.
"""

from __future__ import annotations

import logging
import re
from typing import Sequence

from memory_llm.adapters.keys import blocked, unit
from memory_llm.adapters.routing import LastRouted, Router, contains, occurrences
from memory_llm.generate import continues_sequence

logger = logging.getLogger(__name__)


class RouterStack(LastRouted):
    """The routers of adapters stacked on one model (one adapter per consolidation round; run.py, Recipe.max_stack).
    At a prefill each row gets at most one adapter. With `keys` for every adapter and `embed` ((token rows, chat
    head) → sentence embeddings; `prompt_embedder`), the row's adapter is the one holding the key nearest to it, and it acts
    when its router, scoring with only that adapter acting (as it was calibrated), lets it, or when the row is as
    similar to that key as the router's `similarity` (a question about a memory in other words than trained; a
    veto still holds). Otherwise each router
    scores the rows alone and a row gets, of the adapters whose threshold it reaches, the one it excites most
    (score ÷ threshold). Quacks like a Router for its users (veto, after, active, last_on, remove)."""

    def __init__(self, routers: Sequence[Router], keys: Sequence | None = None, embed=None,
                 owners: Sequence | None = None):
        if not routers:
            raise ValueError("a router stack needs a router")
        self.routers = list(routers)
        if keys is not None and len(keys) != len(self.routers):
            raise ValueError("a router stack needs one key set per router")
        self.owners = list(owners) if owners is not None else [None] * len(self.routers)  # each key's memory
        self.keys = None if keys is None or embed is None or any(k is None or not len(k) for k in keys) \
            else [unit(k) for k in keys]
        self.embed = embed
        self.stale: list = [None] * len(self.routers)  # per adapter: its stale keys (keys.stale_masks), or None
        self.stale_bar = 1.0  # a question this similar to a stale key gets no adapter holding it (set_stale)
        self._hooks: list = []
        self.last_on: list[bool] = []  # whether some adapter acted on each row of the last routed prefill
        self.last: list[float] = []  # each row's chosen adapter's score ÷ threshold (0: no adapter acted)
        self.last_adapter: list[str | None] = []  # the adapter that acted on each row (None: the base model)

    @property
    def by_content(self) -> bool:
        """Whether the adapter is chosen by the prompt's nearest key (else by activation)."""
        return self.keys is not None

    @property
    def veto(self) -> list[int]:
        return self.routers[0].veto

    @veto.setter
    def veto(self, part: list[int]) -> None:
        for r in self.routers:
            r.veto = part

    @property
    def after(self) -> list[int]:
        return self.routers[0].after

    @after.setter
    def after(self, part: list[int]) -> None:
        for r in self.routers:
            r.after = part

    def install(self) -> "RouterStack":
        for r in self.routers:
            r.remove()
            r.install(route=False)
        if not self._hooks:
            inner = self.routers[0].model.get_base_model()
            self._hooks = [inner.register_forward_pre_hook(self._route, with_kwargs=True)]
        return self

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for r in self.routers:
            r.remove()

    def update_stale(self, stale_of, bar: float) -> None:
        """Mark the keys whose memories are no longer true: `stale_of` takes memory ids (an exemplar's negative)
        and returns those superseded, forgotten or retired; an adapter whose keys' memories were not recorded is
        stale as a whole when it holds such a memory (Router.holds)."""
        from memory_llm.adapters.keys import stale_masks

        holds = [set(r.holds) for r in self.routers]
        candidates = {int(i) for o in self.owners if o is not None for i in o} | set().union(*holds)
        stale = stale_of(candidates) if candidates else set()
        self.set_stale(stale_masks(self.owners, stale, [o is None and bool(h & stale)
                                                        for o, h in zip(self.owners, holds)]), bar)

    def blocks(self, vector) -> bool:
        """Whether a question (its sentence embedding) is kept from some adapter by a stale key."""
        import numpy as np

        if not any(m is not None for m in self.stale):
            return False
        q = unit(np.asarray(vector, dtype=np.float32).reshape(1, -1))
        return bool(blocked(q, self.keys, self.stale, self.stale_bar).any())

    def set_stale(self, masks: list, bar: float) -> None:
        """Which keys of each adapter came from memories no longer true (keys.stale_masks), and how similar a
        question must be to one of them to be kept from that adapter (keys.blocked)."""
        if len(masks) != len(self.routers):
            raise ValueError("a router stack needs one stale mask (or None) per router")
        self.stale, self.stale_bar = list(masks), bar

    def nearest(self, rows: Sequence[Sequence[int]]) -> list[int]:
        """Each row's adapter by content: the index of the router whose keys hold the row's nearest key."""
        return self.nearest_keys(rows)[0]

    def nearest_keys(self, rows: Sequence[Sequence[int]]) -> tuple[list[int], list[float]]:
        """Each row's adapter by content and the row's cosine similarity to that adapter's nearest key: among the
        adapters not blocked for it by a stale key (index -1 when every adapter is)."""
        chosen, sims, _ = self._nearest(rows)
        return chosen, sims

    def _nearest(self, rows: Sequence[Sequence[int]]) -> tuple[list[int], list[float], list[bool]]:
        """nearest_keys, and whether each row is about a memory no longer true (a stale key blocks an adapter)."""
        import numpy as np

        queries = unit(np.asarray(self.embed([list(r) for r in rows], self.routers[0].head), dtype=np.float32))
        best = np.stack([(queries @ k.T).max(axis=1) for k in self.keys], axis=1)
        stale = blocked(queries, self.keys, self.stale, self.stale_bar)
        best[stale] = -np.inf
        chosen = [int(i) if np.isfinite(row.max()) else -1 for i, row in zip(best.argmax(axis=1), best)]
        return chosen, [float(x) if np.isfinite(x) else -1.0 for x in best.max(axis=1)], stale.any(axis=1).tolist()

    def _route(self, mod, args, kwargs):
        if any(r.busy for r in self.routers) or continues_sequence(args, kwargs):
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None or self.routers[0].disabled:
            for r in self.routers:
                r.gate = None
            return None
        self.decide(input_ids, kwargs.get("attention_mask"))
        return None

    def decide(self, input_ids, mask=None) -> list[bool]:
        """Choose each row's adapter and whether it acts (kept in last, last_on, last_adapter), and set the gates."""
        device, n = input_ids.device, input_ids.shape[0]
        chosen, near = None, [False] * n
        if self.by_content:
            rows, masks = input_ids.tolist(), mask if mask is not None else [None] * n
            try:
                chosen, sims, about_stale = self._nearest([row[self.routers[0].own_tokens(row, m)[0]]
                                                           for row, m in zip(rows, masks)])
                bars = [self.routers[k].similarity if k >= 0 else None for k in chosen]
                veto = self.routers[0].veto
                near = [bar is not None and sim >= bar and not contains(row, veto)
                        for bar, sim, row in zip(bars, sims, rows)]
                # a question about a memory no longer true gets an adapter only where it is near that adapter's
                # own (live) keys: one that learned what replaced it, not one that its activation alone passes
                chosen = [k if not stale or close else -1 for k, stale, close in zip(chosen, about_stale, near)]
            except ValueError as exc:  # keys from another embedder (another width): choose by activation
                logger.warning("adapter keys do not match the embedder (%s): choosing adapters by activation", exc)
                self.keys = None
        excitement = []
        for k, r in enumerate(self.routers):  # each scores with the others' adapters off
            whole = chosen is None and self.stale[k] is not None  # by activation: an adapter holding a stale
            if whole or chosen is not None and k not in chosen:  # memory acts on nothing; no row chose it: not scored
                r.last, r.last_on, r.last_chat = [0.0] * n, [False] * n, [False] * n
                excitement.append([0.0] * n)
                continue
            for other in self.routers:
                other.gate = Router.gate_of([False] * n, device)
            on = r.decide(input_ids, mask)
            excitement.append([self._excitement(s / max(r.threshold_for(c), 1e-12), o, near[i],
                                                chosen is None or chosen[i] == k)
                               for i, (s, c, o) in enumerate(zip(r.last, r.last_chat, on))])
        best = [max(range(len(self.routers)), key=lambda k: excitement[k][i]) for i in range(n)]
        self.last = [excitement[best[i]][i] for i in range(n)]
        self.last_on = [x > 0 for x in self.last]
        self.last_adapter = [self.routers[best[i]].name if on else None for i, on in enumerate(self.last_on)]
        for k, r in enumerate(self.routers):
            r.last_on = [on and best[i] == k for i, on in enumerate(self.last_on)]
            r.gate = Router.gate_of(r.last_on, device)
        return self.last_on

    @staticmethod
    def _excitement(ratio: float, passed: bool, near: bool, mine: bool) -> float:
        """A row's excitement of one adapter: its score ÷ threshold where its router passed it, at least 1 where
        it is near the adapter's keys (Router.similarity), 0 where it chose another adapter or neither holds."""
        if not mine:
            return 0.0
        return max(ratio, 1.0) if near else ratio if passed else 0.0


def prompt_embedder(tokenizer, embed):
    """(token rows, chat head) → unit sentence embeddings of each row's question, for RouterStack's choice. A row is
    a prompt's own tokens (after the chat head); its question is the text after the last user-turn marker (the
    head's tail from its last special token: later turns of a conversation carry one) up to the next special token
    (the turn's end), so a chat question embeds as the question alone, as its key was made, and raw text as itself.
    `embed` is texts → vectors (the home's embedder)."""
    special = set(tokenizer.all_special_ids)

    def run(rows, head=()):
        head = list(head)
        last = max((i for i, t in enumerate(head) if t in special), default=None)
        marker = head[last:] if last is not None else []
        texts = []
        for row in rows:
            row = list(row)
            start = max((i + len(marker) for i in occurrences(row, marker)), default=0)
            cut = next((i for i in range(start, len(row)) if row[i] in special), len(row))
            text = tokenizer.decode(row[start:cut]).strip()  # after retrieved sources: "Question: ..." (the
            texts.append(re.sub(r"^question:\s*", "", text, flags=re.I))  # router's `after`), as the question
        return embed(texts)
    return run
