"""Serving an adapter version on an engine that runs the model out of process (vLLM through generate_openai):
each adapter of the version's stack is published under its own name (mem-vNNNN), and each prompt is sent to one
of them, or to the base model, chosen here by content.

The activation router (routing.Router) reads the adapter's LoRA updates inside the model, which an engine does not
expose; what it does not need is the choice by content (stack.RouterStack): a prompt whose question is at least
an adapter's calibrated similarity bar (router.json "similarity") to the nearest of its trained prompts (keys.npy)
gets that adapter. So on an engine an adapter acts on a prompt exactly when, in-process, it would act by content;
in-process it may also act on a prompt that excites it without being near its keys (docs/server.md).

  - one adapter without a router: always on, as in-process;
  - one adapter or a stack with routers: the adapter of the nearest key when the prompt reaches its bar and holds
    no veto marker (retrieved sources, with adapter_with_sources off), else the base model;
  - an adapter without keys or without a similarity bar never acts on an engine (it routes by activation only);
  - a stack in which an adapter has no router is refused: in-process those adapters act together on every
    prompt, and an engine applies one adapter per request.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from memory_llm.adapters.keys import read_keys, read_owners, unit
from memory_llm.adapters.registry import AdapterVersion
from memory_llm.adapters.routing import LastRouted, contains, occurrences, read_router
from memory_llm.errors import ModelError, StoreError

logger = logging.getLogger(__name__)

PREFIX = "mem-"  # engine names of published adapters: mem-v0003, a tenant's mem-<slug>-v0003


def engine_name(version: AdapterVersion | str) -> str:
    """The name an adapter version is published under on the engine (a tenant's carries its slug)."""
    if isinstance(version, str):
        return PREFIX + version
    return PREFIX + (f"{version.tenant}-" if version.tenant else "") + version.name


def engine_names(tenant: str | None):
    """The pattern of the engine names of one registry's versions (tenant: its slug; None: the shared one)."""
    return re.compile("^" + re.escape(PREFIX + (f"{tenant}-" if tenant else "")) + r"v\d{4,}$")


@dataclass
class RemoteAdapter:
    """One published adapter: its version name, engine name, routing keys (None: none) and similarity bar (None:
    none), and whether it has a router at all (without one it is always on)."""

    version: str
    name: str
    keys: object = None
    similarity: float | None = None
    routed: bool = True
    owners: object = None  # each key's memory (keys.read_owners; None: not recorded)
    holds: tuple = ()  # the memories (an exemplar: its negative id) the adapter was trained on
    stale: object = None  # which keys' memories are no longer true (keys.stale_masks), or None


class ContentRoute(LastRouted):
    """Chooses, per prompt (token ids), the engine adapter that acts or None for the base model. Quacks like a
    Router for ServedModel (veto, after, active, acted, last_on, remove).

    Args:
        adapters: the published adapters, oldest first.
        embed: (token rows, chat head) → sentence embeddings of their questions (stack.prompt_embedder).
        head: the chat template's shared head (router.json "head"), skipped before a prompt's own tokens.
    """

    def __init__(self, adapters: Sequence[RemoteAdapter], embed: Callable | None = None, head: Sequence[int] = ()):
        self.adapters, self.embed, self.head = list(adapters), embed, list(head)
        self.stale_bar = 1.0  # a question this similar to a stale key gets no adapter holding it (update_stale)
        self.veto: list[int] = []  # a prompt holding this token sequence gets the base model
        self.after: list[int] = []  # a prompt holding this token sequence is routed on the tokens after it
        self._last = threading.local()  # the last choice, per thread: the server answers several requests at once

    def _get(self, name: str) -> list:
        return getattr(self._last, name, [])

    @property
    def last_on(self) -> list[bool]:
        """Whether an adapter acts on each row of this thread's last choice."""
        return self._get("on")

    @property
    def last_adapter(self) -> list[str | None]:
        """The version acting on each row of this thread's last choice (None: the base model)."""
        return self._get("adapter")

    @property
    def last_similarity(self) -> list[float]:
        """Each row's similarity to its nearest key in this thread's last choice."""
        return self._get("similarity")

    @property
    def always(self) -> RemoteAdapter | None:
        """The adapter that acts on every prompt (a lone adapter without a router), or None."""
        return self.adapters[0] if len(self.adapters) == 1 and not self.adapters[0].routed else None

    def own_tokens(self, row: list[int]) -> list[int]:
        """A prompt's own tokens: after the chat head (when it starts with it) and after the last `after`."""
        h = len(self.head)
        start = h if h and row[:h] == self.head and len(row) > h else 0
        if self.after:
            start = max((start + i + len(self.after) for i in occurrences(row[start:], self.after)), default=start)
        return row[start:]

    def update_stale(self, stale_of, bar: float) -> None:
        """Mark each adapter's keys whose memories are no longer true (RouterStack.update_stale does the same
        in-process); an always-on adapter holding such a memory stops acting."""
        from memory_llm.adapters.keys import stale_masks

        candidates = {int(i) for a in self.adapters if a.owners is not None for i in a.owners}
        candidates |= {int(i) for a in self.adapters for i in a.holds}
        stale = stale_of(candidates) if candidates else set()
        masks = stale_masks([a.owners for a in self.adapters], stale,
                            [a.owners is None and bool(set(a.holds) & stale) for a in self.adapters])
        for a, mask in zip(self.adapters, masks):
            a.stale = mask
        self.stale_bar = bar

    def blocks(self, vector) -> bool:
        """Whether a question (its sentence embedding) is kept from some adapter by a stale key."""
        import numpy as np

        from memory_llm.adapters.keys import blocked

        if not any(a.stale is not None for a in self.adapters):
            return False
        q = unit(np.asarray(vector, dtype=np.float32).reshape(1, -1))
        return bool(blocked(q, [a.keys for a in self.adapters], [a.stale for a in self.adapters],
                            self.stale_bar).any())

    def choose(self, rows: Sequence[Sequence[int]]) -> list[str | None]:
        """Each row's engine adapter name (None: the base model); kept in last_on, last_adapter."""
        rows = [list(r) for r in rows]
        always = self.always if self.always is None or self.always.stale is None else None
        chosen: list[RemoteAdapter | None] = [always] * len(rows)
        sims = [1.0 if always else 0.0] * len(rows)
        candidates = [a for a in self.adapters if a.keys is not None and a.similarity is not None]
        if self.always is None and candidates and self.embed is not None and rows:
            import numpy as np

            allowed = [i for i, r in enumerate(rows) if not (self.veto and contains(r, self.veto))]
            if allowed:
                queries = unit(np.asarray(self.embed([self.own_tokens(rows[i]) for i in allowed], self.head),
                                          dtype=np.float32))
                from memory_llm.adapters.keys import blocked

                best = np.stack([(queries @ a.keys.T).max(axis=1) for a in candidates], axis=1)
                best[blocked(queries, [a.keys for a in candidates], [a.stale for a in candidates],
                             self.stale_bar)] = -np.inf
                for j, i in enumerate(allowed):
                    k = int(best[j].argmax())
                    sims[i] = float(best[j, k])
                    if np.isfinite(sims[i]) and sims[i] >= candidates[k].similarity:
                        chosen[i] = candidates[k]
        self._last.similarity = sims
        self._last.on = [a is not None for a in chosen]
        self._last.adapter = [a.version if a is not None else None for a in chosen]
        return [a.name if a is not None else None for a in chosen]

    def decide(self, input_ids, mask=None) -> list[bool]:
        """Router's decide: whether an adapter acts on each row (a batch of ids)."""
        self.choose([[int(t) for t in row] for row in input_ids])
        return self.last_on

    def remove(self) -> None:
        """Nothing is hooked into a model: routing happens before the request."""


def remote_adapters(version: AdapterVersion) -> tuple[list[RemoteAdapter], list[int]]:
    """The version's stack as adapters an engine can serve (oldest first), and the chat head to skip when routing.
    A stack that cannot be served one adapter per request is a ModelError."""
    out, head = [], []
    for v in version.stack:
        try:
            router, keys = read_router(v.path), read_keys(v.path)
        except ValueError as exc:
            raise StoreError(f"adapter {v.name} is broken: {exc}") from None
        holds = (*v.own_memories, *(-e for e in v.own_exemplars))
        try:
            owners = read_owners(v.path)
        except ValueError as exc:
            raise StoreError(f"adapter {v.name} is broken: {exc}") from None
        if router is None:
            out.append(RemoteAdapter(v.name, engine_name(v), routed=False, owners=owners, holds=holds))
            continue
        head = head or router["head"]
        if keys is None or router.get("similarity") is None:
            logger.warning("adapter %s routes by activation only: on a remote engine it does not act", v.name)
        out.append(RemoteAdapter(v.name, engine_name(v), None if keys is None else unit(keys), router.get("similarity"),
                                 owners=owners, holds=holds))
    if len(out) > 1 and not all(a.routed for a in out):
        raise ModelError(f"adapter {version.name} stacks {len(out)} adapters, some without a router (they act"
                         " together); an engine applies one adapter per request: serve it in-process"
                         " (generator_backend = transformers) or use --no-adapter")
    return out, head


def publish(generator, version: AdapterVersion, embed: Callable | None = None) -> ContentRoute:
    """Load the version's adapters onto the generator's engine (those already loaded from the same directory are
    kept) and return the route that chooses among them. `generator` is an OpenAIGenerator (adapters,
    load_adapter); `embed` is stack.prompt_embedder over the home's embedder."""
    adapters, head = remote_adapters(version)
    loaded = generator.adapters()
    paths = {v.name: str(Path(v.path).resolve()) for v in version.stack}
    for a in adapters:
        path = paths[a.version]
        if a.name in loaded:
            if loaded[a.name] not in (None, path):
                raise ModelError(f"the engine already serves an adapter named {a.name} from {loaded[a.name]}, not"
                                 f" {path} (another memory home?); unload it or give each home its own engine")
            continue
        try:
            generator.load_adapter(a.name, path)
        except ModelError as exc:
            raise ModelError(f"cannot publish adapter {a.version} to the engine: {exc} (start vLLM with"
                             " --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, on a machine that reads"
                             " the memory home; or use --no-adapter)") from None
        logger.info("published adapter %s to the engine as %s", a.version, a.name)
    return ContentRoute(adapters, embed, head)


def unpublish(generator, keep: Sequence[str] = (), tenant: str | None = None) -> list[str]:
    """Unload the engine's adapters of one registry (the shared one, or the tenant's with this slug) except those
    named in `keep` (rollback, promotion); other tenants' adapters stay. Returns those unloaded."""
    gone, ours = [], engine_names(tenant)
    for name in generator.adapters():
        if ours.match(name) and name not in keep:
            generator.unload_adapter(name)
            gone.append(name)
    return gone
