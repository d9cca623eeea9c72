"""`mllm consolidate`, top to bottom: lock → select memories → synthesize items → prepare teacher targets →
train LoRA → evaluate → gate → promote (atomically) → ledger. Nothing here is promoted half-way: a killed
or out-of-time run leaves the current adapter as it was and keeps the items it synthesized."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from memory_llm.adapters import AdapterRegistry
from memory_llm.consolidate.distributed import launcher_command
from memory_llm.consolidate.gate import Floors, decide
from memory_llm.consolidate.recipe import Recipe
from memory_llm.consolidate.select import select
from memory_llm.consolidate.steps import (RESERVE, evaluate, needing_items, prepare, promote, rounded, route,
                                          synthesize_items, train_round)
from memory_llm.errors import InputError, MemoryLLMError, StoreError

if TYPE_CHECKING:
    import numpy as np

    from memory_llm.config import Settings
    from memory_llm.generate import Generator
    from memory_llm.store import Store

logger = logging.getLogger(__name__)

# exit codes a scheduler understands (also in the README)
EXIT_OK, EXIT_REJECTED, EXIT_OUT_OF_TIME, EXIT_LOCKED = 0, 3, 4, 75


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
        need_items = needing_items(store, sel.new)
        if dry_run:
            return Summary("dry-run", f"would consolidate {len(sel.new)} memories ({len(need_items)} need new"
                           f" training items) and {len(sel.new_ex)} exemplars{' as a full rebuild' if sel.full else ''}"
                           + (f", retraining {', '.join(sel.retrained)} (stale)" if sel.retrained else ""), None,
                           memories=len(sel.new), exemplars=len(sel.new_ex), full=sel.full,
                           seconds=time.time() - start)
        gen = new_generator()  # a fresh base model: the serving model keeps its adapter meanwhile
        registry.create()  # a namespace consolidated on its own is a tenant from now on (docs/consolidation.md)
        late = synthesize_items(store, gen, need_items, recipe, deadline, progress)
        if late is not None:
            return Summary("out-of-time", f"time budget reached while synthesizing: {late} of {len(need_items)}"
                           " memories done (kept); run again to continue", memories=len(sel.new),
                           seconds=time.time() - start)
        data = prepare(store, gen, sel, recipe, progress)
        stats, model = train_round(gen, sel, data, recipe, registry, deadline, progress, processes, launcher)
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
        routing = route(model, gen, sel, data, recipe, embed)
        metrics, current_metrics = evaluate(store, gen, model, sel, data, routing, recipe, new_generator, embed,
                                             progress)
        ok, reasons = decide(metrics, current_metrics, floors)
        if deadline and time.time() > deadline + RESERVE:
            ok, reasons = False, reasons + ["failed: over the time budget before promotion"]
        summary = Summary("promoted" if ok else "rejected", "", None, memories=len(sel.new),
                          items=len(data.train_items), exemplars=len(sel.new_ex), metrics=rounded(metrics),
                          current_metrics=rounded(current_metrics), reasons=reasons, training=stats, full=sel.full,
                          retrained=sel.retrained)
        if not ok:
            summary.message = "candidate not promoted; the current adapter stays"
            summary.seconds = time.time() - start
            return summary
        version = promote(store, registry, settings, model, sel, data, routing, summary, recipe, floors, stats)
        summary.version, summary.message = version.name, f"promoted {version.label}" + (
            f" for namespace {namespace!r} (only its requests get it)" if namespace is not None else "") + (
            f" (served beside {', '.join(v.name for v in sel.below)})" if sel.below else "") + (
            f", retraining {', '.join(sel.retrained)} whose memories went stale" if sel.retrained else "")
        summary.seconds = time.time() - start
        return summary


__all__ = ["ConsolidationLocked", "EXIT_LOCKED", "EXIT_OK", "EXIT_OUT_OF_TIME", "EXIT_REJECTED", "Summary",
           "consolidate", "StoreError"]
