#!/usr/bin/env python
"""Concurrency trials: many processes learn, forget, search, ask and consolidate on ONE home at once.

Per round: --writers processes each learn --ops texts (`learn(text=...)`; every 4th one a file) and forget
every 5th of their own texts again; --readers processes search (and one of them asks, on the tiny model)
in a loop until the writers are done (--askers of them ask on the tiny model), checking every hit is a whole memory of a known shape;
one process consolidates on the tiny model (a second namespace's facts, so that it ends within the round). All on the fake embedder, through the library API, each in its own process.
Afterwards: every learn a writer reported is stored whole (none lost), every forget it reported is gone,
nothing else is present, no error reached any process (in particular no "database is locked"), `doctor`
is clean and the vector index agrees with SQLite.

Run from the repository root:
    PYTHONPATH=. .venv/bin/python scripts/trial_concurrency.py --rounds 3 --write
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))


CONSOLIDATED = "consolidated"  # the consolidator trains on this namespace's few facts (the tiny model would take
# many minutes over everything the writers add) while reading and writing the same database as they do
SEED_FACTS = ["The lighthouse of Varn was built in 1820 by the engineer Lisbet Holm.",
              "Every spring the Varn choir sings on the harbour wall for three whole nights."]


def fact(writer: int, op: int) -> str:
    """The text writer `writer` learns at step `op` (a reader can recognise a whole one)."""
    return f"Writer{writer} fact{op} records that station w{writer}x{op} logged {writer * 1000 + op} herons today."


def is_whole(text: str) -> bool:
    import re

    m = re.fullmatch(r"Writer(\d+) fact(\d+) records that station w\d+x\d+ logged \d+ herons today\.", text)
    return bool(m) and text == fact(int(m.group(1)), int(m.group(2)))


def writer(home: Path, index: int, ops: int, files: Path) -> None:
    """Learn ops texts (every 4th as a file), forget every 5th again; one JSON line per finished step."""
    from fake_cli import factory

    from memory_llm import MemoryLLMError

    m = factory(home)
    for op in range(ops):
        try:
            if op % 4 == 3:
                path = files / f"w{index}-{op}.txt"
                path.write_text(fact(index, op), encoding="utf-8")
                r = m.learn([path])
                uri = str(path.resolve())
            else:
                uri = f"w{index}-{op}"
                r = m.learn(text=fact(index, op), source=uri)
            print(json.dumps({"learned": uri, "text": fact(index, op), "added": r.chunks_added}), flush=True)
            if op % 5 == 4:
                n = m.forget(source=uri)
                print(json.dumps({"forgot": uri, "n": n}), flush=True)
        except MemoryLLMError as exc:
            print(json.dumps({"error": str(exc)}), flush=True)
    m.close()


def reader(home: Path, index: int, seconds: float, ask: bool) -> None:
    """Search (or ask) in a loop until the writers are done (at least `seconds`, at most 10 minutes more: writers
    that died never say they are done); report torn hits and errors."""
    from fake_cli import factory

    from memory_llm import MemoryLLMError

    m = factory(home, generate=ask)
    end, n, bad = time.time() + seconds, 0, 0
    while time.time() < end or not writers_done(home).exists() and time.time() < end + 600:
        try:
            q = f"Writer{n % 8} fact{n % 30} herons"
            hits = m.ask(q, max_new_tokens=2).sources if ask else m.search(q, 5)
            bad += sum(not is_whole(h.memory.text) for h in hits)
            n += 1
        except MemoryLLMError as exc:
            print(json.dumps({"error": str(exc)}), flush=True)
    print(json.dumps({"queries": n, "torn_hits": bad}), flush=True)
    m.close()


def writers_done(home: Path) -> Path:
    return home.parent / f"{home.name}-writers-done"


def consolidator(home: Path, rounds: int) -> None:
    from fake_cli import factory

    from memory_llm import MemoryLLMError
    from memory_llm.consolidate.gate import Floors
    from memory_llm.consolidate.recipe import Recipe

    m = factory(home, generate=True)
    recipe = Recipe(epochs=1, batch_size=16, rank=4, alpha=8, locality_prompts=4, rewrites=1, questions=1)
    for _ in range(rounds):
        try:
            s = m.consolidate(recipe=recipe, namespace=CONSOLIDATED,
                              floors=Floors(reliability=0.0, locality=0.0, retention=0.0, tolerance=1.0))
            print(json.dumps({"consolidated": s.status, "version": s.version}), flush=True)
        except MemoryLLMError as exc:
            print(json.dumps({"error": str(exc)}), flush=True)
    m.close()


def spawn(role: str, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, __file__, "--child", role, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def run_round(home: Path, writers: int, readers: int, ops: int, consolidate: bool, askers: int = 0) -> dict:
    """One round of concurrent processes on `home`; returns counts; raises AssertionError on a violation."""
    files = home.parent / f"{home.name}-files"
    files.mkdir(parents=True, exist_ok=True)
    if consolidate:
        from fake_cli import factory

        seed = factory(home)
        for i, text in enumerate(SEED_FACTS):
            seed.learn(text=text, source=f"seed{i}", namespace=CONSOLIDATED)
        seed.close()
    start = time.time()
    procs = [spawn("consolidator", home, 1)] if consolidate else []
    procs += [spawn("writer", home, i, ops, files) for i in range(writers)]
    readers_ = [spawn("reader", home, i, 4.0, i < askers) for i in range(readers)]
    outputs = []

    def collect(group: list[subprocess.Popen]) -> None:
        for p in group:
            out, err = p.communicate(timeout=900)
            assert p.returncode == 0, f"a child failed (exit {p.returncode}): {err.strip()[-800:]}"
            outputs.extend(json.loads(line) for line in out.splitlines() if line.startswith("{"))

    collect(procs)
    writers_done(home).touch()  # the readers stop once every writer (and the consolidator) is done
    collect(readers_)
    seconds = time.time() - start
    errors = [o["error"] for o in outputs if "error" in o]
    assert not errors, f"errors reached the user: {errors[:3]}"
    learned = {o["learned"]: o["text"] for o in outputs if "learned" in o}
    forgot = {o["forgot"] for o in outputs if "forgot" in o}
    torn = sum(o.get("torn_hits", 0) for o in outputs)
    assert torn == 0, f"{torn} torn hits seen by readers"
    from trial_crash import snapshot

    stored = {uri: texts for uri, texts in snapshot(home).items() if not uri.startswith("seed")}
    dropped = {o["learned"] for o in outputs if o.get("added") == 0}  # a near-duplicate of a stored fact
    lost = [u for u in learned if u not in forgot | dropped and stored.get(u) != [learned[u]]]
    resurrected = [u for u in forgot if u in stored]
    assert not lost, f"{len(lost)} learned sources lost, e.g. {lost[:3]}"
    assert not resurrected, f"forgotten sources present: {resurrected[:3]}"
    extra = set(stored) - set(learned)
    assert not extra, f"unexpected sources: {sorted(extra)[:3]}"
    health = doctor(home)
    assert health["healthy"], health
    return {"seconds": seconds, "learned": len(learned), "forgot": len(forgot),
            "queries": sum(o.get("queries", 0) for o in outputs),
            "consolidations": [o["consolidated"] for o in outputs if "consolidated" in o]}


def doctor(home: Path) -> dict:
    from conftest import FakeEmbedder

    from memory_llm import MemoryLLM

    m = MemoryLLM(home, embedder=FakeEmbedder())
    try:
        report = m.doctor()
        store = m.store
        report["index_agrees"] = store.index().fingerprint() == store.sqlite_fingerprint()
        report["healthy"] = report["healthy"] and report["index_agrees"]
        return report
    finally:
        m.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--writers", type=int, default=8)
    p.add_argument("--readers", type=int, default=6)
    p.add_argument("--askers", type=int, default=4, help="how many of the readers ask (tiny model) instead of search")
    p.add_argument("--ops", type=int, default=30, help="learn steps per writer")
    p.add_argument("--no-consolidate", action="store_true")
    p.add_argument("--write", action="store_true", help="write the figures into BENCHMARKS.md")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        role, *rest = args.child
        home = Path(rest[0])
        if role == "writer":
            writer(home, int(rest[1]), int(rest[2]), Path(rest[3]))
        elif role == "reader":
            reader(home, int(rest[1]), float(rest[2]), rest[3] == "True")
        else:
            consolidator(home, int(rest[1]))
        return
    from _benchmd import command_line, machine, table, today, write_section

    rows = []
    with tempfile.TemporaryDirectory(prefix="trial-conc-") as tmp:
        for r in range(args.rounds):
            res = run_round(Path(tmp) / f"home{r}", args.writers, args.readers, args.ops, not args.no_consolidate,
                            args.askers)
            print(res, flush=True)
            rows.append([r + 1, f"{res['seconds']:.1f}", res["learned"], res["forgot"], res["queries"],
                         ", ".join(res["consolidations"]) or "-", 0, 0, 0])
    body = (f"Command: `{command_line()}` ({today()}; {machine()}).\n\n"
            f"Per round {args.writers} writer processes ({args.ops} learns each, every 4th a file, every 5th forgotten"
            f" again), {args.readers} reader processes querying until the writers are done ({args.askers} asking on the"
            " tiny model, the others searching)"
            + ("" if args.no_consolidate else " and one consolidation on the tiny model (of a second namespace's two"
                                             " facts, so that it finishes within the round)")
            + ", all on one home at once. A failed check stops the script, so every row passed all of them"
            " (see the script's docstring).\n\n"
            + table(["round", "wall s", "learns reported", "forgets reported", "queries", "consolidation",
                     "writes lost", "errors reaching a process", "torn hits"], rows))
    print(body)
    if args.write:
        write_section("Concurrency trials: processes on one home (trial_concurrency.py)", body)


if __name__ == "__main__":
    main()
