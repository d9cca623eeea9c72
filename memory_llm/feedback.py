"""Feedback on a logged answer: good (it becomes an exemplar, or its exemplar gains a point), bad (the exemplars
it used lose a point) or a correction (as bad, plus the correction is learned as a memory and kept as an
exemplar). Consolidation later distils the good exemplars too."""

from __future__ import annotations

from typing import Callable

from memory_llm.errors import InputError
from memory_llm.store import Store


def record_feedback(store: Store, learn: Callable, answer_id: int, *, good: bool = False, bad: bool = False,
                    correction: str | None = None, namespace: str | None = None) -> dict:
    """Record one kind of feedback on answer `answer_id` (with a namespace, only that namespace's answers are
    found); `learn` stores a correction as a memory (MemoryLLM.learn's signature).

    Returns:
        {"answer_id", "feedback", "exemplar_ids" (added or rated up), "memory_ids" (learned)}.
    """
    if sum([good, bad, correction is not None]) != 1:
        raise InputError("give exactly one of good, bad or a correction")
    if correction is not None and not correction.strip():
        raise InputError("the correction is empty")
    answer = store.logged_answer(answer_id, namespace)
    if answer is None:
        raise InputError(f"unknown answer id {answer_id}" + (f" in namespace {namespace!r}" if namespace else ""))
    kind = "good" if good else "bad" if bad else "correct"
    memory_ids: list[int] = []
    if correction is not None:
        correction = correction.strip()
        memory_ids = learn(text=f"{answer.question}\n{correction}", namespace=answer.namespace,
                           source=f"feedback:answer-{answer.id}").memory_ids
    exemplar_ids = store.record_feedback(answer, kind, correction)
    return {"answer_id": answer.id, "feedback": kind, "exemplar_ids": exemplar_ids, "memory_ids": memory_ids}
