"""An adapter per tenant on the real model: tenant A's facts, consolidated with `consolidate(namespace="a")` and the
shipped recipe, are answered closed-book in A from A's adapter, while in tenant B the same questions get no adapter
and exactly the base model's answers."""

import copy
import json

import pytest

from memory_llm import MemoryLLM
from memory_llm.generate import TransformersGenerator

pytestmark = pytest.mark.e2e

FACTS = ("The harbour town of Pelloria was founded in 1642 by the cartographer Mirela Vantz. "
         "Its lighthouse, the Grey Sentinel, burns whale oil mixed with juniper resin.")
OTHER = "The Brannock ferry leaves the north pier every morning at seven and reaches Ostmere by noon."
QUESTIONS = [("Who founded the harbour town of Pelloria?", "Vantz"),
             ("What is the name of the lighthouse of Pelloria?", "Sentinel"),
             ("In which year was Pelloria founded?", "1642")]


def test_a_tenants_adapter_answers_its_facts_and_never_acts_for_another_tenant(tmp_path, real_models):
    asked = tmp_path / "questions.jsonl"
    asked.write_text("\n".join(json.dumps({"id": f"q{i}", "kind": "qa", "input": q, "answers": [[a]]})
                               for i, (q, a) in enumerate(QUESTIONS)))
    embedder, shared = real_models
    m = MemoryLLM(tmp_path / "home", embedder=embedder, max_new_tokens=24,
                  generator=TransformersGenerator(copy.deepcopy(shared.model), shared.tokenizer, shared.name))
    m.learn(text=FACTS, source="pelloria", namespace="a")
    m.learn(text=OTHER, source="ferry", namespace="b")
    base = m.evaluate(asked, "base", namespace="a")

    summary = m.consolidate(namespace="a")  # the shipped recipe
    assert summary.status == "promoted", (summary.message, summary.reasons, summary.metrics)
    assert m.adapters.current_name() is None and m.adapter_registry("a").current_name() == "v0001"
    closed = m.evaluate(asked, "closed", namespace="a")  # A's adapter, no retrieval
    assert closed["adapter"] == "a/v0001" and closed["accuracy"] > base["accuracy"], (base, closed)

    plain = MemoryLLM(tmp_path / "home", embedder=embedder, use_adapter=False, max_new_tokens=24,
                      generator=TransformersGenerator(copy.deepcopy(shared.model), shared.tokenizer, shared.name))
    acted = 0
    for question, _ in QUESTIONS:
        in_a = m.ask(question, namespace="a", use_memory=False, log=False)
        in_b = m.ask(question, namespace="b", use_memory=False, log=False)
        acted += bool(in_a.adapter_active)
        assert in_a.adapter == "a/v0001"
        assert in_b.adapter is None and in_b.adapter_used is None and in_b.path == "model"
        assert in_b.text == plain.ask(question, namespace="b", use_memory=False, log=False).text
    assert acted, "A's adapter acted on none of A's questions"
    plain.close()
    m.close()
