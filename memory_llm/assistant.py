"""The facade: MemoryLLM composes the store, loaders, embedder, retrieval and generator. Nothing else."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np

from memory_llm.config import Settings
from memory_llm.errors import InputError, MemoryLLMError, StoreError
from memory_llm.ingest import Document, chunk_text, content_hash, iter_paths, load_file, load_text
from memory_llm.store import Hit, Store
from memory_llm.store.sqlite import NewChunk

if TYPE_CHECKING:
    from memory_llm.prompts import PromptChoice, PromptLibrary

logger = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "default"
HYBRID_MARGIN = 0.5  # eval --mode hybrid keeps the closed answer when its confidence (mean log-probability of
# its first tokens) beats the rag answer's by more than this (nats); BENCHMARKS.md, "Hybrid by confidence"
EMBED_BUFFER = 256  # chunks embedded together across small files


@dataclass
class LearnReport:
    files: int = 0
    unchanged: int = 0
    chunks_added: int = 0
    duplicates_skipped: int = 0
    near_duplicates_skipped: int = 0
    replaced_sources: int = 0
    skipped_files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    memory_ids: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("memory_ids")
        d["seconds"] = round(self.seconds, 3)
        return d


@dataclass
class Answer:
    """An answer with the memories it was given and where the time went (seconds)."""

    text: str
    question: str
    sources: list[Hit]
    timings: dict
    model: str
    namespace: str
    used_memory: bool
    adapter: str | None = None
    adapter_active: bool | None = None  # whether the adapter's router let it act on this question
    adapter_used: str | None = None  # the adapter version that acted (of a stack, the one chosen; None: none)
    id: int | None = None  # in the answer log: `mllm feedback ID`
    prompt: "PromptChoice | None" = None
    session_id: str | None = None
    remembered: list[int] = field(default_factory=list)  # memories stored from the user's statements (chat)
    path: str = "model"  # what answered: retrieval | adapter | retrieval+adapter | model (neither)
    why: str = ""  # why that path, in a line

    @property
    def template(self) -> str | None:
        return self.prompt.name if self.prompt is not None else None

    def as_dict(self) -> dict:
        return {"id": self.id, "answer": self.text, "question": self.question, "namespace": self.namespace,
                "session_id": self.session_id, "model": self.model, "adapter": self.adapter,
                "adapter_active": self.adapter_active, "adapter_used": self.adapter_used,
                "used_memory": self.used_memory, "path": self.path, "why": self.why,
                **(self.prompt.as_dict() if self.prompt else {}),
                "retrieved_ids": [h.memory.id for h in self.sources], "remembered_ids": self.remembered,
                "sources": [{"n": i, **h.as_dict()} for i, h in enumerate(self.sources, 1)],
                "timings": {k: round(v, 4) for k, v in self.timings.items()}}


class AnswerStream:
    """Iterate to receive text pieces as they are generated; `.answer` is complete afterwards."""

    def __init__(self, pieces: Iterator[str], finish: Callable[[str, float | None], Answer],
                 stop: threading.Event | None = None):
        self._pieces, self._finish, self._stop = pieces, finish, stop or threading.Event()
        self.answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        parts, first = [], None
        for piece in self._pieces:
            if first is None:
                first = time.perf_counter()
            parts.append(piece)
            yield piece
        if not self._stop.is_set():
            self.answer = self._finish("".join(parts), first)

    def cancel(self) -> None:
        """Stop generating at the next token (the iteration then ends; a cancelled answer is not logged)."""
        self._stop.set()

    def result(self) -> Answer:
        """Wait for the whole answer (without reading the pieces)."""
        if self.answer is None:
            for _ in self:
                pass
        return self.answer


class MemoryLLM:
    """A language model with a memory that grows.

    Args:
        home: memory home directory (default: MLLM_HOME or the user data dir).
        settings: a Settings object; keyword overrides (model=..., embedder=..., top_k=...) apply on top.
        embedder / generator: injected models (tests, or sharing one loaded model between instances).
    """

    def __init__(self, home: str | Path | None = None, settings: Settings | None = None, *, embedder=None,
                 generator=None, use_adapter: bool = True, **overrides):
        if settings is None:
            settings = Settings.load(home, **overrides)
        elif home is not None or overrides:
            settings = Settings(**{**settings.__dict__, **overrides, **({"home": home} if home else {})})
        self.settings = settings
        self._embedder, self._generator = embedder, generator
        self._injected_generator = generator
        self.use_adapter = use_adapter
        self.adapter_version: str | None = None
        self._adapter_attached = False
        self._router = None  # the current adapter's activation router (adapters.routing), if it has one
        self._keys: list = []  # the current adapters' keys (unit embeddings of their trained prompts)
        self._embedder_bound = False
        self._store: Store | None = None
        self._prompts: PromptLibrary | None = None
        self._lock = threading.RLock()

    # ---- components (lazy) ---------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                s = self.settings
                self._store = Store(s.home, lock_timeout=s.lock_timeout, exact_index_max=s.exact_index_max,
                                    ivf_nprobe=s.ivf_nprobe)
            return self._store

    @property
    def embedder(self):
        with self._lock:
            if self._embedder is None:
                from memory_llm.embed import SentenceEmbedder

                self._embedder = SentenceEmbedder(self.settings.embedder, self.settings.device)
            return self._embedder

    @property
    def generator(self):
        with self._lock:
            if self._generator is None:
                from memory_llm.generate import Generator

                s = self.settings
                self._generator = Generator.load(s.model, s.cache_dir, s.device, s.dtype)
            if self.use_adapter and not self._adapter_attached:
                self._attach_current_adapter()
            return self._generator

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
        import copy

        from memory_llm.generate import Generator

        if self._injected_generator is not None:
            g = self._injected_generator
            model = copy.deepcopy(g.model)
            model = model.unload() if hasattr(model, "unload") else model
            return Generator(model, g.tokenizer, g.name)
        s = self.settings
        return Generator.load(s.model, s.cache_dir, s.device, s.dtype)

    def _attach_current_adapter(self) -> None:
        """Serve the promoted adapter (if any) on top of the base model; it records the base it was made for."""
        from memory_llm.adapters import AdapterRegistry, attach, prompt_embedder, read_keys
        from memory_llm.generate import sources_marker

        self._adapter_attached = True
        registry = AdapterRegistry(self.settings.home)
        current = registry.current()
        if current is None:
            return
        registry.check_base(current, self.settings.model)
        self._generator.model, self._router = attach(
            self._generator.model, current, embed=prompt_embedder(self._generator.tokenizer, self.embed_texts))
        if self._router is not None:  # a prompt that carries sources is routed on its question (the tokens after
            # the sources); with adapter_with_sources off it gets the base model reading them
            marker = sources_marker(self._generator.tokenizer)
            if self.settings.adapter_with_sources:
                self._router.after = marker
            else:
                self._router.veto = marker
        self._keys = [k for k in (read_keys(v.path) for v in current.stack) if k is not None]
        self.adapter_version = current.name

    def reload_adapter(self) -> None:
        """Pick up a newly promoted (or rolled back) adapter in a running instance."""
        with self._lock:
            if self._router is not None:
                self._router.remove()
                self._router = None
            if self._generator is not None and hasattr(self._generator.model, "unload"):
                self._generator.model = self._generator.model.unload()
            self._adapter_attached, self.adapter_version, self._keys = False, None, []

    def _base_context(self):
        """Run the generator as the base model (no adapter) inside this context."""
        from contextlib import nullcontext

        model = self.generator.model
        return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()

    def _bind_embedder(self) -> None:
        """Check (once per instance: it is a write transaction) that the home belongs to this embedder."""
        if not self._embedder_bound:
            self.store.check_embedder(self.embedder.name, self.embedder.dim)
            self._embedder_bound = True

    # ---- learn --------------------------------------------------------------------------------------
    def learn(self, paths: Iterable[str | Path] = (), *, text: str | None = None, namespace: str = DEFAULT_NAMESPACE,
              include: Sequence[str] = (), exclude: Sequence[str] = (), text_field: str | None = None,
              encoding: str = "utf-8", source: str | None = None,
              progress: Callable[[str, int, int], None] | None = None) -> LearnReport:
        """Learn files, directories (recursively) and/or a text.

        Named files are read before anything is stored, so a bad one stops the run with nothing written;
        unreadable files met inside a directory are skipped and reported. Each source is committed in one
        transaction; an unchanged source adds nothing; a changed one replaces its old chunks.

        Args:
            paths: files and directories.
            text: a text to learn (its source is `source` or a hash of the text).
            namespace: the namespace the memories belong to.
            include / exclude: glob patterns for directory members.
            text_field: the field holding the text in JSON/JSONL records.
            progress: called as progress(phase, done, total).
        Returns:
            A LearnReport (files, chunks added, skipped, seconds).
        """
        start = time.perf_counter()
        _check_namespace(namespace)
        s = self.settings
        report = LearnReport()
        named: list[Document] = []
        members: list[Path] = []
        if text is not None:
            named.append(load_text(text, source))
        for path, is_named in iter_paths([Path(p) for p in paths], include, exclude):
            if is_named:
                named.append(load_file(path, text_field=text_field, max_mb=s.max_file_mb, encoding=encoding))
            else:
                members.append(path)
        if not named and not members:
            raise InputError("nothing to learn: no learnable files found" if paths else "nothing to learn")
        total = len(named) + len(members)

        def documents() -> Iterator[Document]:
            yield from named
            for path in members:
                try:
                    yield load_file(path, text_field=text_field, max_mb=s.max_file_mb, encoding=encoding)
                except InputError as exc:
                    logger.warning("skipped %s", exc)
                    report.skipped_files.append(str(exc))

        buffer: list[tuple[Document, list]] = []
        done = 0
        for doc in documents():
            report.files += 1
            if self.store.source_hash(namespace, doc.uri) == doc.content_hash:
                report.unchanged += 1
                done += 1
                if progress is not None:
                    progress("learn", done, total)
            else:
                chunks = chunk_text(doc.sections, self.embedder.count_tokens, self._chunk_tokens(), s.chunk_overlap)
                buffer.append((doc, chunks))
            if sum(len(c) for _, c in buffer) >= EMBED_BUFFER:
                done = self._flush_learn(buffer, namespace, report, progress, done, total)
                buffer = []
        done = self._flush_learn(buffer, namespace, report, progress, done, total)
        if progress is not None:
            progress("learn", total, total)
        self.store.flush()
        report.seconds = time.perf_counter() - start
        return report

    def _chunk_tokens(self) -> int:
        """chunk_tokens, capped at the embedder's window (beyond it a chunk's tail would not be embedded)."""
        window = getattr(self.embedder, "max_tokens", None)
        if window and self.settings.chunk_tokens > window - 2:
            logger.warning("chunk_tokens=%d exceeds the embedder's window; using %d", self.settings.chunk_tokens,
                           window - 2)
            return window - 2
        return self.settings.chunk_tokens

    def _flush_learn(self, buffer, namespace: str, report: LearnReport, progress, done: int, total: int) -> int:
        """Embed the buffered documents' chunks in one batch, then commit each document on its own."""
        s = self.settings
        if not buffer:
            return done
        self._bind_embedder()
        self.store.index()  # load (or rebuild) before writing, so writes update it in place
        texts = [c.text for _, chunks in buffer for c in chunks]
        vectors = self.embedder.encode(texts, batch_size=s.embed_batch_size)
        offset = 0
        for doc, chunks in buffer:
            vecs = vectors[offset:offset + len(chunks)]
            offset += len(chunks)
            new = self._novel_chunks(doc, chunks, vecs, namespace, report)
            ids = self.store.replace_source(namespace, doc.uri, doc.content_hash, new)
            report.chunks_added += len(ids)
            report.memory_ids += ids
            done += 1
            if progress is not None:
                progress("learn", done, total)
        return done

    def _novel_chunks(self, doc: Document, chunks, vectors: np.ndarray, namespace: str,
                      report: LearnReport) -> list[NewChunk]:
        """Drop chunks that repeat stored memories (same hash) or nearly repeat them (cosine ≥ threshold)."""
        hashes = [content_hash(c.text) for c in chunks]
        stored = self.store.existing_hashes(namespace, hashes, exclude_uri=doc.uri)
        old_ids = set(self.store.source_memory_ids(namespace, doc.uri))
        threshold = self.settings.dedup_threshold
        nearest = self.store.nearest_scores(np.asarray(vectors), 2, namespace, old_ids)
        kept: list[NewChunk] = []
        seen: set[str] = set()
        for chunk, h, vec, near in zip(chunks, hashes, vectors, nearest):
            if h in stored or h in seen:
                report.duplicates_skipped += 1
                continue
            if near >= threshold or any(float(vec @ k.vector) >= threshold for k in kept):
                report.near_duplicates_skipped += 1
                continue
            seen.add(h)
            kept.append(NewChunk(len(kept), chunk.text, h, vec))
        if old_ids:
            report.replaced_sources += 1
        return kept

    # ---- search / ask -------------------------------------------------------------------------------
    def search(self, query: str, k: int | None = None, namespace: str = DEFAULT_NAMESPACE) -> list[Hit]:
        """The k best memories for a query (dense + lexical, fused)."""
        if not query or not query.strip():
            raise InputError("the query is empty")
        return self._retrieve([query], k, namespace)

    def _retrieve(self, queries: list[str], k: int | None, namespace: str, vectors=None) -> list[Hit]:
        """vectors: a callable giving the queries' embeddings (called only when there is something to search)."""
        from memory_llm.retrieve import retrieve

        k = self.settings.top_k if k is None else k
        if k <= 0:
            raise InputError(f"k must be > 0, not {k}")
        if not self.store.meta("dim"):
            return []
        self._bind_embedder()
        return retrieve(self.store, self.embedder, queries, k, namespace, self.settings.rrf_k,
                        vectors() if vectors else None)

    def _prepare(self, question: str, *, k: int | None, namespace: str, use_memory: bool, prompt: str | None = None,
                 exemplars: bool = True, queries: list[str] | None = None, history: Sequence[dict] = (),
                 system: str | None = None):
        """Retrieve, choose the template and exemplars, build the prompt's token ids. The question (and the
        conversation's queries) are embedded once, only if something needs them."""
        from memory_llm.generate import build_messages
        from memory_llm.retrieve import pack

        if not question or not question.strip():
            raise InputError("the question is empty")
        _check_namespace(namespace)
        queries = queries or [question]
        vectors: list = []

        def question_vectors() -> np.ndarray:
            if not vectors:
                vectors.append(self.embed_texts(queries))
            return vectors[0]

        t0 = time.perf_counter()
        gen = self.generator
        choice = self.prompts.choose(lambda: question_vectors()[0], namespace, prompt, exemplars, gen.count_tokens)
        t1 = time.perf_counter()

        def prompt_ids(hits: list[Hit]):
            return gen.chat_ids(build_messages(question, [h.memory.text for h in hits], system,
                                               template=choice.template, shots=choice.shots(), history=history))

        skipped, ids = None, None  # skipped: why retrieval was skipped (the adapter answers), in words
        at_similarity, at_confidence = self.settings.skip_retrieval_similarity, self.settings.skip_retrieval_confidence
        if use_memory and not history and self._keys and (at_similarity > 0 or at_confidence > 0):
            similarity = self._trained_similarity(question_vectors()[0])
            if at_similarity <= 0 or similarity >= at_similarity:
                closed = prompt_ids([])
                if at_confidence <= 0:
                    if self._adapter_acts(closed):
                        skipped = (f"the question is {similarity:.2f} similar to one adapter {{adapter}} was trained"
                                   f" on (skip_retrieval_similarity {at_similarity:g}) and its router let it act")
                else:
                    confidence = self._adapter_confidence(closed)
                    if confidence is not None and confidence >= at_confidence:
                        skipped = (f"adapter {{adapter}} acted on the question and its answer starts with probability"
                                   f" {confidence:.2f} (skip_retrieval_confidence {at_confidence:g})")
                if skipped is not None:
                    ids, hits = closed, []
        t2 = time.perf_counter()
        if ids is None:
            hits = self._retrieve(queries, k, namespace, question_vectors) if use_memory else []
            t2 = time.perf_counter()
            hits = pack(hits, gen.count_tokens, self.settings.context_tokens)
            ids = prompt_ids(hits)
        window = getattr(getattr(gen.model, "config", None), "max_position_embeddings", None)
        if isinstance(window, int) and ids.shape[1] >= window:  # beyond it a model answers garbage, slowly
            raise InputError(f"the question is too long: the prompt is {ids.shape[1]} tokens and the model reads"
                             f" at most {window}")
        t3 = time.perf_counter()
        return hits, ids, choice, {"prompt_library": t1 - t0, "retrieve": t2 - t1, "prompt": t3 - t2,
                                   "prompt_tokens": float(ids.shape[1])}, t0, skipped

    def _path(self, answer: Answer, skipped: str | None) -> tuple[str, str]:
        """Which path answered (retrieval, adapter, both, or the model alone) and why, in a line."""
        acted = bool(answer.adapter_active)
        sources = f"{len(answer.sources)} retrieved source{'s' * (len(answer.sources) != 1)}"
        if skipped is not None:
            return "adapter", "retrieval skipped: " + skipped.format(adapter=answer.adapter_used or answer.adapter)
        if answer.adapter is None:
            adapter = "no consolidated adapter" if self.use_adapter else "the adapter is switched off"
        elif acted:
            adapter = f"adapter {answer.adapter_used or answer.adapter} acted (its router passed the question)"
        elif answer.sources and not self.settings.adapter_with_sources:
            adapter = "the adapter stays off on prompts with sources (adapter_with_sources = false)"
        else:
            adapter = f"adapter {answer.adapter} stayed off (its router scored the question as not its memory)"
        if not answer.used_memory:
            return ("adapter" if acted else "model"), f"memory off (--no-memory); {adapter}"
        if not answer.sources:
            return ("adapter" if acted else "model"), f"nothing retrieved; {adapter}"
        return ("retrieval+adapter" if acted else "retrieval"), f"{sources}; {adapter}"

    def _trained_similarity(self, vector) -> float:
        """The cosine similarity of a question's embedding to the nearest prompt the current adapters trained on."""
        q = np.asarray(vector, dtype=np.float32)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        return max(float((np.asarray(k, dtype=np.float32) @ q).max()) for k in self._keys)

    def _adapter_confidence(self, ids) -> float | None:
        """With the adapters attached, the probability (geometric mean) of the first tokens of the answer to this
        closed-book prompt, or None when no adapter's router lets it act on the prompt."""
        from memory_llm.generate import CONFIDENCE_TOKENS

        (_, logprob), = self.generator.generate_batch([ids[0].tolist()], CONFIDENCE_TOKENS, confidence=True)
        router = self._router
        acted = router is None or bool(router.last_on and router.last_on[0])
        return float(np.exp(logprob)) if acted else None

    def _adapter_acts(self, ids) -> bool:
        """Whether the adapter's router lets it act on this prompt (no router: the adapter always acts)."""
        if self._router is None:
            return True
        import torch

        with torch.no_grad():
            on = self._router.decide(ids.to(self.generator.device))
        return bool(on and on[0])

    def ask(self, question: str, *, k: int | None = None, namespace: str = DEFAULT_NAMESPACE,
            use_memory: bool = True, max_new_tokens: int | None = None, prompt: str | None = None,
            exemplars: bool = True, log: bool = True) -> Answer:
        """Answer a question from memory (retrieval + prompt library + generation), with numbered sources,
        the template and exemplars used, timings and (when logged) an answer id for feedback."""
        return self.ask_stream(question, k=k, namespace=namespace, use_memory=use_memory,
                               max_new_tokens=max_new_tokens, prompt=prompt, exemplars=exemplars, log=log).result()

    def ask_stream(self, question: str, *, k: int | None = None, namespace: str = DEFAULT_NAMESPACE,
                   use_memory: bool = True, max_new_tokens: int | None = None, prompt: str | None = None,
                   exemplars: bool = True, log: bool = True) -> AnswerStream:
        """Like ask, but iterate the result to receive text pieces as they are generated.

        Args:
            prompt: a template name; None chooses by similarity of the question to the descriptions.
            exemplars: add the most similar good exemplars of the namespace as few-shot turns.
            log: keep the answer in the answer log (its id is what `feedback` takes).
        """
        prepared = self._prepare(question, k=k, namespace=namespace, use_memory=use_memory, prompt=prompt,
                                 exemplars=exemplars)
        return self._answer_stream(question, prepared, namespace, use_memory, max_new_tokens, log)

    def _answer_stream(self, question: str, prepared, namespace: str, use_memory: bool, max_new_tokens: int | None,
                       log: bool, session_id: str | None = None, remembered: Sequence[int] = ()) -> AnswerStream:
        hits, ids, choice, timings, t0, skipped = prepared
        max_new = max_new_tokens or self.settings.max_new_tokens
        t_gen = time.perf_counter()

        def finish(text: str, first: float | None) -> Answer:
            end = time.perf_counter()
            timings.update(generate=end - t_gen, first_token=(first or end) - t0, total=end - t0)
            answer = Answer(text.strip(), question, hits, timings, self.settings.model, namespace, use_memory,
                            self.adapter_version, prompt=choice, session_id=session_id, remembered=list(remembered))
            if self.adapter_version is not None:
                answer.adapter_active = self._router.active if self._router is not None else True
                used = self._router.acted if hasattr(self._router, "acted") \
                    else (self.adapter_version if answer.adapter_active else None)  # one adapter: this version
                # one adapter loads under peft's name "default" (also when served as a stack of one)
                answer.adapter_used = self.adapter_version if used == "default" else used
            answer.path, answer.why = self._path(answer, skipped)
            if log:
                answer.id = self.store.log_answer(
                    namespace=namespace, question=question, answer=answer.text, template=choice.name,
                    exemplar_ids=[e.id for e in choice.exemplars], memory_ids=[h.memory.id for h in hits],
                    model=self.settings.model, adapter=self.adapter_version, session_id=session_id)
            return answer

        stop = threading.Event()
        return AnswerStream(self.generator.stream(ids, max_new, stop=stop), finish, stop)

    # ---- chat ---------------------------------------------------------------------------------------
    def chat(self, messages: Sequence[dict], *, session_id: str | None = None, namespace: str = DEFAULT_NAMESPACE,
             remember: bool = False, k: int | None = None, use_memory: bool = True, prompt: str | None = None,
             exemplars: bool = True, max_new_tokens: int | None = None) -> AnswerStream:
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
        """
        from memory_llm.chat import check_messages, conversation_queries, split_messages, statements

        _check_namespace(namespace)
        messages = check_messages(messages)
        system, history, question = split_messages(messages)
        remembered: list[int] = []
        said = " ".join(statements(question)) if remember else ""
        if said:
            import hashlib

            uri = f"chat:{session_id or '-'}:{hashlib.sha256(said.encode()).hexdigest()[:16]}"
            remembered = self.learn(text=said, namespace=namespace, source=uri).memory_ids
        prepared = self._prepare(question, k=k, namespace=namespace, use_memory=use_memory, prompt=prompt,
                                 exemplars=exemplars, queries=conversation_queries(messages), history=history,
                                 system=system)
        return self._answer_stream(question, prepared, namespace, use_memory, max_new_tokens, True, session_id,
                                   remembered)

    def history(self, session_id: str, namespace: str = DEFAULT_NAMESPACE, limit: int = 50) -> list[dict]:
        """A chat session's turns from the answer log, as messages (to resume it)."""
        out: list[dict] = []
        for a in self.store.answers(namespace, session_id, limit):
            out += [{"role": "user", "content": a.question}, {"role": "assistant", "content": a.answer}]
        return out

    # ---- feedback -----------------------------------------------------------------------------------
    def feedback(self, answer_id: int, *, good: bool = False, bad: bool = False, correction: str | None = None,
                 namespace: str | None = None) -> dict:
        """Feedback on a logged answer: good (it becomes an exemplar, or its exemplar gains a point), bad
        (the exemplars it used lose a point) or a correction (as bad, plus the correction is learned as a
        memory and stored as an exemplar). With a namespace, only that namespace's answers are found.

        Returns:
            {"answer_id", "feedback", "exemplar_ids" (added or rated up), "memory_ids" (learned)}.
        """
        if sum([good, bad, correction is not None]) != 1:
            raise InputError("give exactly one of good, bad or a correction")
        if correction is not None and not correction.strip():
            raise InputError("the correction is empty")
        answer = self.store.logged_answer(answer_id, namespace)
        if answer is None:
            raise InputError(f"unknown answer id {answer_id}" + (f" in namespace {namespace!r}" if namespace else ""))
        kind = "good" if good else "bad" if bad else "correct"
        memory_ids: list[int] = []
        if correction is not None:
            correction = correction.strip()
            memory_ids = self.learn(text=f"{answer.question}\n{correction}", namespace=answer.namespace,
                                    source=f"feedback:answer-{answer.id}").memory_ids
        exemplar_ids = self.store.record_feedback(answer, kind, correction)
        return {"answer_id": answer.id, "feedback": kind, "exemplar_ids": exemplar_ids, "memory_ids": memory_ids}

    # ---- forget / stats -----------------------------------------------------------------------------
    def forget(self, ids: Sequence[int] = (), *, source: str | None = None, namespace: str | None = None,
               everything: bool = False) -> int:
        """Delete memories by id, by source, or all (within a namespace if given). Returns how many."""
        n = self.store.forget(ids=ids, source=source, namespace=namespace, everything=everything)
        self.store.flush()
        return n

    def stats(self) -> dict:
        s = self.settings
        return {**self.store.stats(), "home": str(s.home), "model": s.model, "embedder_setting": s.embedder,
                "cache_dir": str(s.cache_dir)}

    def doctor(self, repair: bool = False) -> dict:
        """Check the home's health; with repair=True, rebuild what can be rebuilt from SQLite, roll a broken
        current adapter back to the newest intact one, and re-check."""
        def run() -> list[dict]:
            return self.store.check() + [self.adapters.check(self.settings.model)]

        try:
            self.store
        except StoreError as exc:  # a file too damaged to open: nothing can be checked or rebuilt from it
            if "locked" in str(exc):
                raise
            failed = {"check": "sqlite", "ok": False, "repairable": False,
                      "detail": f"the database file is damaged and cannot be opened ({exc}); restore memory.sqlite"
                                " from a backup"}
            return {"healthy": False, "checks": [failed], "repaired": []}
        checks = run()
        repaired: list[str] = []
        if repair and any(c["repairable"] for c in checks[:-1]):
            repaired += self.store.repair()
        if repair and checks[-1]["repairable"]:
            repaired.append(self.adapters.repair(self.settings.model))
        if repaired:
            checks = run()
        return {"healthy": all(c["ok"] for c in checks), "checks": checks, "repaired": repaired}

    def sources(self, namespace: str | None = None) -> list[dict]:
        return self.store.list_sources(namespace)

    # ---- eval ---------------------------------------------------------------------------------------
    def evaluate(self, path: str | Path, mode: str = "rag", *, k: int | None = None,
                 namespace: str = DEFAULT_NAMESPACE, limit: int | None = None, progress=None,
                 prompt: str | None = None, exemplars: bool = True, qa_new_tokens: int = 64) -> dict:
        """Run an eval file (design.md's format) in a mode; returns accuracy overall and by tag. `qa` probes
        are prompted as `ask` does (template by name or similarity, exemplars of the namespace) and get
        qa_new_tokens; `cloze` probes are raw continuations (12 tokens)."""
        from memory_llm import evaluate as ev
        from memory_llm.retrieve import pack

        if mode not in ev.MODES:
            raise InputError(f"mode must be one of {', '.join(ev.MODES)}, not {mode!r}")
        probes = ev.load_probes(Path(path))[:limit]
        if prompt is not None:
            self.prompts.get(prompt)  # an unknown template fails before any model loads
        gen = self.generator
        adapted = mode in ("closed", "hybrid")
        if adapted and self.adapter_version is None:
            raise InputError(f"mode {mode} needs a consolidated adapter: run `mllm consolidate` first")
        start = time.perf_counter()
        from contextlib import nullcontext

        def outputs_of(retrieval: bool, confidence: bool = False) -> tuple[list[str], list[float]]:
            """Every probe's output with retrieval (the base model reads the sources) or without (the adapter
            answers, when adapted), and with `confidence` each output's confidence (else none)."""
            asked: dict[str, tuple] = {}  # probe id → its prompt ids
            sure: dict[tuple, float] = {}

            def prompt_ids(p: ev.Probe) -> list[int]:
                if p.kind == "qa":
                    ids = self._prepare(p.input, k=k, namespace=namespace, use_memory=retrieval, prompt=prompt,
                                        exemplars=exemplars)[1][0].tolist()
                else:
                    context = []
                    if retrieval:
                        hits = pack(self.search(p.input, k, namespace), gen.count_tokens,
                                    self.settings.context_tokens)
                        context = [h.memory.text for h in hits]
                    text = ("\n\n".join(context) + "\n\n" + p.input) if context else p.input
                    ids = gen.tokenizer(text, add_special_tokens=False)["input_ids"]
                asked[p.id] = tuple(ids)
                return ids

            def generate(prompts: list, new_tokens: int) -> list[str]:
                if not confidence:
                    return gen.generate_batch(prompts, new_tokens)
                pairs = gen.generate_batch(prompts, new_tokens, confidence=True)
                sure.update((tuple(ids), value) for ids, (_, value) in zip(prompts, pairs))
                return [text for text, _ in pairs]

            with (nullcontext() if adapted and not retrieval else self._base_context()):
                outputs = ev.run(probes, prompt_ids, generate, progress=progress,
                                 max_new_tokens={"cloze": 12, "qa": qa_new_tokens})
            return outputs, [sure[asked[p.id]] for p in probes] if confidence else []

        paths: dict[str, str] = {}
        if mode == "served":
            outputs = self._served_outputs(probes, paths, k=k, namespace=namespace, prompt=prompt,
                                           exemplars=exemplars, progress=progress, new_tokens=qa_new_tokens)
        elif mode != "hybrid":
            outputs = outputs_of(mode == "rag")[0]
        else:  # per probe, the more confident of the adapter without sources and the base model reading them
            (closed, sure_closed), (rag, sure_rag) = outputs_of(False, True), outputs_of(True, True)
            outputs = [c if sc > sr + HYBRID_MARGIN else r for c, r, sc, sr in zip(closed, rag, sure_closed, sure_rag)]
        result = ev.score(probes, outputs, mode)
        if mode == "served":
            for record in result["probes"]:
                record["path"] = paths[record["id"]]
            result["paths"] = {p: sum(r["path"] == p for r in result["probes"]) for p in sorted(set(paths.values()))}
        result["adapter"] = self.adapter_version if adapted or mode == "served" else None
        result["seconds"] = round(time.perf_counter() - start, 2)
        result["model"] = self.settings.model
        return result

    def _served_outputs(self, probes: list, paths: dict, *, k, namespace: str, prompt, exemplars: bool, progress,
                        new_tokens: int) -> list[str]:
        """Every probe answered as `ask` answers it by default (its prompt, retrieval or its skip, the adapter
        where its router lets it act, greedy), batched; `paths` gets each probe's path (see Answer.path)."""
        from memory_llm import evaluate as ev

        asked: dict[tuple, list] = {}  # prompt ids → [(probe id, sources?, retrieval skipped?)] (ids may repeat)

        def prompt_ids(p) -> list[int]:
            hits, ids, *_, skipped = self._prepare(p.input, k=k, namespace=namespace, use_memory=True,
                                                   prompt=prompt, exemplars=exemplars)
            ids = ids[0].tolist()
            asked.setdefault(tuple(ids), []).append((p.id, bool(hits), skipped is not None))
            return ids

        def generate(prompts: list, new: int) -> list[str]:
            texts = self.generator.generate_batch(prompts, new)
            router = self._router
            acted = list(router.last_on) if router is not None and len(router.last_on) == len(prompts) \
                else [self.adapter_version is not None] * len(prompts)
            for ids, on in zip(prompts, acted):
                for pid, sources, skipped in asked[tuple(ids)]:
                    paths[pid] = "adapter" if skipped or (on and not sources) else \
                        ("retrieval+adapter" if on else "retrieval") if sources else "model"
            return texts

        return ev.run(probes, prompt_ids, generate, progress=progress,
                      max_new_tokens={"cloze": new_tokens, "qa": new_tokens})

    # ---- consolidation -------------------------------------------------------------------------------
    def consolidate(self, *, max_minutes: float | None = None, dry_run: bool = False, full: bool = False,
                    namespace: str | None = None, recipe=None, floors=None, progress=None):
        """Distil memories into a LoRA adapter (see memory_llm.consolidate.run). Returns a Summary."""
        from memory_llm.consolidate.run import consolidate

        summary = consolidate(self.store, self.settings, new_generator=self.new_generator, embed=self.embed_texts,
                              max_minutes=max_minutes, dry_run=dry_run, full=full, namespace=namespace,
                              recipe=recipe, floors=floors, progress=progress)
        if summary.status == "promoted":
            self.reload_adapter()
        return summary

    @property
    def adapters(self):
        """The adapter registry: versions, current, rollback."""
        from memory_llm.adapters import AdapterRegistry

        return AdapterRegistry(self.settings.home)

    def close(self) -> None:
        self._prompts = None
        if self._store is not None:
            self._store.close()
            self._store = None


def _check_namespace(namespace: str) -> None:
    if not namespace or len(namespace) > 128 or not namespace.isprintable():
        raise InputError(f"invalid namespace {namespace!r}: use 1-128 printable characters")


__all__ = ["Answer", "AnswerStream", "LearnReport", "MemoryLLM", "MemoryLLMError"]
