"""A real, small consolidation on the offline model. Whatever the recipe reaches, the safety contract holds: a
promoted adapter answers the trained facts closed-book better than the base model and keeps general answers;
a rejected candidate names the failed floor and leaves everything as it was."""

import copy
import json

import pytest

from conftest import REPO
from memory_llm import MemoryLLM
from memory_llm.consolidate.recipe import Recipe
from memory_llm.generate import Generator

pytestmark = pytest.mark.e2e

FACTS = ("The harbour town of Pelloria was founded in 1642 by the cartographer Mirela Vantz. "
         "Its lighthouse, the Grey Sentinel, burns whale oil mixed with juniper resin. "
         "Every autumn the town holds the Lantern Regatta, in which boats race around Castamere Rock.")
PROBES = [("The harbour town of Pelloria was founded in 1642 by the cartographer", "Vantz"),
          ("Its lighthouse, the Grey", "Sentinel"),
          ("Every autumn the town holds the Lantern", "Regatta"),
          ("The harbour town of Pelloria was founded in", "1642")]


def test_consolidation_moves_facts_into_the_weights_without_damage(tmp_path, real_models):
    facts, gk = tmp_path / "facts.jsonl", tmp_path / "general.jsonl"
    facts.write_text("\n".join(json.dumps({"id": f"f{i}", "kind": "cloze", "input": q, "answers": [[a]],
                                           "tags": ["mem"]}) for i, (q, a) in enumerate(PROBES)))
    general = (REPO / "data" / "general_probes.jsonl").read_text().splitlines()[:16]
    gk.write_text("\n".join(general))

    embedder, shared = real_models
    generator = Generator(copy.deepcopy(shared.model), shared.tokenizer, shared.name)  # the adapter attaches in place
    m = MemoryLLM(tmp_path / "home", embedder=embedder, generator=generator)
    m.learn(text=FACTS, source="pelloria")
    base = m.evaluate(facts, "base")
    general_before = m.evaluate(gk, "base")

    ask_before = m.ask(PROBES[0][0] + "?", max_new_tokens=12).text
    summary = m.consolidate(recipe=Recipe(questions=2, locality_prompts=30))
    assert summary.status in ("promoted", "rejected"), summary.message
    assert summary.items > 0 and summary.training["steps"] == summary.training["planned_steps"]
    assert 0.0 <= summary.metrics["locality"] <= 1.0 and summary.metrics["reliability"] is not None

    if summary.status == "rejected":  # the gate kept the base model: nothing changed
        assert any(r.startswith("failed: ") for r in summary.reasons), summary.reasons
        assert m.adapters.current_name() is None and m.ask(PROBES[0][0] + "?", max_new_tokens=12).text == ask_before
        assert not list(m.adapters.root.glob("v*")) and not (m.adapters.root / ".checkpoint").exists()
        return
    assert summary.metrics["locality"] >= 0.95
    closed = m.evaluate(facts, "closed")
    general_after = m.evaluate(gk, "closed")
    assert closed["accuracy"] > base["accuracy"], (base["accuracy"], closed["accuracy"])
    lost = [b["id"] for b, a in zip(general_before["probes"], general_after["probes"]) if b["correct"] and not a["correct"]]
    assert len(lost) <= 1, lost
