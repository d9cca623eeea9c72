#!/usr/bin/env python
"""Crash trials: SIGKILL a real `mllm` process at random moments, then check that nothing was lost or torn.

Children run the real CLI code path on the fake embedder (tests/fake_cli.py: a child starts in ~1 s) and,
for adapters, the real AdapterRegistry writing real peft files of a tiny model.

  learn      `mllm learn DIR` over 60 documents (~40 chunks each), killed after a uniform random delay in
             [0, duration of a clean run]. Then: the home opens; every source present holds exactly the chunks
             a clean run stores for it (none half present); the index agrees with SQLite; `doctor` is clean
             or `doctor --repair` makes it clean; re-running the learn ends with exactly the clean run's memories.
  forget     a process forgetting the 60 sources one by one (printing each one it finished), killed at random:
             every source reported forgotten is gone, every other one is whole or gone; the same checks; the
             re-learn restores exactly the clean run.
  adapter    a process committing and promoting adapter versions in a loop (staging → vNNNN → `current`),
             killed at random: `current` names an intact version that peft loads on the tiny model, no broken
             version directory exists, the last version reported promoted is not lost, and the next commit works.

Run from the repository root:
    PYTHONPATH=. .venv/bin/python scripts/trial_crash.py --trials 40 --write
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
FAKE_CLI = ROOT / "tests" / "fake_cli.py"
DOCS, SENTENCES = 60, 600


def make_corpus(target: Path, docs: int = DOCS, sentences: int = SENTENCES) -> Path:
    """docs files of distinct sentences (no cross-file duplicates: every source's chunks are predictable)."""
    target.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    words = [f"w{i}" for i in range(5000)]
    for d in range(docs):
        text = " ".join(f"Doc{d} line{s} says {' '.join(rng.sample(words, 8))}." for s in range(sentences))
        (target / f"doc{d:03d}.txt").write_text(text, encoding="utf-8")
    return target


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def fake_cli(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FAKE_CLI), *args, "--home", str(home)], capture_output=True,
                          text=True, env=child_env(), timeout=timeout)


def snapshot(home: Path) -> dict[str, list[str]]:
    """uri → the texts of its memories in position order (read with plain sqlite3, as a fresh process would)."""
    import sqlite3

    db = sqlite3.connect(home / "memory.sqlite")
    out: dict[str, list[str]] = {}
    for uri, text in db.execute("SELECT s.uri, m.text FROM memories m JOIN sources s ON s.id = m.source_id"
                                " ORDER BY s.uri, m.position"):
        out.setdefault(uri, []).append(text)
    db.close()
    return out


def check_home(home: Path, reference: dict[str, list[str]]) -> dict:
    """The checks after a kill. Raises AssertionError naming what broke; returns what was seen."""
    from conftest import FakeEmbedder

    from memory_llm import MemoryLLM

    m = MemoryLLM(home, embedder=FakeEmbedder())
    try:
        m.store  # opens the home (a kill before the schema was written leaves an empty file)
        seen = snapshot(home)
        for uri, texts in seen.items():
            assert texts == reference.get(uri), f"source {uri} is torn: {len(texts)} of {len(reference.get(uri, []))}"
        report = m.doctor()
        broken = [c for c in report["checks"] if not c["ok"]]
        repaired = ",".join(c["check"] for c in broken)
        if broken:
            assert all(c["repairable"] for c in broken), f"doctor: unrepairable {broken}"
            report = m.doctor(repair=True)
            assert report["healthy"], f"doctor --repair left {report['checks']}"
        store = m.store
        if store.meta("dim"):
            assert store.index().fingerprint() == store.sqlite_fingerprint(), "index disagrees with SQLite"
            store.index().save(store.index_path)
            left = [p.name for p in store.index_path.parent.iterdir() if p.name.startswith(".")]
            assert not left, f"temporary files of the killed process were left: {left}"
    finally:
        m.close()
    return {"sources": len(seen), "repaired": repaired}


def kill_after(cmd: list[str], delay: float) -> tuple[bool, str]:
    """Start cmd, SIGKILL it after delay seconds; (killed before it finished, its stdout)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        proc.wait(timeout=delay)
        killed = False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = True
    out, err = proc.communicate()
    if not killed and proc.returncode != 0:
        raise AssertionError(f"child failed on its own (exit {proc.returncode}): {err.strip()[-500:]}")
    return killed, out


def learn_trial(corpus: Path, home: Path, reference: dict, delay: float) -> dict:
    killed, _ = kill_after([sys.executable, str(FAKE_CLI), "learn", str(corpus), "--home", str(home)], delay)
    seen = check_home(home, reference)
    again = fake_cli(home, "learn", str(corpus))
    assert again.returncode == 0, again.stderr
    assert snapshot(home) == reference, "re-running the learn did not end with exactly the clean run"
    return {**seen, "killed": killed}


FORGET_CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from fake_cli import factory
m = factory(Path(sys.argv[1]))
for uri in sys.argv[3:]:
    m.forget(source=uri)
    print(uri, flush=True)
"""


