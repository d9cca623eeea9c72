"""The steps of a consolidation round, in the order `run.consolidate` calls them: the items each memory needs
(synthesize_items), the teacher's targets (prepare), training (train_round), the candidate's router and keys
(route), its gate metrics (evaluate) and the new version (promote); with the helpers they share."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from memory_llm.adapters import AdapterRegistry, attach, prompt_embedder, save_keys, stack_on
from memory_llm.consolidate.calibrate import fit_router, similarity_bar
from memory_llm.consolidate.distributed import train_in_processes
from memory_llm.consolidate.examples import open_book_items, prepare_items, prepare_locality, prepare_open_book
from memory_llm.consolidate.gate import GENERATE_BATCH, Floors, base_continuations, item_accuracy, locality
from memory_llm.consolidate.recipe import Recipe
from memory_llm.consolidate.select import Selection, mentions, stale_probes
from memory_llm.consolidate.synth import Item, synthesize
from memory_llm.consolidate.train import Checkpoint, attach_lora, null_space_constraint, train

if TYPE_CHECKING:
    from memory_llm.store import Store

logger = logging.getLogger(__name__)

EVAL_SAMPLE = 64
SYNTH_BATCH = 8  # memories synthesized (and committed) together
RESERVE = 120.0  # seconds of a time budget kept for evaluation


def generic_prompts() -> tuple[list[str], list[str]]:
    """(training half, held-out half) of the shipped generic prompts."""
    lines = [l.strip() for l in resources.files("memory_llm.resources").joinpath("generic_prompts.txt")
             .read_text(encoding="utf-8").splitlines() if l.strip()]
    half = len(lines) // 2
    return lines[:half], lines[half:]


def calibration_prompts(recipe: Recipe) -> list[str]:
    """The generic prompts the router is calibrated on: the training half's prompts not used for the locality
    term (trained ones score ~3× lower than unseen ones). With none left (locality_prompts ≥ 60) it falls back to
    the whole training half, and says so."""
    loc_all = generic_prompts()[0]
    rest = loc_all[recipe.locality_prompts:]
    if not rest:
        logger.warning("no generic prompt is left for the router's calibration (locality_prompts=%d): calibrating"
                       " on the locality term's own prompts, which score low, so the threshold is too low",
                       recipe.locality_prompts)
    return rest or loc_all


def needing_items(store: Store, new: list[int]) -> list[int]:
    """The memories without training items, or whose items were made from a text that is no longer theirs (a
    sentence of it was superseded since)."""
    made_from = store.training.synthesized_from(new)
    memories = store.get([i for i in new if i in made_from])
    out = []
    for i in new:
        if i not in made_from:
            out.append(i)
        elif i in memories:
            m = memories[i]
            done = made_from[i] or text_hash(m.text)  # items from before the hash was kept: made from the text
            if done != text_hash(m.live_text):
                out.append(i)
    return out


def text_hash(text: str) -> str:
    """What a memory's training items record of the text they were made from."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def synthesize_items(store: Store, gen, need_items: list[int], recipe: Recipe, deadline, progress) -> int | None:
    """Training items for the memories that need them, from what is still true of each (committed per batch of
    memories; reused by later runs). Returns how many were done when the time budget ran out, else None."""
    memories = store.get(need_items)
    todo = [replace(memories[i], text=memories[i].live_text, stale_sentences=()) for i in need_items if i in memories]
    for b in range(0, len(todo), SYNTH_BATCH):
        if deadline and time.time() > deadline:
            return b
        batch = todo[b:b + SYNTH_BATCH]
        made = synthesize(gen, batch, rewrites=recipe.rewrites, questions=recipe.questions, seed=recipe.seed + b,
                          cuts=recipe.cloze_cuts, answer_words=recipe.cloze_answer_words,
                          held_out_rewrite=recipe.held_out_rewrite, sentence_questions=recipe.sentence_questions,
                          sentence_answers=recipe.sentence_answers)
        for mem in batch:
            store.add_items(mem.id, mem.namespace, made[mem.id], text_hash(mem.text))
        if progress:
            progress("synthesize", min(b + SYNTH_BATCH, len(todo)), len(todo))
    return None


