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
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from memory_llm.adapters import AdapterRegistry, attach, prompt_embedder, save_keys, stack_on
from memory_llm.adapters.registry import tenants
from memory_llm.consolidate.gate import Floors, base_continuations, decide, item_accuracy, locality
from memory_llm.consolidate.examples import open_book_items, prepare_items, prepare_locality, prepare_open_book
from memory_llm.consolidate.recipe import Recipe
from memory_llm.consolidate.train import Checkpoint, attach_lora, null_space_constraint, train
from memory_llm.consolidate.calibrate import fit_router, similarity_bar
from memory_llm.consolidate.distributed import launcher_command, train_in_processes
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
    spread = processes > 1 or bool(launcher)  # training runs in worker processes; the rest stays here
    registry = AdapterRegistry(settings.home, namespace)  # a namespace is consolidated on its own (a tenant)
    with consolidation_lock(settings.home):
        registry.discard_staging()
        current = registry.current()
        if current is not None:
            registry.check_base(current, settings.model)
        # a tenant's adapter covers its namespace only; the shared one every namespace that is not a tenant
        shared_out = tenants(settings.home)
        namespaces = [namespace] if namespace is not None else \
            [ns for ns in store.stats()["namespaces"] if ns not in shared_out]
        existing = all_existing = {i for ns in namespaces for i in store.memory_ids(ns)}
        covered = set(current.manifest.get("memories", [])) if current else set()
        forgotten = covered - all_existing
        if forgotten and not full:
            full = True
            logger.warning("%d consolidated memories were forgotten: rebuilding the adapter from all memories",
                           len(forgotten))
        new = sorted(existing if full else existing - covered)
        keep_covered = sorted((covered & all_existing) - set(new)) if not full else []
        good = [e for e in store.exemplars(namespace, min_rating=1)  # the prompt library's good answers
                if e.namespace in namespaces]
        ex_covered = set(current.manifest.get("exemplars", [])) if current and not full else set()
        new_ex = [e for e in good if e.id not in ex_covered]
        old_ex = [e for e in good if e.id in ex_covered]
        if not new and not new_ex:
            return Summary("nothing-new", "nothing new to consolidate", current.name if current else None,
                           seconds=time.time() - start)
        have_items = store.memories_with_items(new)
        need_items = [i for i in new if i not in have_items]
        if dry_run:
            return Summary("dry-run", f"would consolidate {len(new)} memories ({len(need_items)} need new training"
                           f" items) and {len(new_ex)} exemplars{' as a full rebuild' if full else ''}", None,
                           memories=len(new), exemplars=len(new_ex), full=full, seconds=time.time() - start)

        # ---- setup: a fresh base model (the serving model keeps its adapter meanwhile) -------------------
        gen = new_generator()
        memories = store.get(new)
        registry.create()  # a namespace consolidated on its own is a tenant from now on (docs/consolidation.md)

        # ---- synthesize (committed per batch of memories; reused by later runs) ------------------------------
        todo = [memories[i] for i in need_items if i in memories]
        for b in range(0, len(todo), SYNTH_BATCH):
            if deadline and time.time() > deadline:
                return Summary("out-of-time", f"time budget reached while synthesizing: {b} of {len(todo)} memories"
                               " done (kept); run again to continue", memories=len(new), seconds=time.time() - start)
            batch = todo[b:b + SYNTH_BATCH]
            made = synthesize(gen, batch, rewrites=recipe.rewrites, questions=recipe.questions, seed=recipe.seed + b,
                              cuts=recipe.cloze_cuts, answer_words=recipe.cloze_answer_words,
                              held_out_rewrite=recipe.held_out_rewrite, sentence_questions=recipe.sentence_questions,
                              sentence_answers=recipe.sentence_answers)
            for mem in batch:
                store.add_items(mem.id, mem.namespace, made[mem.id])
            if progress:
                progress("synthesize", min(b + SYNTH_BATCH, len(todo)), len(todo))

        items = store.items(new)
        train_items = _cap_per_memory([i for i in items if not i.held_out], recipe.max_items_per_memory, recipe.seed)
        train_items += exemplar_items(new_ex)
        held_new = [i for i in items if i.held_out]
        old_items = store.items(keep_covered)
        # a fresh adapter beside the current ones (stacked) needs no replay: the earlier adapters stay as they are
        stacked = current is not None and not full and len(current.stack) < recipe.max_stack
        below = [] if current is None or full else (current.stack if stacked else current.below)
        replay_items = [i for i in old_items if not i.held_out] + exemplar_items(old_ex)
        contexts = {i: mem.text for i, mem in store.get(sorted({it.memory_id for it in items + old_items})).items()}
        contexts.update(exemplar_contexts(new_ex + old_ex))

        # ---- teacher targets: base model WITH the chunk in context -------------------------------------------
        loc_all, loc_eval = generic_prompts()
        loc_train = loc_all[:recipe.locality_prompts]  # the gate always uses every held-out prompt (60)
        replay_pick = [] if stacked else _sample(replay_items, int(len(train_items) * recipe.replay_fraction),
                                                 recipe.seed)
        # retention: what earlier rounds taught (their trained items), preferring items this round does not
        # replay, as the current adapter and the candidate answer them (their held-out items are too hard to
        # show a loss: on 10 FK documents both adapters scored 0.08 on them while FK recall fell by a third)
        replayed = {id(i) for i in replay_pick}
        unrehearsed = [i for i in replay_items if id(i) not in replayed]
        retention_items = _sample(unrehearsed or replay_items, EVAL_SAMPLE, recipe.seed)
        examples = prepare_items(gen, train_items, contexts, recipe)
        examples += prepare_open_book(gen, open_book_items(train_items, contexts, recipe.open_book, recipe.seed),
                                      recipe) if recipe.open_book else []
        replay = prepare_items(gen, replay_pick, contexts, recipe) if replay_pick else []
        loc = prepare_locality(gen, loc_train, recipe) if recipe.locality_weight > 0 or recipe.null_space_energy else []
        if progress:
            progress("prepare", 1, 1)

        # ---- train: LoRA student WITHOUT context (checkpointed: a killed or out-of-time run resumes) -------
        init = str(current.path) if current is not None and not full and not stacked else None
        model = attach_lora(gen.model, recipe, init_from=init)
        gen.model = model
        training_set = examples + replay + (loc if recipe.locality_weight > 0 else [])  # replay sampled above
        constrain = null_space_constraint(model, [e.ids for e in loc], recipe.null_space_energy) \
            if recipe.null_space_energy and loc and not spread else None  # workers build their own
        reserve = 120.0  # seconds kept for evaluation within a budget
        train_deadline = deadline - reserve if deadline else None
        lr = recipe.lr * (recipe.later_lr_scale if current is not None else 1.0)
        start_weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        plan = _plan_key(recipe, new, keep_covered, init, training_set)
        for retry in range(recipe.diverge_retries + 1):  # a diverged run starts again at half the learning rate
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
        if stats["stopped_early"]:
            return Summary("out-of-time", f"time budget reached after {stats['steps']} of {stats['planned_steps']}"
                           " training steps; nothing promoted, progress kept: run again to continue",
                           memories=len(new), items=len(train_items), training=stats, seconds=time.time() - start,
                           full=full)
        if stats["diverged"]:
            checkpoint.clear()
            return Summary("rejected", f"training diverged {retry + 1} times (last at lr {lr:g}); nothing promoted,"
                           " the current adapter stays", memories=len(new), items=len(train_items), training=stats,
                           reasons=["failed: training diverged"], seconds=time.time() - start, full=full)
        checkpoint.clear()
        sample = _sample(train_items, EVAL_SAMPLE, recipe.seed)  # reliability, and the router's diagnostic
        own_router = fit_router(model, gen, calibration_prompts(recipe), sample, recipe.route_margin,
                                recipe.route_band, recipe.route_pool, recipe.route_per_form) \
            if recipe.route_margin else None
        keys = embed([it.prompt for it in train_items]) if own_router is not None else None
        if own_router is not None and recipe.route_similarity:  # questions near a trained prompt pass too
            own_router.similarity = similarity_bar(keys, embed(generic_prompts()[0]), recipe.route_similarity)
        if below or own_router is not None and own_router.similarity is not None:  # the candidate serves the
            # earlier rounds' adapters too (untouched, each with its router), and routes by its keys
            stack_on(model, own_router, below, keys=keys, embed=prompt_embedder(gen.tokenizer, embed))

        # ---- evaluate the candidate ------------------------------------------------------------------------
        metrics = {
            "reliability": item_accuracy(gen, sample),
            "generalization": item_accuracy(gen, _sample(held_new, EVAL_SAMPLE, recipe.seed)),
            "retention": item_accuracy(gen, retention_items),
        }
        with model.disable_adapter():
            metrics["base_reliability"] = item_accuracy(gen, sample)
        loc_base = base_continuations(gen, loc_eval, model.disable_adapter)  # serves the current adapter's too
        metrics.update({f"locality_{k}" if k != "agreement" else "locality": v
                        for k, v in locality(gen, loc_eval, base_ids=loc_base).items()})
        if progress:
            progress("evaluate", 1, 1)
        current_metrics = None
        if current is not None:
            current_metrics = _current_metrics(new_generator(), current, retention_items, loc_eval, loc_base,
                                               embed)

        ok, reasons = decide(metrics, current_metrics, floors)
        if deadline and time.time() > deadline + reserve:
            ok, reasons = False, reasons + ["failed: over the time budget before promotion"]
        summary = Summary("promoted" if ok else "rejected", "", None, memories=len(new), items=len(train_items),
                          exemplars=len(new_ex),
                          metrics=_rounded(metrics), current_metrics=_rounded(current_metrics), reasons=reasons,
                          training=stats, full=full)
        if not ok:
            summary.message = "candidate not promoted; the current adapter stays"
            summary.seconds = time.time() - start
            return summary

        # ---- promote: write the version, then switch `current` atomically, then the ledger -----------------
        staged = registry.staging()
        model.save_pretrained(staged, selected_adapters=["default"])  # its own adapter; the stack by name
        if own_router is not None:
            own_router.save(staged)
            save_keys(staged, keys)
        covered_now = sorted(set(new) | set(keep_covered))
        version = registry.commit(staged, {
            "base_model": settings.model, "recipe": recipe.as_dict(), "metrics": summary.metrics,
            "memories": covered_now, "new_memories": new, "exemplars": sorted(e.id for e in new_ex + old_ex),
            "parent": None if full or current is None else current.name, "stack": [v.name for v in below],
            "full": full, "floors": floors.as_dict(), "training": stats,
            "router": {"threshold": own_router.threshold, "raw_threshold": own_router.raw_threshold,
                       "pool": own_router.pool, **own_router.details} if own_router is not None else None})
        registry.promote(version.name)
        store.record_ledger(version.label, covered_now)
        summary.version, summary.message = version.name, f"promoted {version.label}" + (
            f" for namespace {namespace!r} (only its requests get it)" if namespace is not None else "") + (
            f" (served beside {', '.join(v.name for v in below)})" if below else "")
        summary.seconds = time.time() - start
        return summary


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
