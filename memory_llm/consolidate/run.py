"""`mllm consolidate`, top to bottom: lock → select memories → synthesize items → prepare teacher targets →
train LoRA → evaluate → gate → promote (atomically) → ledger. Nothing here is promoted half-way: a killed
or out-of-time run leaves the current adapter as it was and keeps the items it synthesized."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from memory_llm.adapters import AdapterRegistry, attach, prompt_embedder, save_keys, stack_on
from memory_llm.consolidate.gate import GENERATE_BATCH, Floors, base_continuations, decide, item_accuracy, locality
from memory_llm.consolidate.examples import open_book_items, prepare_items, prepare_locality, prepare_open_book
from memory_llm.consolidate.recipe import Recipe
from memory_llm.consolidate.train import Checkpoint, attach_lora, null_space_constraint, train
from memory_llm.consolidate.calibrate import fit_router, similarity_bar
from memory_llm.consolidate.distributed import launcher_command, train_in_processes
from memory_llm.consolidate.select import Selection, mentions, select, stale_probes
from memory_llm.consolidate.synth import Item, synthesize
from memory_llm.errors import InputError, MemoryLLMError, StoreError

if TYPE_CHECKING:
    import numpy as np

    from memory_llm.config import Settings
    from memory_llm.generate import Generator
    from memory_llm.store import Store

logger = logging.getLogger(__name__)

# exit codes a scheduler understands (also in the README)
EXIT_OK, EXIT_REJECTED, EXIT_OUT_OF_TIME, EXIT_LOCKED = 0, 3, 4, 75
EVAL_SAMPLE = 64
SYNTH_BATCH = 8  # memories synthesized (and committed) together
RESERVE = 120.0  # seconds of a time budget kept for evaluation


class ConsolidationLocked(MemoryLLMError):
    """Another consolidation holds the lock."""


@dataclass
class Summary:
    status: str  # promoted | rejected | nothing-new | dry-run | out-of-time
    message: str
    version: str | None = None
    memories: int = 0
    items: int = 0
    metrics: dict = field(default_factory=dict)
    current_metrics: dict | None = None
    reasons: list = field(default_factory=list)
    training: dict = field(default_factory=dict)
    seconds: float = 0.0
    full: bool = False
    exemplars: int = 0  # prompt-library exemplars distilled in this round
    namespace: str | None = None  # the tenant namespace consolidated on its own (None: the shared adapter)
    retrained: list = field(default_factory=list)  # earlier rounds retrained because their memories went stale

    @property
    def exit_code(self) -> int:
        return {"rejected": EXIT_REJECTED, "out-of-time": EXIT_OUT_OF_TIME}.get(self.status, EXIT_OK)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["exit_code"] = self.exit_code
        d["seconds"] = round(self.seconds, 1)
        return d


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


@contextmanager
def consolidation_lock(home: Path) -> Iterator[None]:
    """One consolidation at a time per home (an OS lock: released when the process dies)."""
    path = Path(home) / "consolidate.lock"
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConsolidationLocked("another consolidation is running in this home; try later") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        fh.close()


def consolidate(store: Store, settings: Settings, *, new_generator: Callable[[], Generator],
                embed: Callable[[list[str]], np.ndarray], max_minutes: float | None = None, dry_run: bool = False,
                full: bool = False, namespace: str | None = None, recipe: Recipe | None = None,
                floors: Floors | None = None, progress: Callable[[str, int, int], None] | None = None,
                processes: int = 1, launcher: str | None = None) -> Summary:
    """Run one consolidation round on a home (see the module docstring). It uses components only.

    Args:
        store: the home's store (memories, training items, exemplars, ledger).
        settings: the home's settings (home, model).
        new_generator: makes a fresh base model (no adapter), kept apart from any serving one.
        embed: texts → unit sentence embeddings (the home's embedder), for routing keys.
        max_minutes, dry_run, full, namespace, recipe, floors, progress: as `mllm consolidate` documents them.
        processes: train in this many local processes (memory_llm.consolidate.distributed); 1: in this one.
        launcher: a command line with {job} that starts the training workers itself (several machines).

    Returns:
        A Summary; when its status is "promoted" the caller's serving model should reload its adapter.
    """
    start = time.time()
    deadline = start + max_minutes * 60 if max_minutes else None
    recipe, floors = recipe or Recipe(), floors or Floors()
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise InputError(f"processes must be a whole number >= 1, not {processes!r}")
    if launcher:
        launcher_command(launcher, Path("job"))  # a malformed line fails now, not after synthesis
    registry = AdapterRegistry(settings.home, namespace)  # a namespace is consolidated on its own (a tenant)
    with consolidation_lock(settings.home):
        registry.discard_staging()
        if registry.current() is not None:
            registry.check_base(registry.current(), settings.model)
        sel = select(store, registry, namespace, recipe.max_stack, full)
        if not sel.new and not sel.new_ex:
            return Summary("nothing-new", "nothing new to consolidate", sel.current.name if sel.current else None,
                           seconds=time.time() - start)
        need_items = _needing_items(store, sel.new)
        if dry_run:
            return Summary("dry-run", f"would consolidate {len(sel.new)} memories ({len(need_items)} need new"
                           f" training items) and {len(sel.new_ex)} exemplars{' as a full rebuild' if sel.full else ''}"
                           + (f", retraining {', '.join(sel.retrained)} (stale)" if sel.retrained else ""), None,
                           memories=len(sel.new), exemplars=len(sel.new_ex), full=sel.full,
                           seconds=time.time() - start)
        gen = new_generator()  # a fresh base model: the serving model keeps its adapter meanwhile
        registry.create()  # a namespace consolidated on its own is a tenant from now on (docs/consolidation.md)
        late = _synthesize(store, gen, need_items, recipe, deadline, progress)
        if late is not None:
            return Summary("out-of-time", f"time budget reached while synthesizing: {late} of {len(need_items)}"
                           " memories done (kept); run again to continue", memories=len(sel.new),
                           seconds=time.time() - start)
        data = _prepare(store, gen, sel, recipe, progress)
        stats, model = _train(gen, sel, data, recipe, registry, deadline, progress, processes, launcher)
        if stats["stopped_early"]:
            return Summary("out-of-time", f"time budget reached after {stats['steps']} of {stats['planned_steps']}"
                           " training steps; nothing promoted, progress kept: run again to continue",
                           memories=len(sel.new), items=len(data.train_items), training=stats,
                           seconds=time.time() - start, full=sel.full)
        if stats["diverged"]:
            return Summary("rejected", f"training diverged {stats['retries'] + 1} times; nothing promoted, the"
                           " current adapter stays", memories=len(sel.new), items=len(data.train_items),
                           training=stats, reasons=["failed: training diverged"], seconds=time.time() - start,
                           full=sel.full)
        routing = _route(model, gen, sel, data, recipe, embed)
        metrics, current_metrics = _evaluate(store, gen, model, sel, data, routing, recipe, new_generator, embed,
                                             progress)
        ok, reasons = decide(metrics, current_metrics, floors)
        if deadline and time.time() > deadline + RESERVE:
            ok, reasons = False, reasons + ["failed: over the time budget before promotion"]
        summary = Summary("promoted" if ok else "rejected", "", None, memories=len(sel.new),
                          items=len(data.train_items), exemplars=len(sel.new_ex), metrics=_rounded(metrics),
                          current_metrics=_rounded(current_metrics), reasons=reasons, training=stats, full=sel.full,
                          retrained=sel.retrained)
        if not ok:
            summary.message = "candidate not promoted; the current adapter stays"
            summary.seconds = time.time() - start
            return summary
        version = _promote(store, registry, settings, model, sel, data, routing, summary, recipe, floors, stats)
        summary.version, summary.message = version.name, f"promoted {version.label}" + (
            f" for namespace {namespace!r} (only its requests get it)" if namespace is not None else "") + (
            f" (served beside {', '.join(v.name for v in sel.below)})" if sel.below else "") + (
            f", retraining {', '.join(sel.retrained)} whose memories went stale" if sel.retrained else "")
        summary.seconds = time.time() - start
        return summary


# ---- the steps, in the order `consolidate` runs them ------------------------------------------------------------
def _needing_items(store: Store, new: list[int]) -> list[int]:
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


def _synthesize(store: Store, gen, need_items: list[int], recipe: Recipe, deadline, progress) -> int | None:
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


def _prepare(store: Store, gen, sel: Selection, recipe: Recipe, progress) -> RoundData:
    """The round's items and the teacher's targets: the base model WITH each memory (what is still true of it) in
    context; replay of earlier rounds' items when the round continues an adapter; the locality prompts."""
    items = store.items(sel.new)
    train_items = _cap_per_memory([i for i in items if not i.held_out], recipe.max_items_per_memory, recipe.seed)
    train_items += exemplar_items(sel.new_ex)
    old_items = store.items(sel.keep_covered)
    replay_items = [i for i in old_items if not i.held_out] + exemplar_items(sel.old_ex)
    contexts = {i: m.live_text for i, m in store.get(sorted({it.memory_id for it in items + old_items})).items()}
    contexts.update(exemplar_contexts(sel.new_ex + sel.old_ex))
    loc_all, loc_eval = generic_prompts()
    loc_train = loc_all[:recipe.locality_prompts]  # the gate always uses every held-out prompt (60)
    # a fresh adapter beside the current ones (stacked) needs no replay: the earlier adapters stay as they are
    replay_pick = [] if sel.stacked else _sample(replay_items, int(len(train_items) * recipe.replay_fraction),
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
                     _sample(unrehearsed or replay_items, EVAL_SAMPLE, recipe.seed), examples,
                     prepare_items(gen, replay_pick, contexts, recipe) if replay_pick else [],
                     prepare_locality(gen, loc_train, recipe) if recipe.locality_weight > 0 or recipe.null_space_energy
                     else [], loc_eval)
    if progress:
        progress("prepare", 1, 1)
    return data


def _train(gen, sel: Selection, data: RoundData, recipe: Recipe, registry: AdapterRegistry, deadline, progress,
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
    plan = _plan_key(recipe, sel.new, sel.keep_covered, init, training_set)
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


def _route(model, gen, sel: Selection, data: RoundData, recipe: Recipe, embed) -> Routing:
    """Fit the candidate's router (activation threshold, similarity bar over its keys) and serve the earlier
    rounds' adapters beside it, each with its router, as a promoted version would."""
    sample = _sample(data.train_items, EVAL_SAMPLE, recipe.seed)
    router = fit_router(model, gen, calibration_prompts(recipe), sample, recipe.route_margin, recipe.route_band,
                        recipe.route_pool, recipe.route_per_form) if recipe.route_margin else None
    keys = embed([it.prompt for it in data.train_items]) if router is not None else None
    owners = [it.memory_id for it in data.train_items]
    if router is not None:
        router.holds = [*sel.new, *(-e.id for e in sel.new_ex)]
        if recipe.route_similarity:  # questions near a trained prompt pass too
            router.similarity = similarity_bar(keys, embed(generic_prompts()[0]), recipe.route_similarity)
    if sel.below or router is not None and router.similarity is not None:
        stack_on(model, router, sel.below, keys=keys, embed=prompt_embedder(gen.tokenizer, embed), owners=owners)
    return Routing(router, keys, owners, sample)


def _evaluate(store: Store, gen, model, sel: Selection, data: RoundData, routing: Routing, recipe: Recipe,
              new_generator, embed, progress) -> tuple[dict, dict | None]:
    """The candidate's gate metrics (reliability, generalization, retention, locality, and the old values it
    still answers about what went stale), and the current adapter's on the same retention items and prompts."""
    sample = routing.sample
    metrics = {
        "reliability": item_accuracy(gen, sample),
        "generalization": item_accuracy(gen, _sample(data.held_new, EVAL_SAMPLE, recipe.seed)),
        "retention": item_accuracy(gen, data.retention_items),
    }
    with model.disable_adapter():
        metrics["base_reliability"] = item_accuracy(gen, sample)
    loc_base = base_continuations(gen, data.loc_eval, model.disable_adapter)  # serves the current adapter's too
    metrics.update({f"locality_{k}" if k != "agreement" else "locality": v
                    for k, v in locality(gen, data.loc_eval, base_ids=loc_base).items()})
    probes = stale_probes(store, sel.stale)
    if probes:
        metrics["stale_probes"] = len(probes)
        metrics["stale_answers"] = stale_answers(gen, probes)
    if progress:
        progress("evaluate", 1, 1)
    current_metrics = None
    if sel.current is not None:
        current_metrics = _current_metrics(new_generator(), sel.current, data.retention_items, data.loc_eval,
                                           loc_base, embed)
    return metrics, current_metrics


def _promote(store: Store, registry: AdapterRegistry, settings, model, sel: Selection, data: RoundData,
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


def _plan_key(recipe: Recipe, new: list[int], keep: list[int], init: str | None, examples: list) -> str:
    """What a training checkpoint belongs to: the same memories, parent, recipe and training sequences (run.py
    adds the learning rate)."""
    h = hashlib.sha256(json.dumps([recipe.as_dict(), new, keep, init and Path(init).name], sort_keys=True).encode())
    for e in examples:
        h.update(json.dumps([e.kind, e.ids, e.positions]).encode())
    return h.hexdigest()


def _current_metrics(gen, current, retention_items, loc_eval, loc_base, embed) -> dict:
    """The current adapter on the same retention items and locality prompts (on a separate base copy)."""
    gen.model, _ = attach(gen.model, current, embed=prompt_embedder(gen.tokenizer, embed))
    out = {"retention": item_accuracy(gen, retention_items)}
    out["locality"] = locality(gen, loc_eval, base_ids=loc_base)["agreement"]
    return out


def _cap_per_memory(items: list, cap: int, seed: int) -> list:
    """At most `cap` cloze items per memory (a seeded sample; all qa items kept). cap 0 keeps everything."""
    if cap <= 0:
        return items
    by_memory: dict[int, list] = {}
    for it in items:
        if it.kind == "cloze":
            by_memory.setdefault(it.memory_id, []).append(it)
    keep = {id(it) for group in by_memory.values() for it in _sample(group, cap, seed)}
    return [it for it in items if it.kind != "cloze" or id(it) in keep]


def _sample(items: list, n: int, seed: int) -> list:
    return items if len(items) <= n else random.Random(seed).sample(items, n)


def _rounded(d: dict | None) -> dict | None:
    return None if d is None else {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


__all__ = ["ConsolidationLocked", "EXIT_LOCKED", "EXIT_OK", "EXIT_OUT_OF_TIME", "EXIT_REJECTED", "Summary",
           "consolidate", "StoreError"]
