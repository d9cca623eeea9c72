"""Feedback on a logged answer: good (it becomes an exemplar, or its exemplar gains a point), bad (the exemplars
it used lose a point) or a correction (as bad, plus the correction is learned as a memory, supersedes the cited
memories it contradicts, and is kept as an exemplar). Consolidation later distils the good exemplars too."""

from __future__ import annotations

from typing import TYPE_CHECKING

from memory_llm.errors import InputError
from memory_llm.store import Store

if TYPE_CHECKING:
    from memory_llm.learning import Learner


def record_feedback(store: Store, learner: "Learner", answer_id: int, *, good: bool = False, bad: bool = False,
                    correction: str | None = None, namespace: str | None = None) -> dict:
    """Record one kind of feedback on answer `answer_id` (with a namespace, only that namespace's answers are
    found); `learner` stores a correction as a memory, which supersedes what it restates and the cited memories
    it contradicts (memory_llm.updating).

    Returns:
        {"answer_id", "feedback", "exemplar_ids" (added or rated up), "memory_ids" (learned), "superseded"}.
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
    superseded: list[dict] = []
    if correction is not None:
        correction = correction.strip()
        report = learner.learn(text=f"{answer.question}\n{correction}", namespace=answer.namespace,
                               source=f"feedback:answer-{answer.id}")
        memory_ids, superseded = report.memory_ids, report.superseded
        done = {(x["old_id"], x["sentence"]) for x in superseded}
        updater = learner.updater
        contradicted = [x for x in updater.contradicted(answer.memory_ids, answer.question, answer.answer, correction,
                                                        memory_ids[0] if memory_ids else None)
                        if (x.old_id, x.sentence) not in done and (x.old_id, None) not in done]
        store.supersede(answer.namespace, contradicted)
        updater.retire_exemplars(answer.namespace, contradicted)
        superseded += [updater.describe(x) for x in contradicted]
    exemplar_ids = store.record_feedback(answer, kind, correction)
    return {"answer_id": answer.id, "feedback": kind, "exemplar_ids": exemplar_ids, "memory_ids": memory_ids,
            "superseded": superseded}
