"""Answering: retrieve (or skip retrieval where the adapter knows), choose the template and exemplars, build
the prompt, generate (streamed), say which path answered and why, and log the answer for feedback."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from memory_llm.config import Settings, check_namespace
from memory_llm.errors import InputError
from memory_llm.serving import ServedModel
from memory_llm.store import Hit, Store

if TYPE_CHECKING:
    from memory_llm.generate import Sampling
    from memory_llm.prompts import PromptChoice, PromptLibrary


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
    finish_reason: str = "stop"  # "stop": the answer ended (or a stop string cut it); "length": max tokens cut it
    completion_tokens: int | None = None  # tokens generated (None: the generator did not say)
    conflicts: list[dict] = field(default_factory=list)  # live sources that disagree (Retriever.conflicts)

    @property
    def template(self) -> str | None:
        return self.prompt.name if self.prompt is not None else None

    def as_dict(self) -> dict:
        return {"id": self.id, "answer": self.text, "question": self.question, "namespace": self.namespace,
                "session_id": self.session_id, "model": self.model, "adapter": self.adapter,
                "adapter_active": self.adapter_active, "adapter_used": self.adapter_used,
                "used_memory": self.used_memory, "path": self.path, "why": self.why,
                "finish_reason": self.finish_reason, "completion_tokens": self.completion_tokens,
                **(self.prompt.as_dict() if self.prompt else {}),
                "retrieved_ids": [h.memory.id for h in self.sources], "remembered_ids": self.remembered,
                "conflicts": self.conflicts,
                "sources": [{"n": i, **h.as_dict()} for i, h in enumerate(self.sources, 1)],
                "timings": {k: round(v, 4) for k, v in self.timings.items()}}


class AnswerStream:
    """Iterate to receive text pieces as they are generated; `.answer` is complete afterwards."""

    def __init__(self, pieces: Iterator[str], finish: Callable[[str, float | None], Answer],
                 stop: threading.Event | None = None, halt: threading.Event | None = None):
        self._pieces, self._finish, self._stop = pieces, finish, stop or threading.Event()
        self._halt = halt  # the generation's own stop (also set by a stop string, which still finishes the answer)
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
        if self._halt is not None:
            self._halt.set()

    def result(self) -> Answer:
        """Wait for the whole answer (without reading the pieces)."""
        if self.answer is None:
            for _ in self:
                pass
        return self.answer


class Prepared(NamedTuple):
    """A question made ready to generate: its sources, prompt ids, prompt choice, timings, start time, the sources
    that disagree and, when retrieval was skipped for the adapter, why (a line with an {adapter} slot)."""

    hits: list[Hit]
    ids: object
    choice: "PromptChoice"
    timings: dict
    t0: float
    conflicts: list[dict]
    skipped: str | None


class Answerer:
    """Answers questions the way `ask` and `chat` do.

    Args:
        settings: top_k, context_tokens, max_new_tokens, the retrieval-skip settings, the model's name.
        store: where answers are logged.
        served: the model that answers (its adapter and router).
        prompts: the prompt library (templates, exemplars).
        retrieve: (queries, k, namespace, vectors, floor=) → hits (vectors: a callable giving the queries' embeddings;
            floor: the source floor, Settings.source_floor).
        embed: texts → sentence embeddings.
        served_for: namespace → the model that answers it (a tenant's own adapter; default: `served` for all).
        conflicts: hits → the pairs of them that disagree (Retriever.conflicts; default: none are looked for).
    """

    def __init__(self, settings: Settings, store: Store, served: ServedModel, prompts: "PromptLibrary",
                 retrieve: Callable, embed: Callable[[list[str]], np.ndarray],
                 served_for: Callable[[str], ServedModel] | None = None,
                 conflicts: Callable[[list[Hit]], list[dict]] | None = None):
        self.settings, self.store, self.served, self.prompts = settings, store, served, prompts
        self.retrieve, self.embed = retrieve, embed
        self.served_for = served_for or (lambda namespace: served)
        self.conflicts = conflicts

    def prepare(self, question: str, *, k: int | None, namespace: str, use_memory: bool, prompt: str | None = None,
                 exemplars: bool = True, queries: list[str] | None = None, history: Sequence[dict] = (),
                 system: str | None = None):
        """Retrieve, choose the template and exemplars, build the prompt's token ids. The question (and the
        conversation's queries) are embedded once, only if something needs them."""
        from memory_llm.generate import build_messages
        from memory_llm.retrieve import pack

        if not question or not question.strip():
            raise InputError("the question is empty")
        check_namespace(namespace)
        queries = queries or [question]
        vectors: list = []

        def question_vectors() -> np.ndarray:
            if not vectors:
                vectors.append(self.embed(queries))
            return vectors[0]

        t0 = time.perf_counter()
        served = self.served_for(namespace)
        gen = served.generator
        served.sync_staleness()  # no adapter acts on what is no longer true
        choice = self.prompts.choose(lambda: question_vectors()[0], namespace, prompt, exemplars, gen.count_tokens)
        t1 = time.perf_counter()

        def prompt_ids(hits: list[Hit], conflicts: Sequence[dict] = ()):
            from memory_llm.retrieve import Retriever

            texts = Retriever.read_as(hits, conflicts)
            return gen.chat_ids(build_messages(question, texts, system,
                                               template=choice.template, shots=choice.shots(), history=history))

        skipped, ids, conflicts = None, None, []  # skipped: why retrieval was skipped (the adapter answers), in words
        at_similarity, at_confidence = self.settings.skip_retrieval_similarity, self.settings.skip_retrieval_confidence
        if use_memory and not history and served.keys and (at_similarity > 0 or at_confidence > 0) \
                and not served.stale_near(question_vectors()[0]):  # a memory the adapter holds was superseded
            similarity = served.trained_similarity(question_vectors()[0])
            if at_similarity <= 0 or similarity >= at_similarity:
                closed = prompt_ids([])
                if at_confidence <= 0:
                    if served.adapter_acts(closed):
                        skipped = (f"the question is {similarity:.2f} similar to one adapter {{adapter}} was trained"
                                   f" on (skip_retrieval_similarity {at_similarity:g}) and its router let it act")
                else:
                    confidence = served.adapter_confidence(closed)
                    if confidence is not None and confidence >= at_confidence:
                        skipped = (f"adapter {{adapter}} acted on the question and its answer starts with probability"
                                   f" {confidence:.2f} (skip_retrieval_confidence {at_confidence:g})")
                if skipped is not None:
                    ids, hits = closed, []
        t2 = time.perf_counter()
        if ids is None:
            hits = self.retrieve(queries, k, namespace, question_vectors, floor=self.settings.source_floor) \
                if use_memory else []
            t2 = time.perf_counter()
            hits = pack(hits, gen.count_tokens, self.settings.context_tokens)
            if self.conflicts is not None and len(hits) > 1:  # two sources disagree: the newer one leads
                from memory_llm.retrieve import Retriever

                conflicts = self.conflicts(hits)
                hits = Retriever.newer_first(hits, conflicts)
            ids = prompt_ids(hits, conflicts)
        window = getattr(getattr(gen.model, "config", None), "max_position_embeddings", None)
        if isinstance(window, int) and ids.shape[1] >= window:  # beyond it a model answers garbage, slowly
            raise InputError(f"the question is too long: the prompt is {ids.shape[1]} tokens and the model reads"
                             f" at most {window}")
        t3 = time.perf_counter()
        return Prepared(hits, ids, choice, {"prompt_library": t1 - t0, "retrieve": t2 - t1, "prompt": t3 - t2,
                                            "prompt_tokens": float(ids.shape[1])}, t0, conflicts, skipped)

    def path(self, answer: Answer, skipped: str | None) -> tuple[str, str]:
        """Which path answered (retrieval, adapter, both, or the model alone) and why, in a line."""
        acted = bool(answer.adapter_active)
        sources = f"{len(answer.sources)} retrieved source{'s' * (len(answer.sources) != 1)}"
        if skipped is not None:
            return "adapter", "retrieval skipped: " + skipped.format(adapter=answer.adapter_used or answer.adapter)
        if answer.adapter is None:
            adapter = "no consolidated adapter" if self.served.use_adapter else "the adapter is switched off"
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

    def stream(self, question: str, prepared: Prepared, namespace: str, use_memory: bool, max_new_tokens: int | None,
                       log: bool, session_id: str | None = None, remembered: Sequence[int] = (),
                       sampling: "Sampling | None" = None, stop: Sequence[str] = ()) -> AnswerStream:
        """Generate the prepared answer, streamed; `sampling` (default greedy) chooses the tokens, and the answer
        ends before the first of the `stop` strings it would contain."""
        hits, ids, choice, timings, t0, conflicts, skipped = prepared
        max_new = max_new_tokens or self.settings.max_new_tokens
        served = self.served_for(namespace)
        report: dict = {}
        t_gen = time.perf_counter()

        def finish(text: str, first: float | None) -> Answer:
            end = time.perf_counter()
            timings.update(generate=end - t_gen, first_token=(first or end) - t0, total=end - t0)
            if "cached_tokens" in report:  # prompt tokens a llama.cpp sequence held already (not prefilled)
                timings["cached_tokens"] = float(report["cached_tokens"])
            answer = Answer(text.strip(), question, hits, timings, self.settings.model, namespace, use_memory,
                            served.adapter_version, prompt=choice, session_id=session_id,
                            remembered=list(remembered))
            answer.adapter_active, answer.adapter_used = report.get("routed") or served.acted()  # batched: its row
            answer.path, answer.why = self.path(answer, skipped)
            answer.finish_reason = "stop" if report.get("stopped") else report.get("finish_reason", "stop")
            answer.completion_tokens = report.get("completion_tokens")
            answer.conflicts = conflicts
            if log:
                answer.id = self.store.log_answer(
                    namespace=namespace, question=question, answer=answer.text, template=choice.name,
                    exemplar_ids=[e.id for e in choice.exemplars], memory_ids=[h.memory.id for h in hits],
                    model=self.settings.model, adapter=served.adapter_version, session_id=session_id)
            return answer

        cancel, halt = threading.Event(), threading.Event()
        pieces = served.generator.stream(ids, max_new, stop=halt, sampling=sampling, report=report)
        return AnswerStream(cut_at(pieces, stop, halt, report), finish, cancel, halt)


def cut_at(pieces: Iterator[str], stops: Sequence[str], halt: threading.Event, report: dict) -> Iterator[str]:
    """The pieces up to the first of the stop strings (excluded), holding back a tail that could begin one; at a
    stop string the generation is halted (report["stopped"]) and the rest drained."""
    stops = [s for s in stops if s]
    if not stops:
        yield from pieces
        return
    hold, buffer = max(map(len, stops)) - 1, ""
    for piece in pieces:
        buffer += piece
        found = [i for i in (buffer.find(s) for s in stops) if i >= 0]
        if found:
            if min(found):
                yield buffer[:min(found)]
            report["stopped"] = True
            halt.set()
            for _ in pieces:  # the generation ends at its next token
                pass
            return
        if len(buffer) > hold:
            yield buffer[:len(buffer) - hold]
            buffer = buffer[len(buffer) - hold:]
    if buffer:
        yield buffer