def forget_trial(corpus: Path, home: Path, reference: dict, delay: float, template: Path) -> dict:
    shutil.rmtree(home, ignore_errors=True)
    shutil.copytree(template, home)
    uris = sorted(reference)
    killed, out = kill_after([sys.executable, "-c", FORGET_CHILD, str(home), str(ROOT / "tests"), *uris], delay)
    reported = set(out.split())
    seen = check_home(home, reference)
    left = snapshot(home)
    assert not reported & set(left), f"forgotten sources came back: {sorted(reported & set(left))[:3]}"
    again = fake_cli(home, "learn", str(corpus))
    assert again.returncode == 0, again.stderr
    assert snapshot(home) == reference, "re-learning after the killed forget did not restore the clean run"
    return {**seen, "killed": killed, "forgotten": len(reported)}


ADAPTER_CHILD = """
import json, shutil, sys
from pathlib import Path
from memory_llm.adapters import AdapterRegistry
reg = AdapterRegistry(Path(sys.argv[1]))
template = Path(sys.argv[2])
for i in range(int(sys.argv[3])):
    reg.discard_staging()
    staged = reg.staging()
    for f in template.iterdir():
        shutil.copy(f, staged / f.name)
    v = reg.commit(staged, {"base_model": "tiny-llama", "memories": list(range(i))})
    reg.promote(v.name)
    print(v.name, flush=True)
"""


