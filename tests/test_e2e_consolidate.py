"""A real, small consolidation on the offline model with the shipped recipe: the gate promotes it; the adapter
answers the trained facts closed-book better than the base model, both as raw statements and asked in chat form as
users ask; what `ask` serves is no worse than retrieval alone; and general answers stay (the router gives general
questions the base model). Then facts change (a restated text, an edited file) and neither `ask` nor `ask
--no-memory` answers an old value."""

import copy
import json

import pytest

from conftest import REPO
from memory_llm import MemoryLLM
from memory_llm.evaluate import lost
from memory_llm.generate import TransformersGenerator

pytestmark = pytest.mark.e2e

FACTS = ("The harbour town of Pelloria was founded in 1642 by the cartographer Mirela Vantz. "
         "Its lighthouse, the Grey Sentinel, burns whale oil mixed with juniper resin. "
         "Every autumn the town holds the Lantern Regatta, in which boats race around Castamere Rock.")
PROBES = [("The harbour town of Pelloria was founded in 1642 by the cartographer", "Vantz"),
          ("Its lighthouse, the Grey", "Sentinel"),
          ("Every autumn the town holds the Lantern", "Regatta"),
          ("The harbour town of Pelloria was founded in", "1642")]
CHANGED = [("In which year was Pelloria founded?", "1642", "1655"),
           ("Around which rock do the boats of the Lantern Regatta race?", "Castamere", "Hollin")]
QUESTIONS = [("Who founded the harbour town of Pelloria?", "Vantz"),  # as users ask: `ask`'s chat form
             ("What is the name of the lighthouse of Pelloria?", "Sentinel"),
             ("In which year was Pelloria founded?", "1642"),
             ("What does the lighthouse of Pelloria burn?", "whale oil")]


def test_consolidation_moves_facts_into_the_weights_without_damage(tmp_path, real_models):
    facts, gk, asked = tmp_path / "facts.jsonl", tmp_path / "general.jsonl", tmp_path / "questions.jsonl"
    facts.write_text("\n".join(json.dumps({"id": f"f{i}", "kind": "cloze", "input": q, "answers": [[a]],
                                           "tags": ["mem"]}) for i, (q, a) in enumerate(PROBES)))
    asked.write_text("\n".join(json.dumps({"id": f"q{i}", "kind": "qa", "input": q, "answers": [[a]]})
                               for i, (q, a) in enumerate(QUESTIONS)))
    general = (REPO / "data" / "general_probes.jsonl").read_text().splitlines()[:16]
    gk.write_text("\n".join(general))

    embedder, shared = real_models
    generator = TransformersGenerator(copy.deepcopy(shared.model), shared.tokenizer, shared.name)  # the adapter attaches in place
    m = MemoryLLM(tmp_path / "home", embedder=embedder, generator=generator)
    notes = tmp_path / "pelloria.md"
    notes.write_text(FACTS)
    m.learn([notes])
    base = m.evaluate(facts, "base")
    general_before = m.evaluate(gk, "base")
    asked_base, asked_rag = m.evaluate(asked, "base"), m.evaluate(asked, "rag")

    summary = m.consolidate()  # the shipped recipe
    assert summary.status == "promoted", (summary.message, summary.reasons, summary.metrics)
    assert summary.items > 0 and summary.training["steps"] == summary.training["planned_steps"]
    assert summary.metrics["locality"] >= 0.95 and summary.metrics["reliability"] >= 0.5, summary.metrics
    closed = m.evaluate(facts, "closed")
    general_after = m.evaluate(gk, "closed")
    assert closed["accuracy"] > base["accuracy"], (base["accuracy"], closed["accuracy"])
    gone = lost(general_before, general_after)
    assert len(gone) <= 1, gone
    # asked as users ask (`ask`'s chat form): closed-book answers more than the base model, and what `ask` serves
    # is no worse than retrieval alone
    asked_closed, asked_served = m.evaluate(asked, "closed"), m.evaluate(asked, "served")  # 3/4 and 4/4 (base 0/4,
    # rag 4/4) on 2026-12-03
    assert asked_closed["accuracy"] > asked_base["accuracy"], (asked_base["accuracy"], asked_closed["accuracy"])
    assert asked_served["accuracy"] >= asked_rag["accuracy"] > asked_base["accuracy"], \
        (asked_base["accuracy"], asked_rag["accuracy"], asked_served["accuracy"])
    # the router keeps the adapter off a general question (that it acts on the facts is what the closed-book
    # gain above needs; through `ask`, with its own system prompt, fact prompts did not route in full-suite runs)
    assert m.ask("What is the capital of France?", use_memory=False, max_new_tokens=4).adapter_active is False

    # facts change: a restated text (detected: one sentence of the note) and the note's file edited
    restated = m.learn(text="The harbour town of Pelloria was founded in 1655 by the cartographer Mirela Vantz.")
    assert [(x["reason"], x["sentence"] is not None) for x in restated.superseded] == [("detected", True)]
    notes.write_text(FACTS.replace("1642", "1655").replace("Castamere Rock", "Hollin Point"))
    assert [x["reason"] for x in m.learn([notes]).superseded] == ["source"]
    for question, old, new in CHANGED:
        closed = m.ask(question, use_memory=False, max_new_tokens=32)
        served = m.ask(question, max_new_tokens=32)
        assert old not in closed.text and old not in served.text, (question, closed.text, served.text)
        assert closed.adapter_active is not True, closed.why  # the adapter holds the old value: it stays off
        assert served.sources and all(old not in h.memory.live_text for h in served.sources)
        assert any(new in h.memory.live_text for h in served.sources)
