"""Consolidation on the tiny model: versions, gate, ledger, forgetting, lock, faults. (Fast; the real-model
test that closed-book beats base is in test_e2e_consolidate.py.)"""

import json
from dataclasses import replace

import pytest

from memory_llm import InputError, MemoryLLM, ModelError, StoreError
from memory_llm.consolidate.gate import Floors, decide, item_correct
from memory_llm.consolidate.recipe import Recipe
from memory_llm.consolidate.run import ConsolidationLocked, consolidation_lock
from memory_llm.consolidate.synth import Item, cloze_items, synthesize

FACTS = ["The lighthouse of Varn was built in 1820 by the engineer Lisbet Holm.",
         "Every spring the Varn choir sings on the harbour wall for three whole nights."]
FAST = Recipe(epochs=1, batch_size=16, rank=4, alpha=8, locality_prompts=4, rewrites=1, questions=2)
OPEN = Floors(reliability=0.0, locality=0.0, retention=0.0, tolerance=1.0)


@pytest.fixture
def cmem(mem):
    for i, fact in enumerate(FACTS):
        mem.learn(text=fact, source=f"fact{i}")
    return mem


def run(m, **kw):
    return m.consolidate(recipe=FAST, floors=kw.pop("floors", OPEN), **kw)


def test_cloze_items_cut_sentences():
    items = cloze_items(7, "One two three four five six seven eight. Short one.")
    assert {(i.prompt, i.answer) for i in items} == {("One two three", "four five six seven eight."),
                                                     ("One two three four five", "six seven eight."),
                                                     ("One two three four five six", "seven eight.")}
    assert all(i.memory_id == 7 and i.kind == "cloze" and not i.held_out for i in items)


def test_one_cut_per_sentence_supervises_the_rest_of_it(tiny_generator):
    from types import SimpleNamespace

    items = synthesize(RewriteOnly(tiny_generator), [SimpleNamespace(id=3, text=FACTS[0])], rewrites=1, questions=0,
                       cuts=(0.4,), answer_words=30, held_out_rewrite=True, sentence_questions=0)[3]
    assert [(i.prompt, i.answer, i.held_out) for i in items] == [
        ("The lighthouse of Varn was", "built in 1820 by the engineer Lisbet Holm.", False),
        ("In 1820 the engineer Lisbet", "Holm built the Varn lighthouse on the rocks.", False),
        ("In 1820 the engineer Lisbet", "Holm built the Varn lighthouse on the rocks.", True)]


class RewriteOnly:
    """The tiny model's tokenizer and template; every generation returns a fixed rewrite (counted)."""

    def __init__(self, generator):
        self.tokenizer, self.chat_ids, self.calls = generator.tokenizer, generator.chat_ids, 0

    def generate_batch(self, prompts, max_new_tokens=12, temperature=0.0, return_ids=False):
        self.calls += len(prompts)
        return ["In 1820 the engineer Lisbet Holm built the Varn lighthouse on the rocks."] * len(prompts)


@pytest.mark.parametrize("rewrites, held_out_rewrite, trained, held", [(0, True, 0, 1), (1, True, 1, 1),
                                                                       (0, False, 0, 0), (2, False, 2, 0)])
def test_rewrites_trained_and_held_out(tiny_generator, rewrites, held_out_rewrite, trained, held):
    from types import SimpleNamespace

    gen = RewriteOnly(tiny_generator)
    items = synthesize(gen, [SimpleNamespace(id=3, text=FACTS[0])], rewrites=rewrites, questions=0,
                       held_out_rewrite=held_out_rewrite, sentence_questions=0, cuts=(0.4, 0.6, 0.8), answer_words=8)[3]
    rewritten = [i for i in items if i.prompt.startswith("In 1820")]
    per_rewrite = len(cloze_items(3, "In 1820 the engineer Lisbet Holm built the Varn lighthouse on the rocks."))
    assert gen.calls == trained + held
    assert sum(not i.held_out for i in rewritten) == trained * per_rewrite
    assert sum(i.held_out for i in rewritten) == held * per_rewrite
    assert len(items) - len(rewritten) == len(cloze_items(3, FACTS[0]))  # the chunk's own sentences, trained


def test_open_book_items_carry_the_memory_with_a_distractor_or_the_distractor_alone():
    from memory_llm.consolidate.examples import open_book_items

    contexts = {1: "Memory one.", 2: "Memory two.", 3: "Memory three.", -4: "An exemplar."}
    items = [Item(1, "qa", "Q1?", "A1"), Item(2, "qa", "Q2?", "A2"), Item(1, "cloze", "Memory", "one."),
             Item(-4, "qa", "Q4?", "A4")]
    triples = open_book_items(items, contexts, 1.0, seed=0)
    assert len(triples) == 4 and {t[0].prompt for t in triples} == {"Q1?", "Q2?"}  # qa items of memories only
    for item, sources, teacher in triples:
        mine = contexts[item.memory_id]
        distractors = [x for x in sources if x != mine]
        assert len(distractors) == 1 and distractors[0] in ("Memory one.", "Memory two.", "Memory three.")
        assert (sources.count(mine), teacher) in ((1, None), (0, mine))  # reads the sources, or answers from memory
    assert open_book_items(items, contexts, 0.0, seed=0) == [] and len(open_book_items(items, contexts, 0.5, 0)) == 2


def test_sentence_questions_ask_about_every_sentence(tiny_generator):
    from types import SimpleNamespace

    class Asker:  # the tiny model's template; every generation is the same question (counted per call)
        def __init__(self):
            self.tokenizer, self.chat_ids, self.calls = tiny_generator.tokenizer, tiny_generator.chat_ids, []

        def generate_batch(self, prompts, max_new_tokens=12, temperature=0.0, return_ids=False):
            self.calls.append((len(prompts), temperature))
            return ["Who built the lighthouse of Varn?"] * len(prompts)

    gen = Asker()
    memories = [SimpleNamespace(id=1, text=FACTS[0] + " It is tall."), SimpleNamespace(id=2, text=FACTS[1])]
    items = synthesize(gen, memories, rewrites=0, held_out_rewrite=False, questions=0, sentence_questions=2,
                       sentence_answers=False)
    # two questions for each sentence of ≥ 4 words (2 of the 3), sampled warm; one answer per distinct question
    assert gen.calls == [(4, 0.7), (2, 0.0)]
    assert [i.prompt for i in items[1] if i.kind == "qa"] == ["Who built the lighthouse of Varn?"]
    # answered by the sentence itself: no teacher generation, the memory's own words as the answer
    gen.calls = []
    items = synthesize(gen, memories, rewrites=0, held_out_rewrite=False, questions=0, sentence_questions=2,
                       sentence_answers=True)
    assert gen.calls == [(4, 0.7)]
    assert [(i.prompt, i.answer) for i in items[1] if i.kind == "qa"] == [("Who built the lighthouse of Varn?",
                                                                            FACTS[0])]