@dataclass
class RoundData:
    """What a round trains and evaluates on (prepare)."""

    train_items: list
    held_new: list
    retention_items: list
    examples: list
    replay: list
    loc: list
    loc_eval: list


def prepare(store: Store, gen, sel: Selection, recipe: Recipe, progress) -> RoundData:
    """The round's items and the teacher's targets: the base model WITH each memory (what is still true of it) in
    context; replay of earlier rounds' items when the round continues an adapter; the locality prompts."""
    items = store.items(sel.new)
    train_items = cap_per_memory([i for i in items if not i.held_out], recipe.max_items_per_memory, recipe.seed)
    train_items += exemplar_items(sel.new_ex)
    old_items = store.items(sel.keep_covered)
    replay_items = [i for i in old_items if not i.held_out] + exemplar_items(sel.old_ex)
    contexts = {i: m.live_text for i, m in store.get(sorted({it.memory_id for it in items + old_items})).items()}
    contexts.update(exemplar_contexts(sel.new_ex + sel.old_ex))
    loc_all, loc_eval = generic_prompts()
    loc_train = loc_all[:recipe.locality_prompts]  # the gate always uses every held-out prompt (60)
    # a fresh adapter beside the current ones (stacked) needs no replay: the earlier adapters stay as they are
    replay_pick = [] if sel.stacked else sample(replay_items, int(len(train_items) * recipe.replay_fraction),
                                                 recipe.seed)
    # retention: what earlier rounds taught (their trained items), preferring items this round does not replay, as
    # the current adapter and the candidate answer them (their held-out items are too hard to show a loss: on 10
    # FK documents both adapters scored 0.08 on them while FK recall fell by a third)
    replayed = {id(i) for i in replay_pick}
    unrehearsed = [i for i in replay_items if id(i) not in replayed]
    examples = prepare_items(gen, train_items, contexts, recipe)
    examples += prepare_open_book(gen, open_book_items(train_items, contexts, recipe.open_book, recipe.seed),
                                  recipe) if recipe.open_book else []
    data = RoundData(train_items, [i for i in items if i.held_out],
                     sample(unrehearsed or replay_items, EVAL_SAMPLE, recipe.seed), examples,
                     prepare_items(gen, replay_pick, contexts, recipe) if replay_pick else [],
                     prepare_locality(gen, loc_train, recipe) if recipe.locality_weight > 0 or recipe.null_space_energy
                     else [], loc_eval)
    if progress:
        progress("prepare", 1, 1)
    return data


def train_round(gen, sel: Selection, data: RoundData, recipe: Recipe, registry: AdapterRegistry, deadline, progress,
           processes: int, launcher: str | None):
    """Train the LoRA student WITHOUT context (checkpointed: a killed or out-of-time run resumes; a diverged run
    starts again at half the learning rate). Returns (stats, the peft model, also set on `gen`)."""
    spread = processes > 1 or bool(launcher)  # training runs in worker processes; the rest stays here
    current = sel.current
    init = str(current.path) if current is not None and not sel.full and not sel.stacked else None
    model = attach_lora(gen.model, recipe, init_from=init)
    gen.model = model
    loc = data.loc
    training_set = data.examples + data.replay + (loc if recipe.locality_weight > 0 else [])
    constrain = null_space_constraint(model, [e.ids for e in loc], recipe.null_space_energy) \
        if recipe.null_space_energy and loc and not spread else None  # workers build their own
    train_deadline = deadline - RESERVE if deadline else None
    lr = recipe.lr * (recipe.later_lr_scale if current is not None else 1.0)
    start_weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    plan = plan_key(recipe, sel.new, sel.keep_covered, init, training_set)
    for retry in range(recipe.diverge_retries + 1):
        checkpoint = Checkpoint(registry.root / ".checkpoint", f"{plan}@lr={lr!r}")
        relay = (lambda s, t, _: progress("train", s, t)) if progress else None
        if spread:
            stats = train_in_processes(model, training_set, recipe, registry.staging(), processes=processes,
                                       launcher=launcher, lr=lr, deadline=train_deadline, checkpoint=checkpoint,
                                       locality=[e.ids for e in loc] if recipe.null_space_energy else None,
                                       progress=relay)
        else:
            stats = train(model, training_set, recipe, deadline=train_deadline, checkpoint=checkpoint,
                          constrain=constrain, progress=relay, lr=lr)
        stats["retries"] = retry
        if not stats["diverged"] or retry == recipe.diverge_retries:
            break
        logger.warning("training diverged at lr %g (mean loss %.2f in the first steps, %.2f at step %d): "
                       "starting again at lr %g", lr, stats["loss_curve"][0], stats["loss_curve"][-1],
                       stats["steps"], lr / 2)
        checkpoint.clear()
        model.load_state_dict(start_weights, strict=False)
        lr /= 2
    if not stats["stopped_early"]:
        checkpoint.clear()
    return stats, model