def tiny_adapter(target: Path) -> Path:
    """A real peft LoRA save of the tiny model (what consolidation writes), used as the files to commit."""
    import conftest
    from peft import LoraConfig, get_peft_model

    gen = conftest.tiny_generator.__wrapped__()
    model = get_peft_model(gen.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(target)
    return target


def adapter_trial(home: Path, template: Path, delay: float, rounds: int = 200) -> dict:
    from memory_llm.adapters import AdapterRegistry

    killed, out = kill_after([sys.executable, "-c", ADAPTER_CHILD, str(home), str(template), str(rounds)], delay)
    reported = out.split()
    reg = AdapterRegistry(home)
    assert not reg.problems(), f"broken version directories: {reg.problems()}"
    current = reg.current()
    if reported:
        assert current is not None and current.number >= int(reported[-1][1:]), "a promoted version was lost"
    if current is not None:
        load_adapter(current.path)
    reg.discard_staging()
    staged = reg.staging()
    for f in template.iterdir():
        shutil.copy(f, staged / f.name)
    nxt = reg.commit(staged, {"base_model": "tiny-llama", "memories": []})
    reg.promote(nxt.name)
    assert reg.current().name == nxt.name
    return {"killed": killed, "promoted": len(reported)}


CONSOLIDATE_CHILD = """
import sys
sys.path[:0] = sys.argv[2:4]
import trial_crash
trial_crash.consolidate_once(sys.argv[1])
"""

FACTS = ["The lighthouse of Varn was built in 1820 by the engineer Lisbet Holm.",
         "Every spring the Varn choir sings on the harbour wall for three whole nights.",
         "The Varn museum keeps a whale skeleton nine metres long."]


def consolidate_once(home: str) -> str:
    """One consolidation round on the tiny model with open floors (so a finished run always promotes)."""
    from fake_cli import factory

    from memory_llm.consolidate.gate import Floors
    from memory_llm.consolidate.recipe import Recipe

    m = factory(Path(home), generate=True)
    recipe = Recipe(epochs=1, batch_size=16, rank=4, alpha=8, locality_prompts=4, rewrites=1, questions=1)
    summary = m.consolidate(recipe=recipe, floors=Floors(reliability=0.0, locality=0.0, retention=0.0, tolerance=1.0))
    m.close()
    print(summary.status, summary.version, flush=True)
    return summary.status


def consolidate_trial(home: Path, template: Path, delay: float, fact: str) -> dict:
    """Kill a consolidation that would promote the next version over an existing current one."""
    from memory_llm.adapters import AdapterRegistry

    shutil.rmtree(home, ignore_errors=True)
    shutil.copytree(template, home)
    assert fake_cli(home, "learn", "--text", fact).returncode == 0
    killed, out = kill_after([sys.executable, "-c", CONSOLIDATE_CHILD, str(home), str(ROOT / "tests"),
                              str(ROOT / "scripts")], delay)
    reg = AdapterRegistry(home)
    assert not reg.problems(), f"broken version directories: {reg.problems()}"
    current = reg.current()
    assert current is not None and current.name in ("v0001", "v0002"), "the current adapter was lost"
    load_adapter(current.path)
    status = consolidate_once(str(home))  # the next run works (and promotes, unless the killed one finished)
    assert status in ("promoted", "nothing-new"), status
    load_adapter(reg.current().path)
    return {"killed": killed, "promoted": int(current.name == "v0002")}


_TINY = None


def load_adapter(path: Path) -> None:
    """peft loads the adapter onto the tiny model (raises if the files are torn)."""
    global _TINY
    import conftest
    from peft import PeftModel

    if _TINY is None:
        _TINY = conftest.tiny_generator.__wrapped__().model
    PeftModel.from_pretrained(_TINY, str(path)).unload()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_trials(work: Path, trials: int, consolidate_trials: int, seed: int = 0, log=print) -> dict:
    """trials of each kind; returns counts for the report. Raises AssertionError at the first failure."""
    rng = random.Random(seed)
    corpus = make_corpus(work / "corpus")
    template = work / "clean"
    learn_seconds = timed(lambda: fake_cli(template, "learn", str(corpus)))
    reference = snapshot(template)
    results: dict[str, list[dict]] = {"learn": [], "forget": [], "adapter": [], "consolidate": []}
    for t in range(trials):
        home = work / f"learn{t}"
        results["learn"].append(learn_trial(corpus, home, reference, rng.uniform(0, learn_seconds)))
        shutil.rmtree(home)
    shutil.copytree(template, work / "f")
    forget_seconds = timed(lambda: kill_after([sys.executable, "-c", FORGET_CHILD, str(work / "f"), str(ROOT / "tests"),
                                               *sorted(reference)], 600))
    for t in range(trials):
        home = work / f"forget{t}"
        results["forget"].append(forget_trial(corpus, home, reference, rng.uniform(0, forget_seconds), template))
        shutil.rmtree(home)
    adapter_files = tiny_adapter(work / "adapter-files")
    adapter_seconds = timed(lambda: kill_after([sys.executable, "-c", ADAPTER_CHILD, str(work / "a"),
                                                str(adapter_files), "40"], 600))
    for t in range(trials):
        home = work / f"adapter{t}"
        results["adapter"].append(adapter_trial(home, adapter_files, rng.uniform(0, adapter_seconds), rounds=40))
        shutil.rmtree(home)
    template = work / "consolidated"
    assert fake_cli(template, "learn", "--text", FACTS[0]).returncode == 0
    consolidate_once(str(template))
    consolidate_seconds = timed(lambda: consolidate_trial(work / "c", template, 900, FACTS[1]))
    for t in range(consolidate_trials):
        home = work / f"consolidate{t}"
        results["consolidate"].append(consolidate_trial(home, template, rng.uniform(0, consolidate_seconds),
                                                        FACTS[1 + t % 2]))
        shutil.rmtree(home)
    log(f"clean run: learn {learn_seconds:.2f} s, forget {forget_seconds:.2f} s, 40 adapter commits {adapter_seconds:.2f} s")
    return {"results": results, "memories": sum(len(v) for v in reference.values()), "sources": len(reference),
            "seconds": {"learn": learn_seconds, "forget": forget_seconds, "adapter": adapter_seconds,
                        "consolidate": consolidate_seconds}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=40, help="kills of each kind")
    p.add_argument("--consolidate-trials", type=int, default=8, help="kills of a real consolidation (tiny model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help="write the figures into BENCHMARKS.md")
    args = p.parse_args()
    from _benchmd import command_line, machine, table, today, write_section

    with tempfile.TemporaryDirectory(prefix="trial-crash-") as tmp:
        out = run_trials(Path(tmp), args.trials, args.consolidate_trials, args.seed)
    rows = []
    for kind, res in out["results"].items():
        killed = sum(r["killed"] for r in res)
        done = {"learn": "sources", "forget": "forgotten", "adapter": "promoted", "consolidate": "promoted"}[kind]
        mid = sum(r["killed"] and r[done] > 0 for r in res)
        repaired = [r["repaired"] for r in res if r.get("repaired")]
        what = ", ".join(sorted(set(repaired)))
        rows.append([kind, len(res), killed, mid, f"{len(repaired)}" + (f" ({what})" if what else ""), 0])
    body = (f"Command: `{command_line()}` ({today()}; {machine()}).\n\n"
            f"Each trial SIGKILLs a child at a uniform random moment of a clean run's duration (learn of "
            f"{out['sources']} documents / {out['memories']} chunks: {out['seconds']['learn']:.2f} s; forgetting them "
            f"one source at a time: {out['seconds']['forget']:.2f} s; 40 adapter commit+promote rounds: "
            f"{out['seconds']['adapter']:.2f} s; a consolidation on the tiny model promoting v0002 over v0001 plus the"
            f" checks: {out['seconds']['consolidate']:.1f} s, child start-up included), then checks the home (see the script's "
            "docstring). A failed check stops the script, so every row below passed all its checks.\n\n"
            + table(["trial", "runs", "killed before finishing", "killed mid-way (some sources/versions done)",
                     "doctor found (repaired)", "memories lost or torn"], rows))
    print(body)
    if args.write:
        write_section("Crash trials: kill -9 (trial_crash.py)", body)


if __name__ == "__main__":
    main()