def test_synthesis_samples_the_same_items_for_the_same_seed(tiny_generator):
    import torch
    from types import SimpleNamespace

    class Sampler:  # draws from torch's global RNG, as sampled generation does
        tokenizer, chat_ids = tiny_generator.tokenizer, tiny_generator.chat_ids

        def generate_batch(self, prompts, max_new_tokens=12, temperature=0.0, return_ids=False):
            return [f"Which number is {torch.randint(0, 10**6, (1,)).item()}?" for _ in prompts]

    def items(seed):
        made = synthesize(Sampler(), [SimpleNamespace(id=1, text=FACTS[0])], rewrites=0, held_out_rewrite=False,
                          questions=3, seed=seed, sentence_questions=0, cuts=(0.4, 0.6, 0.8), answer_words=8)[1]
        return [(i.kind, i.prompt, i.answer, i.held_out) for i in made]
    assert items(3) == items(3) != items(4)


def test_item_correct_rules():
    cloze = Item(1, "cloze", "The tower was built in", "1820 by the engineer")
    assert item_correct(cloze, " 1820, by the engineer Holm") and not item_correct(cloze, " the year 1820 by")
    qa = Item(1, "qa", "Who built it?", "Lisbet Holm built the lighthouse.")
    assert item_correct(qa, "It was Lisbet Holm.") and not item_correct(qa, "Nobody knows.")


def test_gate_rules():
    good = {"reliability": 0.8, "locality": 0.98, "retention": 0.7}
    assert decide(good, None, Floors())[0]
    assert not decide({**good, "locality": 0.9}, None, Floors())[0]
    ok, reasons = decide(good, {"retention": 0.9, "locality": 0.98}, Floors())
    assert not ok and any("failed: retention" in r for r in reasons)


def test_first_round_promotes_v0001_and_records_the_ledger(cmem):
    summary = run(cmem)
    assert summary.status == "promoted" and summary.version == "v0001" and summary.exit_code == 0
    assert summary.items > 0 and summary.training["steps"] > 0 and "locality" in summary.metrics
    reg = cmem.adapters
    assert reg.current_name() == "v0001"
    manifest = reg.get("v0001").manifest
    assert manifest["base_model"] == cmem.settings.model and sorted(manifest["memories"]) == cmem.store.memory_ids()
    assert {m for m, v in cmem.store.ledger("v0001")} == set(cmem.store.memory_ids())
    # serving picks the adapter up; ask reports its provenance
    answer = cmem.ask("Who built the lighthouse?", max_new_tokens=4)
    assert answer.adapter == "v0001" and answer.as_dict()["retrieved_ids"]
    assert MemoryLLM(cmem.settings.home, generator=cmem.new_generator(), embedder=cmem.embedder,
                     use_adapter=False).ask("x", max_new_tokens=2).adapter is None


def test_ask_says_which_path_answered_and_skips_retrieval_only_where_the_adapter_knows(cmem, tmp_path):
    run(cmem)
    answer = cmem.ask("Who built the lighthouse?", max_new_tokens=4)
    assert answer.sources and answer.path == ("retrieval+adapter" if answer.adapter_active else "retrieval")
    assert "retrieved sources" in answer.why and answer.as_dict()["path"] == answer.path
    closed = cmem.ask("Who built the lighthouse?", use_memory=False, max_new_tokens=4)
    assert not closed.sources and closed.path == ("adapter" if closed.adapter_active else "model")
    assert "--no-memory" in closed.why
    # the skip: a question close to a trained prompt, and the router letting the adapter act, skips retrieval
    trained = cmem.store.items(cmem.store.memory_ids())[0].prompt
    cmem.settings.skip_retrieval_similarity = 0.99
    cmem.served.adapter_acts = lambda ids: True
    skipped = cmem.ask(trained, max_new_tokens=4)
    assert skipped.path == "adapter" and not skipped.sources and skipped.why.startswith("retrieval skipped")
    assert skipped.timings["prompt_tokens"] < answer.timings["prompt_tokens"]
    cmem.served.adapter_acts = lambda ids: False  # the router would keep the adapter off: retrieve after all
    assert cmem.ask(trained, max_new_tokens=4).sources
    cmem.served.adapter_acts = lambda ids: True
    assert cmem.ask("Completely unrelated words about cooking pasta", max_new_tokens=4).sources  # not similar
    # eval --mode served runs that path, probe by probe
    probes = tmp_path / "p.jsonl"
    probes.write_text(json.dumps({"id": "a", "kind": "qa", "input": trained, "answers": [["x"]]}) + "\n"
                      + json.dumps({"id": "b", "kind": "cloze", "input": "Who built it", "answers": [["x"]]}) + "\n")
    served = cmem.evaluate(probes, "served")
    assert [p["path"] for p in served["probes"]][0] == "adapter" and served["probes"][1]["path"].startswith("retrieval")
    assert sum(served["paths"].values()) == 2 and served["adapter"] == "v0001"
    cmem.settings.skip_retrieval_similarity = 0.0
    assert all(p["path"].startswith("retrieval") for p in cmem.evaluate(probes, "served")["probes"])


def test_retrieval_skip_by_the_adapters_confidence(cmem):
    run(cmem)
    trained = cmem.store.items(cmem.store.memory_ids())[0].prompt
    closed = cmem.answerer.prepare(trained, k=None, namespace="default", use_memory=False).ids
    # the real check: a probability when the router lets the adapter act on the closed-book prompt, else None
    confidence = cmem.served.adapter_confidence(closed)
    assert (confidence is not None) == cmem.served.adapter_acts(closed)
    assert confidence is None or 0 < confidence <= 1
    cmem.settings.skip_retrieval_confidence = 0.5
    cmem.served.adapter_confidence = lambda ids: 0.9
    sure = cmem.ask(trained, max_new_tokens=4)
    assert sure.path == "adapter" and not sure.sources and "probability 0.90" in sure.why, sure.why
    assert sure.adapter_used in (None, "v0001") and "default" not in sure.why  # peft's name is not shown
    for unsure in (0.3, None):  # not confident enough, or the router keeps the adapter off: retrieve
        cmem.served.adapter_confidence = lambda ids: unsure
        assert cmem.ask(trained, max_new_tokens=4).sources
    cmem.served.adapter_confidence = lambda ids: 0.9
    cmem.settings.skip_retrieval_similarity = 0.99  # both set: both must hold
    assert cmem.ask("Completely unrelated words about cooking pasta", max_new_tokens=4).sources
    assert cmem.ask(trained, max_new_tokens=4).path == "adapter"
    with pytest.raises(InputError, match="skip_retrieval_confidence"):
        type(cmem.settings)(skip_retrieval_confidence=1.5)