@dataclass
class Routing:
    """The candidate's own router and routing keys (with each key's memory), or none."""

    router: object = None
    keys: object = None
    owners: list = field(default_factory=list)
    sample: list = field(default_factory=list)  # trained items for reliability and the router's diagnostic


def route(model, gen, sel: Selection, data: RoundData, recipe: Recipe, embed) -> Routing:
    """Fit the candidate's router (activation threshold, similarity bar over its keys) and serve the earlier
    rounds' adapters beside it, each with its router, as a promoted version would."""
    picked = sample(data.train_items, EVAL_SAMPLE, recipe.seed)
    router = fit_router(model, gen, calibration_prompts(recipe), picked, recipe.route_margin, recipe.route_band,
                        recipe.route_pool, recipe.route_per_form) if recipe.route_margin else None
    keys = embed([it.prompt for it in data.train_items]) if router is not None else None
    owners = [it.memory_id for it in data.train_items]
    if router is not None:
        router.holds = [*sel.new, *(-e.id for e in sel.new_ex)]
        if recipe.route_similarity:  # questions near a trained prompt pass too
            router.similarity = similarity_bar(keys, embed(generic_prompts()[0]), recipe.route_similarity)
    if sel.below or router is not None and router.similarity is not None:
        stack_on(model, router, sel.below, keys=keys, embed=prompt_embedder(gen.tokenizer, embed), owners=owners)
    return Routing(router, keys, owners, picked)


def evaluate(store: Store, gen, model, sel: Selection, data: RoundData, routing: Routing, recipe: Recipe,
              new_generator, embed, progress) -> tuple[dict, dict | None]:
    """The candidate's gate metrics (reliability, generalization, retention, locality, and the old values it
    still answers about what went stale), and the current adapter's on the same retention items and prompts."""
    picked = routing.sample
    metrics = {
        "reliability": item_accuracy(gen, picked),
        "generalization": item_accuracy(gen, sample(data.held_new, EVAL_SAMPLE, recipe.seed)),
        "retention": item_accuracy(gen, data.retention_items),
    }
    with model.disable_adapter():
        metrics["base_reliability"] = item_accuracy(gen, picked)
    loc_base = base_continuations(gen, data.loc_eval, model.disable_adapter)  # serves the current adapter's too
    metrics.update({f"locality_{k}" if k != "agreement" else "locality": v
                    for k, v in locality(gen, data.loc_eval, base_ids=loc_base).items()})
    probes = stale_probes(store, sel.stale)
    if probes:
        metrics["stale_probes"] = len(probes)
        metrics["stale_answers"] = stale_answers(gen, probes)
    if progress:
        progress("evaluate", 1, 1)
    before = None
    if sel.current is not None:
        before = current_metrics(new_generator(), sel.current, data.retention_items, data.loc_eval, loc_base, embed)
    return metrics, before


