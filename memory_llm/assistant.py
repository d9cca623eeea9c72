"""The facade: MemoryLLM wires the store, embedder, served model, learner, answerer and prompt library together
and delegates to them. Nothing else lives here."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from memory_llm.answering import Answer, Answerer, AnswerStream
from memory_llm.config import DEFAULT_NAMESPACE, Settings, check_namespace
from memory_llm.errors import InputError, MemoryLLMError
from memory_llm.generate import Sampling
from memory_llm.learning import Learner, LearnReport
from memory_llm.serving import ServedModel
from memory_llm.statements import as_time
from memory_llm.store import Hit, Store

if TYPE_CHECKING:
    from datetime import datetime

    from memory_llm.prompts import PromptLibrary

logger = logging.getLogger(__name__)


class MemoryLLM:
    """A language model with a memory that grows.

    Args:
        home: memory home directory (default: MLLM_HOME or the user data dir).
        settings: a Settings object; keyword overrides (model=..., embedder=..., top_k=...) apply on top.
        embedder / generator: injected models (tests, or sharing one loaded model between instances).
        quick_start: this instance answers a question or two and ends (the CLI's `ask` and `search`): where the
            settings allow (cold_backend), questions are embedded in numpy and answered by llama.cpp while no
            adapter is current, which start in about a second rather than six (no torch import).
    """

    def __init__(self, home: str | Path | None = None, settings: Settings | None = None, *, embedder=None,
                 generator=None, use_adapter: bool = True, quick_start: bool = False, **overrides):
        if settings is None:
            settings = Settings.load(home, **overrides)
        elif home is not None or overrides:
            settings = Settings(**{**settings.__dict__, **overrides, **({"home": home} if home else {})})
        self.settings = settings
        self._embedder = embedder
        self._embedder_bound = False
        self._store: Store | None = None
        self._prompts: PromptLibrary | None = None
        self._learner: Learner | None = None
        self._retriever = None
        self._answerer: Answerer | None = None
        self._lock = threading.RLock()
        self.quick_start = quick_start and settings.cold_backend == "llama.cpp"
        self.served = ServedModel(settings, self.embed_texts, generator, use_adapter, self._lock,
                                  quick=self.quick_start, staleness=self._stale_owners,
                                  generation=lambda: self.store.generation())
        self._tenants: dict[str, ServedModel] = {}  # tenant namespace → the model serving its own adapters

    # ---- components (lazy) ---------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                s = self.settings
                self._store = Store(s.home, lock_timeout=s.lock_timeout, exact_index_max=s.exact_index_max,
                                    ivf_nprobe=s.ivf_nprobe, index_backend=s.vector_backend,
                                    index_uri=s.milvus_uri, index_token=s.milvus_token)
            return self._store

    @property
    def embedder(self):
        with self._lock:
            if self._embedder is None:
                from memory_llm.embed import load

                self._embedder = load(self.settings.embedder, self.settings.device, quick=self.quick_start,
                                      precision=self.settings.embed_precision)
            return self._embedder

    @property
    def generator(self):
        """The generator that answers, with the promoted adapter attached (ServedModel)."""
        return self.served.generator

    @property
    def adapter_version(self) -> str | None:
        """The adapter version served (None: the base model alone)."""
        return self.served.adapter_version

    @property
    def use_adapter(self) -> bool:
        return self.served.use_adapter

    @property
    def learner(self) -> Learner:
        with self._lock:
            if self._learner is None:
                self._learner = Learner(self.store, self.embedder, self.settings, self._bind_embedder)
            return self._learner

    @property
    def retriever(self):
        """Retrieval and its filters (memory_llm.retrieve.Retriever)."""
        with self._lock:
            if self._retriever is None:
                from memory_llm.retrieve import Retriever

                self._retriever = Retriever(self.store, self.embedder, self.settings)
            return self._retriever

    @property
    def answerer(self) -> Answerer:
        """Answers as `ask` and `chat` do (prompt assembly, retrieval skip, streaming, the answer log)."""
        with self._lock:
            if self._answerer is None:
                self._answerer = Answerer(self.settings, self.store, self.served, self.prompts, self.retrieve,
                                          self.embed_texts, served_for=self.served_for,
                                          conflicts=self.retriever.conflicts)
            return self._answerer

    @property
    def prompts(self) -> "PromptLibrary":
        """The prompt library: templates and exemplars (seeded with the shipped templates on first use)."""
        with self._lock:
            if self._prompts is None:
                from memory_llm.prompts import PromptLibrary

                self._prompts = PromptLibrary(self.store, self.embed_texts, self.settings)
            return self._prompts

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Texts embedded by the home's embedder (questions, template descriptions, exemplar questions)."""
        self._bind_embedder()
        return self.embedder.encode(texts)

    def new_generator(self):
        """A separate base model (no adapter) for consolidation, leaving the serving one untouched."""
        return self.served.new_generator()

    def served_for(self, namespace: str) -> ServedModel:
        """The model that answers a namespace: a tenant's (consolidated with `consolidate(namespace=...)`) serves
        its own adapters and nothing of the shared ones; every other namespace gets the shared model. A tenant's is
        made on first use: in-process a model of its own, on an engine a client routing to its own adapters."""
        from memory_llm.adapters import AdapterRegistry

        served = self._tenants.get(namespace)
        if served is None and AdapterRegistry(self.settings.home, namespace).is_tenant:
            with self._lock:
                served = self._tenants.setdefault(namespace, self.served.sibling(namespace))
        return served or self.served

    def enable_batching(self, max_batch: int = 8) -> None:
        """Answers streamed at the same time (threads, the server) share forward passes, up to max_batch at once
        (memory_llm.batching; in-process generation only: an engine batches by itself)."""
        for served in [self.served, *self._tenants.values()]:
            served.batching = max_batch

    def reload_adapter(self, namespace: str | None = None) -> None:
        """Pick up a newly promoted (or rolled back) adapter in a running instance (a tenant's: that namespace's;
        None: the shared one and every tenant's)."""
        if namespace is not None:
            self.served_for(namespace).reload()
            return
        for served in [self.served, *self._tenants.values()]:
            served.reload()

    def _stale_owners(self, owners: set[int]) -> set[int]:
        """Of these adapter key owners (memory ids; an exemplar's negative id), those no longer true: superseded
        (in part or whole), forgotten, or retired."""
        memories = {i for i in owners if i > 0}
        exemplars = {-i for i in owners if i < 0}
        return self.store.stale_ids(memories) | {-e for e in self.store.prompts.retired(sorted(exemplars))}

    def _bind_embedder(self) -> None:
        """Check (once per instance: it is a write transaction) that the home belongs to this embedder."""
        if not self._embedder_bound:
            self.store.check_embedder(self.embedder.name, self.embedder.dim)
            self._embedder_bound = True

    # ---- learn ----------------------------------------------------------------------------------------------
    def learn(self, paths: Iterable[str | Path] = (), *, text: str | None = None, namespace: str = DEFAULT_NAMESPACE,
              include: Sequence[str] = (), exclude: Sequence[str] = (), text_field: str | None = None,
              encoding: str = "utf-8", source: str | None = None, key: str | None = None,
              supersedes: Sequence[int] = (), date: "str | float | datetime | None" = None,
              detect: bool | None = None, progress: Callable[[str, int, int], None] | None = None) -> LearnReport:
        """Learn files, directories (recursively) and/or a text into `namespace`; returns a LearnReport (what was
        added, kept, skipped and superseded). A bad named file stops the run with nothing written; each source is
        one transaction (Learner.learn has the arguments in full).

        Args:
            key: a name for the text: a later text under the same key supersedes it.
            supersedes: memory ids the new memories supersede (one text or file).
            date: when what is learned became true (ISO 8601 text, a datetime or a Unix time; default now).
            detect: look for memories the new ones restate with other values (default: detect_supersession).
        """
        return self.learner.learn(paths, text=text, namespace=namespace, include=include, exclude=exclude,
                                  text_field=text_field, encoding=encoding, source=source, key=key,
                                  supersedes=supersedes, valid_from=as_time(date), detect=detect, progress=progress)

    def update(self, memory_id: int, text: str, *, date: "str | float | datetime | None" = None,
               namespace: str | None = None) -> LearnReport:
        """Replace a memory with a new text: the text is learned (in the memory's namespace; a memory learned
        under a key keeps its key) and supersedes it, for reason "update". With a namespace, only a memory of
        that namespace is found."""
        m = self.memory(memory_id, namespace)
        if not isinstance(text, str) or not text.strip():
            raise InputError("the new text is empty")
        source = m.source if m.source.startswith("key:") else None
        return self.learner.learn(text=text, namespace=m.namespace, source=source, supersedes=[memory_id],
                                  reason="update", valid_from=as_time(date))

    def memory(self, memory_id: int, namespace: str | None = None):
        """One memory by id, superseded or not (a Memory); with a namespace, only one of that namespace."""
        try:
            memory_id = int(memory_id)
        except (TypeError, ValueError):
            raise InputError(f"not a memory id: {memory_id!r}") from None
        m = self.store.get([memory_id]).get(memory_id) if 0 < memory_id < 2 ** 63 else None
        if m is None or namespace is not None and m.namespace != namespace:
            raise InputError(f"no memory has id {memory_id}" + (f" in namespace {namespace!r}" if namespace else ""))
        return m

    def memory_history(self, memory_id: int, namespace: str | None = None) -> dict:
        """A memory's chain: the memories it superseded and that superseded it, and each supersession (when,
        why, reverted or not). {"memory", "memories", "forgotten", "events"}."""
        self.memory(memory_id, namespace)
        return self.learner.updater.history(int(memory_id))

    def restore(self, memory_id: int, namespace: str | None = None) -> dict:
        """Make a superseded memory live and whole again (its supersessions reverted, kept in its history; the
        exemplars they retired return). {"memory", "reverted"}."""
        self.memory(memory_id, namespace)
        reverted = self.store.restore(int(memory_id))
        self.store.flush()
        return {"memory": self.memory(memory_id).as_dict(), "reverted": [r.as_dict() for r in reverted]}

    # ---- search / ask -------------------------------------------------------------------------------
    def search(self, query: str, k: int | None = None, namespace: str = DEFAULT_NAMESPACE,
               history: bool = False) -> list[Hit]:
        """The k best memories for a query (dense + lexical, fused); live ones only unless `history`."""
        if not query or not query.strip():
            raise InputError("the query is empty")
        return self.retrieve([query], k, namespace, history=history)

    def retrieve(self, queries: list[str], k: int | None, namespace: str, vectors=None,
                 floor: float = 0.0, history: bool = False) -> list[Hit]:
        """The k best memories for several queries at once (a conversation's turns), fused; `vectors` is a callable
        giving the queries' embeddings, called only when there is something to search; `floor`: leave out those
        less similar to every query; `history`: superseded memories too (Retriever.search)."""
        k = self.settings.top_k if k is None else k
        if k <= 0:
            raise InputError(f"k must be > 0, not {k}")
        if not self.store.meta("dim"):
            return []
        self._bind_embedder()
        return self.retriever.search(queries, k, namespace, vectors() if vectors else None, floor, history)

    def ask(self, question: str, *, k: int | None = None, namespace: str = DEFAULT_NAMESPACE,
            use_memory: bool = True, max_new_tokens: int | None = None, prompt: str | None = None,
            exemplars: bool = True, log: bool = True, sampling: Sampling | None = None,
            stop: Sequence[str] = ()) -> Answer:
        """Answer a question from memory (retrieval + prompt library + generation), with numbered sources,
        the template and exemplars used, timings and (when logged) an answer id for feedback."""
        return self.ask_stream(question, k=k, namespace=namespace, use_memory=use_memory,
                               max_new_tokens=max_new_tokens, prompt=prompt, exemplars=exemplars, log=log,
                               sampling=sampling, stop=stop).result()

    def ask_stream(self, question: str, *, k: int | None = None, namespace: str = DEFAULT_NAMESPACE,
                   use_memory: bool = True, max_new_tokens: int | None = None, prompt: str | None = None,
                   exemplars: bool = True, log: bool = True, sampling: Sampling | None = None,
                   stop: Sequence[str] = ()) -> AnswerStream:
        """Like ask, but iterate the result to receive text pieces as they are generated.

        Args:
            prompt: a template name; None chooses by similarity of the question to the descriptions.
            exemplars: add the most similar good exemplars of the namespace as few-shot turns.
            log: keep the answer in the answer log (its id is what `feedback` takes).
            sampling: temperature, top_p, seed (memory_llm.generate.Sampling); default greedy.
            stop: the answer ends before the first of these strings.
        """
        prepared = self.answerer.prepare(question, k=k, namespace=namespace, use_memory=use_memory, prompt=prompt,
                                         exemplars=exemplars)
        return self.answerer.stream(question, prepared, namespace, use_memory, max_new_tokens, log,
                                    sampling=sampling, stop=stop)

    # ---- chat ---------------------------------------------------------------------------------------
    def chat(self, messages: Sequence[dict], *, session_id: str | None = None, namespace: str = DEFAULT_NAMESPACE,
             remember: bool = False, k: int | None = None, use_memory: bool = True, prompt: str | None = None,
             exemplars: bool = True, max_new_tokens: int | None = None, sampling: Sampling | None = None,
             stop: Sequence[str] = ()) -> AnswerStream:
        """Answer the last user message of a conversation (OpenAI-style messages), streamed.

        Retrieval uses the conversation, not only the last turn; a system message replaces the template's
        system prompt; earlier turns are kept in the prompt. Iterate the result for text pieces, or call
        `.result()`; the answer is logged (with the session id) for feedback.

        Args:
            messages: [{"role": "system" | "user" | "assistant", "content": str}, ...], the last from the user.
            session_id: names the conversation in the answer log (`history(session_id)` returns it).
            namespace: whose memories, exemplars and answer log.
            remember: store what the user states in the last message as a memory of the namespace (before
                answering, so the answer can use it).
            sampling, stop: as ask_stream.
        """
        from memory_llm.chat import answer_conversation

        return answer_conversation(self.answerer, self.learn, messages, session_id=session_id, namespace=namespace,
                                   remember=remember, k=k, use_memory=use_memory, prompt=prompt,
                                   exemplars=exemplars, max_new_tokens=max_new_tokens, sampling=sampling, stop=stop)

    def history(self, session_id: str, namespace: str = DEFAULT_NAMESPACE, limit: int = 50) -> list[dict]:
        """A chat session's turns from the answer log, as messages (to resume it)."""
        out: list[dict] = []
        for a in self.store.answers(namespace, session_id, limit):
            out += [{"role": "user", "content": a.question}, {"role": "assistant", "content": a.answer}]
        return out

    # ---- feedback -----------------------------------------------------------------------------------
    def feedback(self, answer_id: int, *, good: bool = False, bad: bool = False, correction: str | None = None,
                 namespace: str | None = None) -> dict:
        """Feedback on a logged answer: good, bad or a correction (memory_llm.feedback). Returns {"answer_id",
        "feedback", "exemplar_ids" (added or rated up), "memory_ids" (learned)}."""
        from memory_llm.feedback import record_feedback

        return record_feedback(self.store, self.learner, answer_id, good=good, bad=bad, correction=correction,
                               namespace=namespace)

    # ---- forget / stats -----------------------------------------------------------------------------
    def forget(self, ids: Sequence[int] = (), *, source: str | None = None, namespace: str | None = None,
               everything: bool = False, superseded: bool = False) -> int:
        """Delete memories by id, by source, or all (within a namespace if given), superseded ones included; with
        `superseded`, only the superseded ones. Returns how many. No adapter acts on a forgotten memory's
        questions from then on."""
        if everything and (ids or source):
            raise InputError("'all' cannot be combined with ids or a source")
        if not (ids or source or everything or superseded):
            raise InputError("say what to forget: memory ids, a source, the superseded ones, or all")
        n = self.store.forget(ids=ids, source=source, namespace=namespace, everything=everything,
                              superseded=superseded)
        self.store.flush()
        return n

    def stats(self) -> dict:
        s = self.settings
        return {**self.store.stats(), "home": str(s.home), "model": s.model, "embedder_setting": s.embedder,
                "cache_dir": str(s.cache_dir)}

    def doctor(self, repair: bool = False) -> dict:
        """Check the home's health; with repair=True, rebuild what can be rebuilt from SQLite, roll a broken
        current adapter back to the newest intact one, and re-check."""
        from memory_llm.doctor import diagnose

        return diagnose(lambda: self.store, self.adapters, self.settings.model, repair)

    def sources(self, namespace: str | None = None) -> list[dict]:
        return self.store.list_sources(namespace)

    # ---- eval ---------------------------------------------------------------------------------------
    def evaluate(self, path: str | Path, mode: str = "rag", *, k: int | None = None,
                 namespace: str = DEFAULT_NAMESPACE, limit: int | None = None, progress=None,
                 prompt: str | None = None, exemplars: bool = True, qa_new_tokens: int = 64) -> dict:
        """Run an eval file (docs/eval-format.md) in a mode (base, rag, closed, hybrid, served); returns accuracy
        overall and by tag. See memory_llm.evaluate.evaluate_file."""
        from memory_llm.evaluate import evaluate_file

        return evaluate_file(path, mode, answerer=self.answerer, search=self.search, k=k, namespace=namespace,
                             limit=limit, progress=progress, prompt=prompt, exemplars=exemplars,
                             qa_new_tokens=qa_new_tokens)

    # ---- consolidation -------------------------------------------------------------------------------
    def consolidate(self, *, max_minutes: float | None = None, dry_run: bool = False, full: bool = False,
                    namespace: str | None = None, recipe=None, floors=None, progress=None, processes: int = 1,
                    launcher: str | None = None):
        """Distil memories into a LoRA adapter (see memory_llm.consolidate.run). Returns a Summary.

        With `namespace`, that namespace's memories go into an adapter of its own that only its requests get (a
        tenant); without, every other namespace's go into the shared adapter."""
        from memory_llm.consolidate.run import consolidate

        summary = consolidate(self.store, self.settings, new_generator=self.new_generator, embed=self.embed_texts,
                              max_minutes=max_minutes, dry_run=dry_run, full=full, namespace=namespace,
                              recipe=recipe, floors=floors, progress=progress, processes=processes,
                              launcher=launcher)
        summary.namespace = namespace
        if summary.status == "promoted":
            self.reload_adapter(namespace)
        return summary

    @property
    def adapters(self):
        """The shared adapter registry: versions, current, rollback (a tenant's: `adapter_registry(namespace)`)."""
        return self.adapter_registry()

    def adapter_registry(self, namespace: str | None = None):
        """The adapter registry of a tenant namespace (None: the shared one)."""
        from memory_llm.adapters import AdapterRegistry

        if namespace is not None:
            check_namespace(namespace)
        return AdapterRegistry(self.settings.home, namespace)

    def close(self) -> None:
        self._prompts = self._learner = self._answerer = self._retriever = None
        if self._store is not None:
            self._store.close()
            self._store = None


__all__ = ["Answer", "AnswerStream", "LearnReport", "MemoryLLM", "MemoryLLMError"]