def test_nothing_new_then_new_memory_builds_on_current(cmem):
    run(cmem)
    again = run(cmem)
    assert again.status == "nothing-new" and again.exit_code == 0
    cmem.learn(text="The ferry to Varn island leaves from the north pier at dawn.", source="ferry")
    dry = run(cmem, dry_run=True)
    assert dry.status == "dry-run" and dry.memories == 1
    assert cmem.adapters.current_name() == "v0001"
    weights = cmem.adapters.root / "v0001" / "adapter_model.safetensors"
    before = weights.read_bytes()
    second = run(cmem)
    assert second.version == "v0002" and not second.full
    # a new round trains a fresh adapter (no replay; a lower lr than round 1's) beside v0001, which stays as it was
    reg = cmem.adapters
    v2 = reg.get("v0002")
    assert second.training["lr"] == FAST.lr * FAST.later_lr_scale and weights.read_bytes() == before
    assert reg.get("v0001").manifest["training"]["lr"] == FAST.lr
    assert v2.manifest["stack"] == ["v0001"] and [v.name for v in v2.stack] == ["v0001", "v0002"]
    assert v2.manifest["parent"] == "v0001" and len(v2.manifest["memories"]) == 3
    assert len(v2.manifest["new_memories"]) == 1
    # serving loads both adapters, routed together; a prompt gets the adapter that learned what it is about
    assert cmem.ask("When does the ferry leave?", max_new_tokens=4).adapter == "v0002"
    assert set(cmem.generator.model.peft_config) == {"v0001", "v0002"}
    assert all((reg.root / v / "keys.npy").exists() for v in ("v0001", "v0002"))
    tok = cmem.generator.tokenizer
    assert cmem.served.router.by_content and [cmem.served.router.routers[k].name for k in cmem.served.router.nearest(
        [tok(q)["input_ids"] for q in ("When does the ferry to Varn island leave", "Who built the lighthouse")])] \
        == ["v0002", "v0001"]
    # past max_stack a round continues the newest adapter (with replay)
    cmem.learn(text="The Varn lighthouse keeper owns a grey cat called Moss.", source="cat")
    third = cmem.consolidate(recipe=replace(FAST, max_stack=2), floors=OPEN)
    v3 = reg.get("v0003")
    assert third.training["lr"] == FAST.lr * FAST.later_lr_scale and weights.read_bytes() == before
    assert v3.manifest["stack"] == ["v0001"] and v3.manifest["parent"] == "v0002"
    assert reg.rollback().name == "v0002"
    # a broken adapter breaks the versions stacked on it; rollback skips them all
    weights.unlink()
    with pytest.raises(StoreError, match="v0002 is broken: adapter v0001 beneath it is broken.*rollback"):
        reg.current()
    assert reg.versions() == [] and reg.rollback() is None


def test_good_exemplars_are_distilled_once_and_bad_ones_never(cmem):
    from memory_llm.store.prompts import Exemplar

    run(cmem)
    good, bad = cmem.store.add_exemplars([Exemplar(None, "default", "Who tends the Varn light?", "Keeper Aslak Rund."),
                                          Exemplar(None, "default", "Is Varn cold?", "No idea.", rating=-1)])
    dry = run(cmem, dry_run=True)
    assert dry.status == "dry-run" and dry.memories == 0 and dry.exemplars == 1
    summary = run(cmem)  # no new memory, but a new good exemplar: a round of its own
    assert summary.status == "promoted" and summary.exemplars == 1 and summary.items == 1
    assert cmem.adapters.get(summary.version).manifest["exemplars"] == [good]
    assert run(cmem).status == "nothing-new"
    full = run(cmem, full=True)  # a rebuild keeps distilling it, with every memory
    assert full.exemplars == 1 and cmem.adapters.get(full.version).manifest["exemplars"] == [good]
    assert bad not in cmem.adapters.get(full.version).manifest["exemplars"]


def test_forgetting_retrains_only_the_round_that_held_the_memory(cmem):
    run(cmem)
    cmem.learn(text="Salt from the Varn flats is sold in blue paper bags.", source="salt")
    second = run(cmem)  # a second round, stacked beside the first
    assert cmem.adapters.get(second.version).manifest["stack"] == ["v0001"]
    gone = cmem.store.memory_ids()[0]  # a memory of the first round
    cmem.forget([gone])
    assert cmem.store.items([gone]) == []  # its training items went with it
    dry = run(cmem, dry_run=True)
    assert "retraining v0001 (stale)" in dry.message
    summary = run(cmem)
    assert not summary.full and summary.status == "promoted" and summary.retrained == ["v0001"]
    manifest = cmem.adapters.get(summary.version).manifest
    assert gone not in manifest["memories"] and gone not in manifest["own_memories"]
    assert manifest["stack"] == ["v0002"]  # the round without stale memories serves on, untouched
    assert set(manifest["own_memories"]) == set(cmem.store.memory_ids()) - set(
        cmem.adapters.get("v0002").own_memories)


def test_a_superseded_memory_is_retrained_with_what_replaced_it(cmem):
    run(cmem)
    old = cmem.store.memory_ids()[0]
    report = cmem.learn(text="The lighthouse of Varn was built in 1822 by the engineer Lisbet Holm.",
                        supersedes=[old])
    new = report.memory_ids[0]
    assert report.superseded[0]["old_id"] == old and report.superseded[0]["new_id"] == new
    summary = run(cmem)
    manifest = cmem.adapters.get(summary.version).manifest
    assert summary.retrained == ["v0001"] and manifest["stack"] == []
    assert new in manifest["own_memories"] and old not in manifest["memories"]
    assert summary.metrics["stale_probes"] > 0 and "stale_answers" in summary.metrics
    assert any("questions about what went stale" in r for r in summary.reasons)


def test_items_of_a_partly_superseded_memory_are_made_again_from_its_live_text(mem):
    mem.learn(text="The Varn ferry leaves at 7:40. The ticket office opens at 6:00.", source="ferry")
    run(mem)
    note = mem.store.memory_ids()[0]
    from memory_llm.store.supersessions import Supersession

    mem.store.supersede("default", [Supersession(note, None, "user", "The Varn ferry leaves at 7:40.")])
    assert mem.store.get([note])[note].live_text == "The ticket office opens at 6:00."
    summary = run(mem)
    assert summary.status == "promoted" and summary.retrained == ["v0001"]
    items = mem.store.items([note])
    assert items and not any("7:40" in i.prompt or "7:40" in i.answer for i in items)


def test_the_gate_rejects_a_candidate_that_still_answers_an_old_value():
    metrics = {"reliability": 0.9, "locality": 0.99, "stale_answers": 1, "stale_probes": 4}
    ok, reasons = decide(metrics, None, Floors())
    assert not ok and any(r.startswith("failed: old values answered 1 of 4") for r in reasons)
    assert decide({**metrics, "stale_answers": 0}, None, Floors())[0]


def test_rejected_candidate_keeps_current(cmem):
    run(cmem)
    cmem.learn(text="Salt from the Varn flats is sold in blue paper bags.", source="salt")
    strict = Floors(reliability=1.01)
    summary = run(cmem, floors=strict)
    assert summary.status == "rejected" and summary.exit_code == 3
    assert any(r.startswith("failed: reliability") for r in summary.reasons)
    assert cmem.adapters.current_name() == "v0001" and [v.name for v in cmem.adapters.versions()] == ["v0001"]