def promote(store: Store, registry: AdapterRegistry, settings, model, sel: Selection, data: RoundData,
             routing: Routing, summary: "Summary", recipe: Recipe, floors: Floors, stats: dict):
    """Write the version, switch `current` to it atomically, then record the ledger."""
    staged = registry.staging()
    model.save_pretrained(staged, selected_adapters=["default"])  # its own adapter; the stack by name
    if routing.router is not None:
        routing.router.save(staged)
        save_keys(staged, routing.keys, routing.owners)
    covered_now = sorted(set(sel.new) | set(sel.keep_covered))
    own = sorted(set(sel.new) | (set() if sel.stacked or sel.current is None or sel.full
                                 else set(sel.current.own_memories) & set(sel.keep_covered)))
    own_ex = sorted(e.id for e in sel.new_ex) if sel.stacked or sel.current is None or sel.full else \
        sorted(e.id for e in sel.new_ex + sel.old_ex)
    router = routing.router
    version = registry.commit(staged, {
        "base_model": settings.model, "recipe": recipe.as_dict(), "metrics": summary.metrics,
        "memories": covered_now, "new_memories": sel.new, "own_memories": own,
        "exemplars": sorted(e.id for e in sel.new_ex + sel.old_ex), "own_exemplars": own_ex,
        "parent": None if sel.full or sel.current is None else sel.current.name,
        "stack": [v.name for v in sel.below], "retrained": sel.retrained, "full": sel.full,
        "floors": floors.as_dict(), "training": stats,
        "router": {"threshold": router.threshold, "raw_threshold": router.raw_threshold, "pool": router.pool,
                   **router.details} if router is not None else None})
    registry.promote(version.name)
    store.record_ledger(version.label, covered_now)
    return version


def stale_answers(gen, probes) -> int:
    """How many stale probes (select.stale_probes: an item, the old values) the generator's current weights
    answer closed-book with an old value."""
    from memory_llm.consolidate.examples import student_prompt_ids

    count = 0
    for i in range(0, len(probes), GENERATE_BATCH):
        batch = probes[i:i + GENERATE_BATCH]
        outs = gen.generate_batch([student_prompt_ids(gen, it) for it, _ in batch], 32)
        count += sum(any(mentions(out, v) for v in old) for (_, old), out in zip(batch, outs))
    return count


def exemplar_items(exemplars) -> list[Item]:
    """A good exemplar trains like a qa item: its question, closed-book, answered as the exemplar answers.
    Its memory_id is the negative exemplar id (exemplars are not memories; see `exemplar_contexts`)."""
    return [Item(-e.id, "qa", e.question, e.answer) for e in exemplars]


def exemplar_contexts(exemplars) -> dict[int, str]:
    """The teacher's context for an exemplar item: the exemplar itself, given as the retrieved context."""
    return {-e.id: f"Question: {e.question}\nAnswer: {e.answer}" for e in exemplars}


def plan_key(recipe: Recipe, new: list[int], keep: list[int], init: str | None, examples: list) -> str:
    """What a training checkpoint belongs to: the same memories, parent, recipe and training sequences (run.py
    adds the learning rate)."""
    h = hashlib.sha256(json.dumps([recipe.as_dict(), new, keep, init and Path(init).name], sort_keys=True).encode())
    for e in examples:
        h.update(json.dumps([e.kind, e.ids, e.positions]).encode())
    return h.hexdigest()


def current_metrics(gen, current, retention_items, loc_eval, loc_base, embed) -> dict:
    """The current adapter on the same retention items and locality prompts (on a separate base copy)."""
    gen.model, _ = attach(gen.model, current, embed=prompt_embedder(gen.tokenizer, embed))
    out = {"retention": item_accuracy(gen, retention_items)}
    out["locality"] = locality(gen, loc_eval, base_ids=loc_base)["agreement"]
    return out


def cap_per_memory(items: list, cap: int, seed: int) -> list:
    """At most `cap` cloze items per memory (a seeded sample; all qa items kept). cap 0 keeps everything."""
    if cap <= 0:
        return items
    by_memory: dict[int, list] = {}
    for it in items:
        if it.kind == "cloze":
            by_memory.setdefault(it.memory_id, []).append(it)
    keep = {id(it) for group in by_memory.values() for it in sample(group, cap, seed)}
    return [it for it in items if it.kind != "cloze" or id(it) in keep]


def sample(items: list, n: int, seed: int) -> list:
    return items if len(items) <= n else random.Random(seed).sample(items, n)


def rounded(d: dict | None) -> dict | None:
    return None if d is None else {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}
