"""The model that answers: the generator with the promoted adapter attached and routed, loaded lazily.

Serving reaches adapters only through memory_llm.adapters (never memory_llm.consolidate)."""

from __future__ import annotations

import copy
import logging
import threading
from contextlib import contextmanager, nullcontext
from typing import Callable

import numpy as np

from memory_llm.config import Settings

logger = logging.getLogger(__name__)


class ServedModel:
    """The generator `ask`, `chat`, `eval` and the server use, with the home's current adapter on top.

    Args:
        settings: the home's settings (model, device, dtype, adapter_with_sources).
        embed: texts → sentence embeddings (the home's embedder), for routing stacked adapters by content.
        generator: an injected Generator (tests, or one loaded model shared between instances).
        use_adapter: attach the promoted adapter (False: the base model always).
        lock: the facade's lock (the model is loaded once however many threads ask).
        namespace: a tenant namespace: serve its own adapters (adapters/tenants/<slug>/) instead of the shared ones.
        staleness: memory ids (an exemplar's negative) → those no longer true (superseded, forgotten, retired): no
            adapter acts on questions about them (adapters.keys.blocked).
        generation: the store's write counter; staleness is looked up again when it moves.
    """

    def __init__(self, settings: Settings, embed: Callable[[list[str]], np.ndarray], generator=None,
                 use_adapter: bool = True, lock: threading.RLock | None = None, namespace: str | None = None,
                 quick: bool = False, staleness: Callable[[set[int]], set[int]] | None = None,
                 generation: Callable[[], int] | None = None):
        from memory_llm.adapters import AdapterRegistry

        self.settings, self.embed, self.use_adapter = settings, embed, use_adapter
        self.registry = AdapterRegistry(settings.home, namespace)
        self._generator, self._injected = generator, generator
        self._lock = lock or threading.RLock()
        self._attached = False
        self.batching = 0  # > 0: concurrent answers are generated in shared batches of up to this many
        self.quick = quick  # a one-shot ask: cold_backend (llama.cpp) while no adapter is current, as batching
        self.adapter_version: str | None = None
        self.router = None  # the current adapter's router (adapters.routing), if it has one
        self.keys: list = []  # the current adapters' keys (unit embeddings of their trained prompts)
        self.staleness, self.generation = staleness, generation
        self._stale_generation: int | None = None  # the store generation the routers' stale keys agree with

    @property
    def generator(self):
        """The answering generator (loaded on first use), with the current adapter attached."""
        with self._lock:
            if self._generator is None:
                from memory_llm.generate import load_generator

                quick = (self.quick or self.batching) and not (self.use_adapter and self.registry.current())
                self._generator = load_generator(self.settings, quick=quick)
            if self.use_adapter and not self._attached:
                self.attach_current()
            gen = self._generator
            if self.batching and getattr(gen, "batcher", False) is None:  # on a copy of the generator object (the
                gen = self._generator = copy.copy(gen)  # same model): an injected one may be shared elsewhere
                gen.batcher = _batcher(gen, self.batching)
                gen.route_probe = self.routed_rows
                gen.row_gates, gen.set_row_gates = self.row_gates, self.set_row_gates
            return gen

    @property
    def loaded(self) -> bool:
        """Whether the answering generator is loaded (it loads on first use, and again after a change of engine)."""
        return self._generator is not None

    def new_generator(self):
        """A separate base model (no adapter) for consolidation, leaving the serving one untouched; in-process
        even when an engine serves (consolidation trains a torch model)."""
        from memory_llm.generate import TransformersGenerator, load_generator

        if self._injected is not None and not self.remote:
            g = self._injected
            model = copy.deepcopy(g.model)
            model = model.unload() if hasattr(model, "unload") else model
            return TransformersGenerator(model, g.tokenizer, g.name)
        return load_generator(self.settings, in_process=True)

    def sibling(self, namespace: str) -> "ServedModel":
        """A ServedModel for a tenant namespace beside this one: the same settings and lock, its own generator (a copy
        of an injected one; else loaded on first use: a model of its own in-process, a client of the same engine)."""
        gen = None
        if self._injected is not None:
            gen = copy.copy(self._injected) if self.remote else self.new_generator()
            if self.remote:
                gen.route = None
        served = ServedModel(self.settings, self.embed, gen, self.use_adapter, self._lock, namespace=namespace,
                             quick=self.quick, staleness=self.staleness, generation=self.generation)
        served.batching = self.batching
        return served

    @property
    def remote(self) -> bool:
        """Whether an engine out of process generates (generate_openai): adapters are published to it."""
        gen = self._generator if self._generator is not None else self._injected
        return bool(getattr(gen, "remote", False)) if gen is not None else \
            self.settings.generator_backend == "openai"

    def attach_current(self) -> None:
        """Serve the promoted adapter (if any) on top of the base model; it records the base it was made for."""
        from memory_llm.adapters import attach, prompt_embedder, read_keys
        from memory_llm.generate import sources_marker

        self._attached = True
        registry = self.registry
        current = registry.current()
        if current is None:
            return
        registry.check_base(current, self.settings.model)
        gen = self._generator
        if not self.remote and not hasattr(gen.model, "parameters"):  # llama.cpp: no torch model to attach it to
            from memory_llm.errors import ModelError

            raise ModelError(f"generator_backend {self.settings.generator_backend} cannot serve adapter "
                             f"{registry.label(current.name)}: use generator_backend transformers, or --no-adapter")
        if self.remote:
            self.router = self._publish(current)
        else:
            gen.model, self.router = attach(gen.model, current, embed=prompt_embedder(gen.tokenizer, self.embed))
        if self.router is not None and not getattr(self.router, "always", None):  # a prompt that carries sources
            # is routed on its question (the tokens after the sources); with adapter_with_sources off it gets the
            # base model reading them
            marker = sources_marker(gen.tokenizer)
            if self.settings.adapter_with_sources:
                self.router.after = marker
            else:
                self.router.veto = marker
        self.keys = [k for k in (read_keys(v.path) for v in current.stack) if k is not None]
        self.adapter_version = current.label
        self._stale_generation = None
        self.sync_staleness()

    def _publish(self, current):
        """Publish the current version's adapters to the engine (adapters.remote) and route requests among them.
        Adapters already there stay (another process on this home may be serving them); reload unloads."""
        from memory_llm.adapters import prompt_embedder
        from memory_llm.adapters.remote import publish

        gen = self._generator
        route = publish(gen, current, embed=prompt_embedder(gen.tokenizer, self.embed))
        gen.route = route.choose
        return route

    def reload(self) -> None:
        """Pick up a newly promoted (or rolled back) adapter in a running instance. On an engine the current
        version is published now (a failure is logged: the promotion or rollback has happened all the same),
        and, where this instance served another, the engine's other mem-* adapters are unloaded."""
        from memory_llm.errors import MemoryLLMError

        with self._lock:
            if self.router is not None:
                self.router.remove()
                self.router = None
            gen = self._generator
            if gen is not None and getattr(gen, "remote", False):
                gen.route = None
            elif gen is not None and hasattr(gen.model, "unload"):
                gen.model = gen.model.unload()
            self._attached, self.adapter_version, self.keys = False, None, []
            self._stale_generation = None
            if gen is not None and self._injected is None and not self.remote and not hasattr(gen.model, "parameters") \
                    and self.use_adapter and self.registry.current() is not None:
                if hasattr(gen.batcher, "close"):  # llama.cpp serves no adapter: transformers loads on the next answer
                    gen.batcher.close()
                self._generator = None
            if self.remote and self.use_adapter:
                try:
                    self.generator  # noqa: B018  (loads the engine client if need be, publishes the current version)
                    if gen is not None:
                        self._unpublish_others()
                except MemoryLLMError as exc:
                    logger.warning("the engine did not take the current adapter: %s", exc)

    def _unpublish_others(self) -> None:
        """Unload the engine's adapters of this registry (shared, or this tenant's) that the current version does not
        serve; other tenants' stay."""
        from memory_llm.adapters.remote import engine_name, unpublish

        current = self.registry.current()
        unpublish(self._generator, keep=[engine_name(v) for v in current.stack] if current else [],
                  tenant=self.registry.tenant)

    def base_context(self):
        """A context in which the generator runs as the base model (no adapter)."""
        gen = self.generator
        if getattr(gen, "remote", False):
            return _unrouted(gen)
        model = gen.model
        return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()

    def sync_staleness(self) -> None:
        """Tell the current adapters' routers which of their keys' memories are no longer true, when the store
        changed since they were last told (a supersession, a restore or a forget moves its generation)."""
        router = self.router
        if router is None or self.staleness is None or not hasattr(router, "update_stale"):
            return
        generation = self.generation() if self.generation is not None else None
        with self._lock:
            if generation is not None and generation == self._stale_generation:
                return
            router.update_stale(self.staleness, self.settings.stale_similarity)
            self._stale_generation = generation

    def stale_near(self, vector) -> bool:
        """Whether a question (its embedding) is about a memory an adapter holds that is no longer true: then it
        is not answered from the adapter alone (no retrieval skip)."""
        router = self.router
        return bool(router is not None and hasattr(router, "blocks") and router.blocks(vector))

    def trained_similarity(self, vector) -> float:
        """The cosine similarity of a question's embedding to the nearest prompt the current adapters trained on."""
        q = np.asarray(vector, dtype=np.float32)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        return max(float((np.asarray(k, dtype=np.float32) @ q).max()) for k in self.keys)

    def adapter_confidence(self, ids) -> float | None:
        """With the adapters attached, the probability (geometric mean) of the first tokens of the answer to this
        closed-book prompt, or None when no adapter's router lets it act on the prompt."""
        from memory_llm.generate import CONFIDENCE_TOKENS

        (_, logprob), = self.generator.generate_batch([ids[0].tolist()], CONFIDENCE_TOKENS, confidence=True)
        router = self.router
        acted = router is None or bool(router.last_on and router.last_on[0])
        return float(np.exp(logprob)) if acted else None

    def adapter_acts(self, ids) -> bool:
        """Whether the adapter's router lets it act on this prompt (no router: the adapter always acts)."""
        if self.router is None:
            return True
        import torch

        if self.remote:
            on = self.router.decide(ids)
        else:
            with torch.no_grad():
                on = self.router.decide(ids.to(self.generator.device))
        return bool(on and on[0])

    def acted(self) -> tuple[bool | None, str | None]:
        """Whether an adapter acted on the last single prompt generated, and which version (None: none)."""
        return self.routed_rows(1)[0]

    def routed_rows(self, n: int) -> list[tuple[bool | None, str | None]]:
        """For each of the last routed prefill's n rows: whether an adapter acted (None: no adapter, or not routed
        yet), and which version (as the answer log names it). The batcher reads it right after a batch's prefill."""
        if self.adapter_version is None:
            return [(None, None)] * n
        router = self.router
        if router is None:
            return [(True, self.adapter_version)] * n
        on = list(router.last_on) if len(router.last_on) == n else [None] * n
        names = list(getattr(router, "last_adapter", []))  # a stack's choice per row (a lone router: its own)
        used = names if len(names) == n else [self.adapter_version if o else None for o in on]
        # one adapter loads under peft's name "default" (also when served as a stack of one)
        return [(o, None if u is None else self.adapter_version if u in ("default", self.adapter_version)
                 else self.registry.label(u)) for o, u in zip(on, used)]

    def row_gates(self, n: int) -> list[tuple[float, ...]]:
        """The last prefill's n rows' adapter gates (adapters.routing.row_gates; none when an engine serves)."""
        from memory_llm.adapters.routing import row_gates

        return row_gates(None if self.remote else self.router, n)

    def set_row_gates(self, rows: list[tuple[float, ...]]) -> None:
        """Gate the adapters for a batch of rows with these gates (a continuous batch whose rows joined or left)."""
        from memory_llm.adapters.routing import set_row_gates

        set_row_gates(None if self.remote else self.router, rows, self._generator.device)

    @property
    def largest_batch(self) -> int | None:
        """The largest batch the generator's batcher has run (None: answers are not batched here)."""
        batcher = getattr(self._generator, "batcher", None)
        return max(batcher.batch_sizes, default=0) if batcher is not None else None

    def acted_rows(self, n: int) -> list[bool]:
        """Whether an adapter acted on each of the last batch's n rows."""
        router = self.router
        if router is not None and len(router.last_on) == n:
            return list(router.last_on)
        return [self.adapter_version is not None] * n


def _batcher(generator, max_batch: int):
    """The batcher for a generator's concurrent answers: llama.cpp sequences or transformers cache rows."""
    from memory_llm.generate_llamacpp import LlamaCppGenerator

    if isinstance(generator, LlamaCppGenerator):
        from memory_llm.batching_llamacpp import LlamaBatcher

        return LlamaBatcher(generator, max_batch)
    from memory_llm.batching import Batcher

    return Batcher(generator, max_batch)


@contextmanager
def _unrouted(generator):
    """Requests go to the engine's base model while inside (an engine generator's route switched off)."""
    route, generator.route = generator.route, None
    try:
        yield
    finally:
        generator.route = route