def test_lock_allows_one_consolidation(cmem):
    with consolidation_lock(cmem.settings.home):
        with pytest.raises(ConsolidationLocked):
            run(cmem)
    assert run(cmem).status == "promoted"


def test_killed_run_leaves_current_intact_and_next_run_succeeds(cmem, monkeypatch):
    run(cmem)
    cmem.learn(text="The Varn museum keeps a whale skeleton nine metres long.", source="museum")
    import memory_llm.consolidate.steps as stepsmod

    def boom(*a, **k):
        raise KeyboardInterrupt  # as if killed during training

    monkeypatch.setattr(stepsmod, "train", boom)
    with pytest.raises(KeyboardInterrupt):
        run(cmem)
    reg = cmem.adapters
    assert reg.current_name() == "v0001" and reg.current() is not None
    monkeypatch.undo()
    # a staging leftover (as after kill -9) is cleaned; the stored items are reused
    (reg.root / ".candidate-leftover").mkdir()
    summary = run(cmem)
    assert summary.status == "promoted" and summary.version == "v0002"
    assert not list(reg.root.glob(".candidate-*"))


def test_time_budget_stops_cleanly(cmem):
    summary = run(cmem, max_minutes=1e-6)
    assert summary.status == "out-of-time" and summary.exit_code == 4
    assert cmem.adapters.current_name() is None


def test_corrupted_adapter_is_a_clear_error_and_rollback_works(cmem):
    run(cmem)
    cmem.learn(text="The Varn bakery opens at five and sells rye bread.", source="bakery")
    run(cmem)
    reg = cmem.adapters
    assert reg.current_name() == "v0002"
    (reg.root / "v0002" / "adapter_model.safetensors").unlink()
    fresh = MemoryLLM(cmem.settings.home, generator=cmem.new_generator(), embedder=cmem.embedder)
    with pytest.raises(StoreError, match="v0002 is broken.*rollback"):
        fresh.ask("bread?", max_new_tokens=2)
    assert reg.rollback().name == "v0001"
    fresh2 = MemoryLLM(cmem.settings.home, generator=cmem.new_generator(), embedder=cmem.embedder)
    assert fresh2.ask("bread?", max_new_tokens=2).adapter == "v0001"
    (reg.root / "v0001" / "router.json").write_text("{not json")  # a broken router breaks the version too
    assert any("v0001" in p and "router.json" in p for p in reg.problems())
    with pytest.raises(StoreError, match="v0001 is broken: router.json"):
        MemoryLLM(cmem.settings.home, generator=cmem.new_generator(), embedder=cmem.embedder).ask("x", max_new_tokens=2)
    (reg.root / "v0001" / "router.json").unlink()
    (reg.root / "v0001" / "keys.npy").write_bytes(b"\x93NUMPY garbage")  # so does a broken key file
    assert any("v0001" in p and "keys.npy" in p for p in reg.problems())


def test_adapter_for_another_base_is_refused(cmem):
    run(cmem)
    path = cmem.adapters.root / "v0001" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["base_model"] = "some-other/model"
    path.write_text(json.dumps(manifest))
    fresh = MemoryLLM(cmem.settings.home, generator=cmem.new_generator(), embedder=cmem.embedder)
    with pytest.raises(ModelError, match="made for base model 'some-other/model'"):
        fresh.ask("x", max_new_tokens=2)


def test_closed_and_hybrid_eval_need_and_use_the_adapter(cmem, tmp_path, monkeypatch):
    path = tmp_path / "e.jsonl"
    path.write_text('{"id": "a", "kind": "cloze", "input": "The lighthouse of Varn was built in",'
                    ' "answers": [["1820"]], "tags": ["mem"]}\n')
    with pytest.raises(InputError, match="needs a consolidated adapter"):
        cmem.evaluate(path, "closed")
    run(cmem)
    cmem.reload_adapter()
    outputs = {}
    for mode in ("base", "rag", "closed", "hybrid"):
        r = cmem.evaluate(path, mode)
        assert r["n"] == 1 and r["adapter"] == ("v0001" if mode in ("closed", "hybrid") else None)
        outputs[mode] = r["probes"][0]["output"]
    assert outputs["closed"] != outputs["rag"] and outputs["hybrid"] in (outputs["closed"], outputs["rag"])
    import memory_llm.evaluate as evaluate

    for margin, expected in ((float("inf"), "rag"), (float("-inf"), "closed")):  # the choice follows confidence
        monkeypatch.setattr(evaluate, "HYBRID_MARGIN", margin)
        assert cmem.evaluate(path, "hybrid")["probes"][0]["output"] == outputs[expected]


def test_confidence_is_the_mean_log_probability_of_the_first_tokens(tiny_generator):
    import torch

    from memory_llm.generate import CONFIDENCE_TOKENS

    prompts = [[5, 9, 12, 7], [4, 8, 15, 16, 23, 42]]
    pairs = tiny_generator.generate_batch(prompts, 6, return_ids=True, confidence=True)
    assert [ids for ids, _ in pairs] == tiny_generator.generate_batch(prompts, 6, return_ids=True)
    for p, (ids, sure) in zip(prompts, pairs):
        head = ids[:CONFIDENCE_TOKENS]
        with torch.inference_mode():
            logits = tiny_generator.model(input_ids=torch.tensor([p + head])).logits[0, len(p) - 1:-1]
        want = torch.log_softmax(logits.float(), -1)[range(len(head)), head].mean().item()
        assert head and abs(sure - want) < 1e-4


def test_position_logits_match_the_full_forward(tiny_generator):
    import torch

    from memory_llm.consolidate.examples import position_logits

    model = tiny_generator.model
    seqs = [[5, 9, 12, 7, 3, 22], [4, 8, 15]]
    positions = [[2, 3, 4], [0, 1]]
    got = position_logits(model, seqs, positions)
    with torch.inference_mode():
        for s, pos, g in zip(seqs, positions, got):
            full = model(input_ids=torch.tensor([s])).logits[0, pos]
            assert g.shape == full.shape and torch.allclose(g, full, atol=1e-4)


