"""A real, small consolidation on the offline model: closed-book beats base on the trained facts, and general
answers stay as they were."""

import copy
import json

import pytest

from conftest import FK_JSON, REPO
from memory_llm import MemoryLLM
from memory_llm.consolidate.recipe import Recipe
from memory_llm.generate import Generator

pytestmark = pytest.mark.e2e


def test_consolidation_moves_facts_into_the_weights_without_damage(tmp_path, real_models):
    if not FK_JSON.exists():
        pytest.skip("../shared/data/fictional_knowledge is not beside the checkout")
    record = json.loads(FK_JSON.read_text())[0]
    doc = tmp_path / "fk_000.txt"
    doc.write_text(record["train_context"])
    probes = [{"id": f"mem-{j}", "kind": "cloze", "input": i, "answers": [[t]], "tags": ["mem"]}
              for j, (i, t) in enumerate(zip(record["mem_input"], record["mem_target"]))]
    general = [json.loads(l) for l in (REPO / "data" / "general_probes.jsonl").read_text().splitlines()[:12]]
    facts, gk = tmp_path / "facts.jsonl", tmp_path / "general.jsonl"
    facts.write_text("\n".join(json.dumps(p) for p in probes))
    gk.write_text("\n".join(json.dumps(p) for p in general))

    embedder, shared = real_models
    generator = Generator(copy.deepcopy(shared.model), shared.tokenizer, shared.name)  # the adapter attaches in place
    m = MemoryLLM(tmp_path / "home", embedder=embedder, generator=generator)
    m.learn([doc])
    base = m.evaluate(facts, "base")
    general_before = m.evaluate(gk, "base")

    summary = m.consolidate(recipe=Recipe(epochs=3, questions=2, locality_prompts=30))
    assert summary.status == "promoted", summary.reasons
    assert summary.metrics["locality"] >= 0.9

    closed = m.evaluate(facts, "closed")
    general_after = m.evaluate(gk, "closed")
    assert closed["accuracy"] > base["accuracy"], (base["accuracy"], closed["accuracy"])
    lost = [b["id"] for b, a in zip(general_before["probes"], general_after["probes"]) if b["correct"] and not a["correct"]]
    assert len(lost) <= 1, lost