def test_logits_by_kind_match_one_padded_forward(tiny_generator):
    import torch

    from memory_llm.consolidate.examples import Example, position_logits
    from memory_llm.consolidate.train import logits_by_kind

    seqs = [[5, 9, 12, 7], [4, 8, 15, 9, 30, 31, 40, 41, 42, 7, 6], [11, 12, 13, 14, 15], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
    positions = [[1, 2], [5, 6, 7, 8, 9], [2, 3], [4, 5, 6, 7]]
    kinds = ["item", "locality", "item", "locality"]
    batch = [Example(s, p, None, None, k) for s, p, k in zip(seqs, positions, kinds)]
    with torch.inference_mode():
        split, joint = logits_by_kind(tiny_generator.model, batch), position_logits(tiny_generator.model, seqs, positions)
    assert [g.shape for g in split] == [j.shape for j in joint]
    assert all(torch.allclose(g, j, atol=1e-4) for g, j in zip(split, joint))


def test_killed_training_resumes_from_its_checkpoint_to_the_same_weights(tiny_generator, tmp_path):
    import copy

    import torch

    from memory_llm.consolidate.examples import Example
    from memory_llm.consolidate.train import Checkpoint, attach_lora, train

    g = torch.Generator().manual_seed(0)
    examples = []
    for n in range(12):
        ids = torch.randint(3, 60, (8 + n % 4,), generator=g).tolist()
        top = torch.randint(3, 60, (4, 5), generator=g)
        examples.append(Example(ids, [2, 3, 4, 5], top, torch.full((4, 5), 0.2), "item"))
    recipe = Recipe(epochs=2, batch_size=4, rank=4, alpha=8, lr=1e-2, min_steps=0)

    def fresh():
        torch.manual_seed(1)
        return attach_lora(copy.deepcopy(tiny_generator.model), recipe)

    whole = fresh()
    train(whole, examples, recipe)

    ckpt = Checkpoint(tmp_path / ".checkpoint", key="plan-a", every=0)
    killed = fresh()

    def kill_at_4(step, total, _):
        if step == 4:
            raise KeyboardInterrupt  # as a kill after step 4 (checkpoints were written after each step)
    with pytest.raises(KeyboardInterrupt):
        train(killed, examples, recipe, checkpoint=ckpt, progress=kill_at_4)
    assert Checkpoint(tmp_path / ".checkpoint", key="plan-b").restore(fresh(), *_opt_sched(fresh())) == 0

    resumed = fresh()
    stats = train(resumed, examples, recipe, checkpoint=ckpt)
    assert stats["resumed_at"] == 3 and stats["steps"] == stats["planned_steps"] == 6
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        if a.requires_grad:
            assert torch.allclose(a, b, atol=1e-6), name


def _opt_sched(model):
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def test_locality_of_the_base_model_against_itself_is_perfect(tiny_generator):
    import contextlib

    from memory_llm.consolidate.gate import locality

    prompts = ["Name a colour.", "What is two plus two?", "Say hello.", "Describe rain in a sentence."]
    assert locality(tiny_generator, prompts, contextlib.nullcontext, tokens=12, strict_tokens=8) == \
        {"agreement": 1.0, "strict": 1.0}


def test_null_space_constraint_keeps_generic_outputs_while_items_still_move(tiny_generator):
    import copy

    import torch

    from memory_llm.consolidate.examples import Example
    from memory_llm.consolidate.train import attach_lora, null_space_constraint, train

    g = torch.Generator().manual_seed(0)
    generic = [torch.randint(3, 9, (12,), generator=g).tolist() for _ in range(24)]  # inputs in a small subspace
    items = []
    for _ in range(8):  # "facts": other tokens than the generic text, with a fixed target per position
        ids = torch.randint(40, 80, (10,), generator=g).tolist()
        items.append(Example(ids, [4, 5, 6, 7], torch.full((4, 1), 7), torch.ones((4, 1)), "item"))
    recipe = Recipe(epochs=6, batch_size=4, rank=4, alpha=8, lr=2e-2, locality_per_batch=0)

    def trained(energy):
        torch.manual_seed(1)
        model = attach_lora(copy.deepcopy(tiny_generator.model), recipe)
        constrain = null_space_constraint(model, generic, energy) if energy else None
        train(model, items, recipe, constrain=constrain)
        return model

    def lora_response(model, seqs):  # ‖A·x‖ summed over every LoRA layer, x its base-model inputs on seqs
        from peft.tuners.lora import LoraLayer

        total, hooks = [0.0], []
        for m in model.modules():
            if isinstance(m, LoraLayer):
                hooks.append(m.register_forward_pre_hook(
                    lambda mod, args: total.__setitem__(0, total[0] + mod.lora_A["default"](args[0]).norm().item())))
        with torch.inference_mode(), model.disable_adapter():
            model(input_ids=torch.tensor(seqs))
        for h in hooks:
            h.remove()
        return total[0]

    free, held = trained(0), trained(0.99)
    generic_in = lora_response(held, generic), lora_response(free, generic)
    assert generic_in[0] < 0.4 * generic_in[1], generic_in  # generic inputs reach the update much less
    items_in = lora_response(held, [e.ids for e in items]), lora_response(free, [e.ids for e in items])
    assert items_in[0] > 0.3 * items_in[1], items_in  # the facts' inputs still do
    with pytest.raises(ValueError):
        null_space_constraint(held, generic, 1.0)


def _adapter_trained_off_generic(tiny_generator):
    """A tiny LoRA trained on 8 items under the null-space constraint of 24 generic prompts: (peft model,
    generic prompts, items). On a fresh copy of the tiny model: the shared one may carry an adapter from the
    consolidation tests."""
    import torch
    from conftest import tiny_model

    from memory_llm.consolidate.examples import Example
    from memory_llm.consolidate.train import attach_lora, null_space_constraint, train

    g = torch.Generator().manual_seed(0)
    generic = [torch.randint(3, 9, (12,), generator=g).tolist() for _ in range(24)]
    items = [Example(torch.randint(40, 80, (10,), generator=g).tolist(), [4, 5, 6, 7], torch.full((4, 1), 7),
                     torch.ones((4, 1)), "item") for _ in range(8)]
    base = tiny_model(tiny_generator.tokenizer)
    torch.manual_seed(1)
    model = attach_lora(base, Recipe(rank=4, alpha=8))
    train(model, items, Recipe(epochs=6, batch_size=4, rank=4, alpha=8, lr=2e-2, locality_per_batch=0),
          constrain=null_space_constraint(model, generic, 0.99))
    return model, generic, items


def test_router_gives_generic_prompts_the_base_model_and_facts_the_adapter(tiny_generator, tmp_path):
    import torch

    from memory_llm.adapters.routing import Router, load_router
    from memory_llm.consolidate.calibrate import calibrate

    model, generic, items = _adapter_trained_off_generic(tiny_generator)
    router = Router(model)
    generic_scores, item_scores = router.scores(generic[:12]), router.scores([e.ids for e in items])
    # a prompt's score does not depend on the padding side (training pads on the right, generation on the left)
    seq, pad = items[0].ids, [1] * len(items[0].ids)
    right, left = router.score_rows(torch.tensor([seq + [0, 0], [0, 0] + seq]),
                                     torch.tensor([pad + [0, 0], [0, 0] + pad]))
    assert right == pytest.approx(item_scores[0], rel=1e-3) and left == pytest.approx(item_scores[0], rel=1e-3)
    assert max(generic_scores) * 2 < min(item_scores), (generic_scores, item_scores)
    router.threshold = calibrate(router.scores(generic[12:]), 2.0)
    assert max(generic_scores) < router.threshold <= min(item_scores)

    def logits(seqs):
        with torch.inference_mode():
            return model(input_ids=torch.tensor(seqs)).logits
    with model.disable_adapter():
        base = logits([generic[0], items[0].ids[:10] + [3, 3]])
    adapted = logits([generic[0], items[0].ids[:10] + [3, 3]])
    router.install()
    routed = logits([generic[0], items[0].ids[:10] + [3, 3]])  # one batch, one row of each kind
    assert torch.equal(routed[0], base[0]) and not torch.allclose(adapted[0], base[0])
    assert torch.allclose(routed[1], adapted[1], atol=1e-5) and not torch.allclose(routed[1], base[1])
    assert router.last_on == [False, True]
    router.veto = items[0].ids[2:4]  # a prompt holding the veto sequence (the sources marker) gets the base
    vetoed = logits([generic[0], items[0].ids[:10] + [3, 3]])
    assert torch.equal(vetoed[1], base[1]) and router.last_on == [False, False]
    router.veto = []
    # a prompt holding the `after` sequence (the sources marker) is scored on what follows it (the question): a
    # memory question after generic "sources" gets the adapter. (A generic question after memory text may score
    # high too: its tokens carry the sources' context; the tiny adapter routes it on, so it is not asserted.)
    marker = [5, 6, 5]
    rows = [generic[1][:8] + marker + items[0].ids[:10], generic[2][:8] + marker + generic[3][:10]]
    assert all(len(r) == 21 for r in rows)
    whole = router.scores(rows)
    router.after = marker
    assert router.own_tokens([1, 2, 5, 6, 5, 8, 9], None) == (slice(5, 7), False)
    assert router.own_tokens([1, 2, 8, 9], None) == (slice(0, 4), False)
    routed = logits(rows)
    assert router.last_on[0] and router.last != whole  # scored on the question, not the whole prompt
    with model.disable_adapter():
        plain = logits(rows)
    assert not torch.allclose(routed[0], plain[0])
    router.after = []
    # one threshold per form: a prompt starting with the chat head is held to `threshold`, raw text to the other
    row = items[0].ids[:10]
    router.head, router.threshold, router.raw_threshold = [3, 3], float("inf"), router.threshold
    logits([[3, 3] + row, [9, 9] + row])
    assert router.last_chat == [True, False] and router.last_on == [False, True]
    router.head, router.threshold, router.raw_threshold = [], router.raw_threshold, None
    max_scores = Router(model, pool="max").scores([e.ids for e in items])
    assert all(m >= s for m, s in zip(max_scores, item_scores)) and max_scores != item_scores  # default: mean
    router.save(tmp_path)
    router.remove()
    assert torch.allclose(logits([generic[0]])[0], adapted[0], atol=1e-5)
    assert load_router(model, tmp_path / "none") is None
    loaded = load_router(model, tmp_path)
    assert loaded.threshold == router.threshold and torch.equal(logits([generic[0]])[0], base[0])
    assert loaded.pool == "mean" and loaded.raw_threshold is None
    loaded.remove()
    (tmp_path / "router.json").write_text("{broken")
    with pytest.raises(StoreError, match="router.json"):
        load_router(model, tmp_path)


def _stacked_twice(tiny_generator, path, tails):
    """An adapter trained off generic prompts, loaded twice on its base as "a" and "b" (both active), with rows
    (a generic prompt, then a trained item's ids + each tail), a calibrated threshold, a logits function and the
    rows' logits with the lone adapter and with none."""
    from types import SimpleNamespace

    import torch
    from peft import PeftModel

    from memory_llm.adapters.routing import Router
    from memory_llm.consolidate.calibrate import calibrate

    model, generic, items = _adapter_trained_off_generic(tiny_generator)
    model.save_pretrained(path)
    rows = [generic[0]] + [items[0].ids + tail for tail in tails]

    def logits(m):
        with torch.inference_mode():
            return m(input_ids=torch.tensor(rows)).logits
    adapted = logits(model)
    with model.disable_adapter():
        base = logits(model)
    t = SimpleNamespace(rows=rows, items=items, logits=logits, adapted=adapted, base=base,
                        alone=Router(model).scores([rows[1]])[0],
                        threshold=calibrate(Router(model).scores(generic[12:]), 2.0))
    t.stacked = PeftModel.from_pretrained(model.unload(), str(path), adapter_name="a")
    t.stacked.load_adapter(str(path), adapter_name="b")
    t.stacked.base_model.set_adapter(["a", "b"], inference_mode=True)
    return t


def test_stacked_adapters_each_score_alone_and_a_prompt_gets_the_one_it_excites_most(tiny_generator, tmp_path):
    import torch

    from memory_llm.adapters.routing import Router
    from memory_llm.adapters.stack import RouterStack

    t = _stacked_twice(tiny_generator, tmp_path, [[3, 3]])
    items, logits, adapted, base, alone, threshold = t.items, t.logits, t.adapted, t.base, t.alone, t.threshold
    # the same adapter twice, "b" with a higher threshold: on together they would double the update
    stacked = t.stacked
    assert not torch.allclose(logits(stacked)[1], adapted[1], atol=1e-3)
    a, b = Router(stacked, threshold, name="a"), Router(stacked, threshold * 1.5, name="b")
    stack = RouterStack([b, a]).install()
    out = logits(stacked)
    assert stack.last_on == [False, True] and a.last_on == [False, True] and b.last_on == [False, False]
    assert a.last[1] == pytest.approx(alone, rel=1e-4) == b.last[1]  # each scored with the other off
    assert torch.equal(out[0], base[0]) and torch.allclose(out[1], adapted[1], atol=1e-5)
    stack.veto = items[0].ids[2:4]
    assert torch.equal(logits(stacked)[1], base[1]) and stack.last_on == [False, False]
    stack.remove()
    assert not torch.allclose(logits(stacked)[1], adapted[1], atol=1e-3)  # unrouted: both act


def test_stacked_adapters_are_chosen_by_the_nearest_key_and_act_only_where_their_router_lets_them(
        tiny_generator, tmp_path):
    import numpy as np
    import torch

    from memory_llm.adapters.routing import Router, contains
    from memory_llm.adapters.stack import RouterStack

    t = _stacked_twice(tiny_generator, tmp_path, [[3, 3], [4, 4]])
    rows, logits, adapted, base, threshold, stacked = t.rows, t.logits, t.adapted, t.base, t.threshold, t.stacked
    a, b = Router(stacked, threshold, name="a"), Router(stacked, threshold, name="b")
    # equal thresholds and scores: by activation the first router would take every row; by content the rows
    # ending in 4 4 embed near b's key
    embedded = []

    def embed(token_rows, head):
        embedded.extend(token_rows)
        return np.array([[0.0, 2.0] if contains(r, [4, 4]) else [3.0, 0.0] for r in token_rows])
    stack = RouterStack([a, b], keys=[np.array([[1.0, 0.1]]), np.array([[0.1, 1.0], [-1.0, 0.0]])],
                        embed=embed).install()
    assert stack.by_content and stack.nearest([rows[2], rows[1]]) == [1, 0]
    out = logits(stacked)
    assert embedded[-3:] == rows  # the rows' own tokens (no chat head here)
    assert stack.last_adapter == [None, "a", "b"] and stack.last_on == [False, True, True]
    assert a.last_on == [False, True, False] and b.last_on == [False, False, True]
    assert torch.equal(out[0], base[0])  # generic: nearest to a, below a's threshold → the base model
    assert torch.allclose(out[1], adapted[1], atol=1e-5) and torch.allclose(out[2], adapted[2], atol=1e-5)
    # a row as similar to its adapter's key as the router's `similarity` gets it whatever its score (row 0 is
    # nearest b's key, at 0.995)
    b.similarity = 0.99
    out = logits(stacked)
    assert stack.last_adapter == ["b", "a", "b"] and torch.allclose(out[0], adapted[0], atol=1e-5)
    b.similarity = 0.999
    logits(stacked)
    assert stack.last_adapter == [None, "a", "b"]
    b.similarity = None
    stack.remove()
    # an adapter without keys (made before them): every adapter is chosen by activation
    old = RouterStack([a, b], keys=[np.array([[1.0, 0.0]]), None], embed=embed).install()
    logits(stacked)
    assert not old.by_content and old.last_adapter == [None, "a", "a"]
    old.remove()
    with pytest.raises(ValueError, match="one key set per router"):
        RouterStack([a, b], keys=[np.array([[1.0, 0.0]])], embed=embed)


def test_a_stale_key_keeps_its_adapter_off_questions_about_it(tiny_generator, tmp_path):
    """A key whose memory is no longer true blocks its adapter for the questions nearest it (or at least
    stale_bar similar to it); another adapter may still take them, and with every key stale none does."""
    import numpy as np

    from memory_llm.adapters.routing import Router, contains
    from memory_llm.adapters.stack import RouterStack

    t = _stacked_twice(tiny_generator, tmp_path, [[3, 3], [4, 4]])
    a, b = Router(t.stacked, t.threshold, name="a"), Router(t.stacked, t.threshold, name="b")

    def embed(token_rows, head):
        return np.array([[0.0, 2.0] if contains(r, [4, 4]) else [3.0, 0.0] for r in token_rows])
    stack = RouterStack([a, b], keys=[np.array([[1.0, 0.1]]), np.array([[0.1, 1.0], [-1.0, 0.0]])], embed=embed,
                        owners=[np.array([11]), np.array([21, 22])]).install()
    t.logits(t.stacked)
    assert stack.last_adapter == [None, "a", "b"] and not stack.blocks([0.0, 1.0])
    asked = []
    stack.update_stale(lambda ids: asked.append(set(ids)) or {21}, bar=0.5)  # memory 21 was superseded
    assert asked == [{11, 21, 22}] and [None if m is None else m.tolist() for m in stack.stale] == [None,
                                                                                                  [True, False]]
    t.logits(t.stacked)
    assert stack.last_adapter[2] != "b" and stack.blocks([0.0, 1.0]) and not stack.blocks([1.0, 0.0])
    stack.update_stale(lambda ids: {11, 21, 22}, bar=0.5)
    t.logits(t.stacked)
    assert stack.last_adapter == [None, None, None] and stack.last_on == [False, False, False]
    stack.update_stale(lambda ids: set(), bar=0.5)  # restored: the adapters serve again
    t.logits(t.stacked)
    assert stack.last_adapter == [None, "a", "b"]
    stack.remove()
    old = RouterStack([a, b], keys=[np.array([[1.0, 0.1]]), np.array([[0.1, 1.0], [-1.0, 0.0]])], embed=embed
                      ).install()  # keys without their memories (made before they were kept): b holds 21
    b.holds = [21, 22]
    old.update_stale(lambda ids: {21} & ids, bar=0.5)
    t.logits(t.stacked)
    assert "b" not in old.last_adapter  # the whole adapter is kept off every question
    old.remove()


def test_a_lone_adapter_without_keys_stops_acting_when_a_memory_it_holds_goes_stale(tiny_generator, tmp_path):
    from memory_llm.adapters.routing import Router

    t = _stacked_twice(tiny_generator, tmp_path, [[3, 3]])
    router = Router(t.stacked, t.threshold, name="a").install()
    router.holds = [5, 6]
    t.logits(t.stacked)
    on = list(router.last_on)
    router.update_stale(lambda ids: {6})
    t.logits(t.stacked)
    assert any(on) and router.last_on == [False] * len(on) and router.blocks([1.0])
    router.update_stale(lambda ids: set())
    t.logits(t.stacked)
    assert router.last_on == on
    router.remove()


def test_prompt_embedder_embeds_a_chat_question_as_the_question(tiny_generator):
    from memory_llm.adapters.routing import common_prefix
    from memory_llm.adapters.stack import prompt_embedder
    from memory_llm.generate import build_messages

    seen = []
    run = prompt_embedder(tiny_generator.tokenizer, lambda texts: seen.extend(texts) or texts)
    chats = [tiny_generator.chat_ids(build_messages(q))[0].tolist()
             for q in ("Who founded Pelloria?", "Is the ferry late?")]
    head = common_prefix(chats)  # the chat template's shared head, as a router skips it
    later = tiny_generator.chat_ids(build_messages("Is the ferry late?") + [
        {"role": "assistant", "content": "No."}, {"role": "user", "content": "When does it leave?"}])[0].tolist()
    run([row[len(head):] for row in chats + [later]] + [tiny_generator.tokenizer("Mars was")["input_ids"]], head)
    assert seen == ["Who founded Pelloria?", "Is the ferry late?", "When does it leave?", "Mars was"]


def test_adapter_keys_round_trip_and_a_broken_key_file_is_refused(tmp_path):
    import numpy as np

    from memory_llm.adapters.keys import read_keys, save_keys

    assert read_keys(tmp_path) is None
    save_keys(tmp_path, [[3.0, 4.0], [0.0, 2.0]])
    assert np.allclose(read_keys(tmp_path), [[0.6, 0.8], [0.0, 1.0]], atol=1e-3)
    (tmp_path / "keys.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="keys.npy unreadable"):
        read_keys(tmp_path)


def test_router_settings_read_as_they_were_made(tmp_path):
    from memory_llm.adapters.routing import read_router

    path = tmp_path / "router.json"
    path.write_text(json.dumps({"threshold": 0.5, "band": [0.4, 0.6], "head": [1, 2]}))  # before pooling choices
    assert read_router(tmp_path) == {"threshold": 0.5, "band": [0.4, 0.6], "head": [1, 2], "pool": "max",
                                     "raw_threshold": None, "similarity": None}
    path.write_text(json.dumps({"threshold": 0.5, "raw_threshold": 0.25, "pool": "mean", "similarity": 0.6}))
    assert read_router(tmp_path)["raw_threshold"] == 0.25 and read_router(tmp_path)["pool"] == "mean"
    assert read_router(tmp_path)["similarity"] == 0.6
    for bad in ({"threshold": 0.5, "pool": "median"}, {"threshold": 0.5, "raw_threshold": "nan"},
                {"threshold": 0.5, "similarity": 2.0}):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="router.json"):
            read_router(tmp_path)


def test_loss_curve_averages_each_tenth_of_the_plan():
    from memory_llm.consolidate.train import loss_curve

    assert loss_curve([4.0, 2.0, 3.0, 1.0], 0, 4, points=2) == [3.0, 2.0]
    assert loss_curve([3.0, 1.0], 2, 4, points=2) == [2.0]  # resumed at step 2: the second half only
    assert loss_curve([5.0] * 25, 0, 25) == [5.0] * 9  # 25 steps in tenths of 3 steps: 9 bins
    assert loss_curve([], 0, 10) == []


def test_sources_marker_is_found_in_prompts_with_sources_only(tiny_generator):
    from memory_llm.adapters.routing import contains
    from memory_llm.generate import build_messages, sources_marker

    marker = sources_marker(tiny_generator.tokenizer)
    with_sources = tiny_generator.chat_ids(build_messages("Who founded Pelloria?", ["Pelloria was founded in 1642."]))
    closed = tiny_generator.chat_ids(build_messages("Who founded Pelloria?"))
    assert marker and contains(with_sources[0].tolist(), marker)
    assert not contains(closed[0].tolist(), marker)


def test_a_small_round_trains_at_least_min_steps_and_a_large_one_its_epochs():
    from types import SimpleNamespace

    from memory_llm.consolidate.train import plan_batches

    def examples(n_items, n_loc=4):
        return [SimpleNamespace(ids=[1] * (5 + i % 3), kind="item") for i in range(n_items)] + \
            [SimpleNamespace(ids=[2] * 9, kind="locality") for _ in range(n_loc)]
    recipe = Recipe(epochs=5, batch_size=8, locality_per_batch=2, min_steps=16)
    small = plan_batches(examples(6), recipe)  # one batch of 6 items an epoch: 16 epochs
    assert len(small) == 16 and all(len(b) == 8 for b in small)
    assert sorted(i for b in small for i in b if i < 6) == sorted(list(range(6)) * 16)
    large = plan_batches(examples(60), recipe)  # 10 batches an epoch: the recipe's 5 epochs
    assert len(large) == 50 and sum(1 for b in large for i in b if i < 60) == 300
    assert plan_batches(examples(0), recipe) == []


def _fact_examples(n: int = 8):
    import torch

    from memory_llm.consolidate.examples import Example

    g = torch.Generator().manual_seed(0)
    return [Example(torch.randint(40, 80, (10,), generator=g).tolist(), [4, 5, 6, 7], torch.full((4, 1), 7),
                    torch.ones((4, 1)), "item") for _ in range(n)]


def test_training_that_diverges_stops_before_its_update_and_says_so(tiny_generator):
    import copy
    import math

    from memory_llm.consolidate.train import attach_lora, diverging, train

    assert diverging([3.0, float("nan")], 4, 1.5) and not diverging([3.0] * 7 + [9.0], 4, 1.5)
    assert diverging([3.0] * 4 + [5.0] * 4, 4, 1.5) and not diverging([3.0] * 4 + [4.0] * 4, 4, 1.5)
    recipe = Recipe(epochs=8, batch_size=4, rank=4, alpha=8, locality_per_batch=0, min_steps=0)
    stats = {}
    for lr in (2e-2, 1e30):  # a finite rise is hard to provoke in a tiny model (clipped Adam); overflow is not
        model = attach_lora(copy.deepcopy(tiny_generator.model), recipe)
        stats[lr] = train(model, _fact_examples(), recipe, lr=lr)
    assert not stats[2e-2]["diverged"] and stats[2e-2]["steps"] == stats[2e-2]["planned_steps"] == 16
    assert stats[2e-2]["loss_last"] < stats[2e-2]["loss_first"]
    wild = stats[1e30]
    assert wild["diverged"] and wild["steps"] < wild["planned_steps"]
    assert not math.isfinite(wild["loss_curve"][-1]) or wild["loss_curve"][-1] > 1.5 * wild["loss_curve"][0]


def test_a_round_that_keeps_diverging_is_retried_at_half_the_rate_then_rejected(cmem):
    run(cmem)
    cmem.learn(text="The Varn ferry leaves at dawn and returns at dusk.", source="ferry")
    wild = replace(FAST, lr=1e30, later_lr_scale=1.0, diverge_retries=1, epochs=4, min_steps=0)
    summary = cmem.consolidate(recipe=wild, floors=OPEN)
    assert summary.status == "rejected" and summary.exit_code == 3 and "diverged 2 times" in summary.message
    assert summary.training["retries"] == 1 and summary.training["lr"] == 5e29
    assert cmem.adapters.current_name() == "v0001" and [v.name for v in cmem.adapters.versions()] == ["v0001"]
    assert not (cmem.adapters.root / ".checkpoint").exists()


def test_mixed_precision_trains_under_bf16_only_where_the_hardware_computes_it(tiny_generator, monkeypatch):
    import contextlib
    import copy

    import torch

    from memory_llm.consolidate import train as rc

    recipe = Recipe(epochs=8, batch_size=4, rank=4, alpha=8, locality_per_batch=0, min_steps=0)
    model = rc.attach_lora(copy.deepcopy(tiny_generator.model), recipe)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    with rc.training_autocast(model)():  # the matmuls of a step run in bf16, the weights stay fp32
        assert model(torch.tensor([[5, 6, 7]])).logits.dtype == torch.bfloat16
    stats = rc.train(model, _fact_examples(), recipe)
    assert stats["precision"] == "bf16 autocast" and stats["loss_last"] < stats["loss_first"]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    off = rc.train(rc.attach_lora(copy.deepcopy(tiny_generator.model), recipe), _fact_examples(),
                   Recipe(**{**recipe.as_dict(), "mixed_precision": False}))
    assert off["precision"] == "as loaded" and off["loss_last"] < off["loss_first"]
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # a CPU without bf16
    assert rc.training_autocast(model) is contextlib.nullcontext
    assert rc.training_autocast(copy.deepcopy(model).to(torch.bfloat16)) is contextlib.nullcontext  # bf16 already


def test_stale_probes_hold_the_old_values_as_phrases_and_skip_questions_that_name_them(mem):
    from memory_llm.consolidate.select import mentions, phrases, stale_probes
    from memory_llm.store import Item

    old = mem.learn(text="The spare key is under the stone frog by the door.").memory_ids[0]
    new = mem.learn(text="The spare key is in the meter box.", supersedes=[old]).memory_ids[0]
    mem.store.add_items(old, "default", [Item(old, "qa", "Where is the spare key?", "Under the stone frog."),
                                         Item(old, "qa", "Is the key under the stone frog?", "Yes.")])
    mem.store.add_items(new, "default", [Item(new, "qa", "Where do I find the spare key?", "In the meter box.")])
    probes = stale_probes(mem.store, {old})
    assert sorted(it.prompt for it, _ in probes) == ["Where do I find the spare key?", "Where is the spare key?"]
    assert all("stone frog" in olds for _, olds in probes)
    assert phrases("Room 7 is Odile Marchbank's.", ["7", "Odile", "Marchbank"]) == ["7", "Odile Marchbank"]
    assert mentions("it is in room 7", "7") and not mentions("at 17:00", "7") and not mentions("tulip9", "Tulip9")
