"""Crash safety, locking and concurrency: a few iterations of the trials in scripts/trial_crash.py and
scripts/trial_concurrency.py (their long runs and figures are in BENCHMARKS.md), plus the lock contract."""

import os
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest

from memory_llm import MemoryLLM, StoreError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import trial_concurrency  # noqa: E402
import trial_crash  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """12 documents and the exact memories a clean `learn` stores for them (learned by a real process)."""
    work = tmp_path_factory.mktemp("crash")
    docs = trial_crash.make_corpus(work / "docs", docs=12, sentences=400)
    clean = work / "clean"
    start = time.perf_counter()
    assert trial_crash.fake_cli(clean, "learn", str(docs)).returncode == 0
    return docs, clean, trial_crash.snapshot(clean), time.perf_counter() - start


@pytest.mark.parametrize("fraction", [0.5, 0.8])
def test_kill9_during_learn_leaves_whole_sources_and_relearn_completes(corpus, tmp_path, fraction):
    docs, _, reference, seconds = corpus
    result = trial_crash.learn_trial(docs, tmp_path / "home", reference, seconds * fraction)
    assert result["sources"] <= len(reference)  # (the trial itself asserts no torn source, agreement, relearn)


@pytest.mark.parametrize("delay", [0.9, 1.5])
def test_kill9_during_forget_keeps_reported_forgets(corpus, tmp_path, delay):
    docs, clean, reference, _ = corpus
    result = trial_crash.forget_trial(docs, tmp_path / "home", reference, delay, clean)
    assert result["forgotten"] <= len(reference)


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory):
    return trial_crash.tiny_adapter(tmp_path_factory.mktemp("adapter") / "files")


@pytest.mark.parametrize("delay", [0.8, 1.6])
def test_kill9_during_adapter_commit_keeps_current_loadable(adapter_files, tmp_path, delay):
    result = trial_crash.adapter_trial(tmp_path / "home", adapter_files, delay, rounds=30)
    assert result["promoted"] <= 30


def hold_write_lock(home: Path) -> sqlite3.Connection:
    db = sqlite3.connect(home / "memory.sqlite", isolation_level=None, check_same_thread=False)
    db.execute("BEGIN IMMEDIATE")
    return db


def test_readers_never_wait_for_a_writer(tmp_path, fake_embedder):
    m = MemoryLLM(tmp_path / "home", embedder=fake_embedder)
    m.learn(text="Owls hunt at night in the forest.")
    m.close()
    db = hold_write_lock(tmp_path / "home")  # another process in the middle of a long write
    try:
        reader = MemoryLLM(tmp_path / "home", embedder=fake_embedder, lock_timeout=0.2)
        assert reader.search("owls")[0].memory.text.startswith("Owls")
        assert reader.stats()["memories"] == 1
        reader.close()
    finally:
        db.rollback()
        db.close()


def test_a_writer_waits_for_the_lock_then_gives_a_clear_error(tmp_path, fake_embedder):
    m = MemoryLLM(tmp_path / "home", embedder=fake_embedder, lock_timeout=0.3)
    m.learn(text="Owls hunt at night in the forest.")
    db = hold_write_lock(tmp_path / "home")
    try:
        start = time.perf_counter()
        with pytest.raises(StoreError, match=r"is busy .* after waiting 0.3 s"):
            m.learn(text="Herons fish at dawn.")
        assert time.perf_counter() - start >= 0.25
        with pytest.raises(StoreError, match="is busy"):  # doctor's FTS check is a write: busy, not "corrupt"
            m.doctor()
    finally:
        db.rollback()
        db.close()
    assert m.learn(text="Herons fish at dawn.").chunks_added == 1 and m.stats()["memories"] == 2
    m.close()


def test_a_released_lock_within_the_timeout_is_waited_for(tmp_path, fake_embedder):
    m = MemoryLLM(tmp_path / "home", embedder=fake_embedder, lock_timeout=10)
    m.learn(text="Owls hunt at night in the forest.")
    db = hold_write_lock(tmp_path / "home")
    threading.Timer(0.5, db.rollback).start()
    assert m.learn(text="Herons fish at dawn.").chunks_added == 1  # waited, no error
    db.close()
    m.close()


def test_disk_full_during_learn_is_a_clear_error_and_changes_nothing(tmp_path, fake_embedder):
    m = MemoryLLM(tmp_path / "home", embedder=fake_embedder)
    m.learn(text="Owls hunt at night in the forest.")
    pages = m.store.db.execute("PRAGMA page_count").fetchone()[0]
    m.store.db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full from here on
    big = " ".join(f"Line{i} says a{i} b{i * 7} c{i * 13} d{i * 31}." for i in range(3000))
    with pytest.raises(StoreError, match="cannot write .*full.*nothing was changed"):
        m.learn(text=big)
    m.store.db.execute("PRAGMA max_page_count = 1073741823")
    assert m.stats()["memories"] == 1 and m.doctor()["healthy"]
    m.close()


def test_processes_learning_forgetting_and_searching_at_once_lose_nothing(tmp_path):
    result = trial_concurrency.run_round(tmp_path / "home", writers=3, readers=2, ops=6, consolidate=False)
    assert result["learned"] == 18 and result["forgot"] == 3 and result["queries"] > 0


def test_threads_learning_forgetting_and_searching_in_one_process(tmp_path, fake_embedder):
    m = MemoryLLM(tmp_path / "home", embedder=fake_embedder)
    m.learn(text="A seed memory about owls.", source="seed")
    errors, torn = [], []

    def writer(w: int) -> None:
        try:
            for op in range(25):
                m.learn(text=trial_concurrency.fact(w, op), source=f"w{w}-{op}")
                if op % 5 == 4:
                    m.forget(source=f"w{w}-{op}")
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            errors.append(repr(exc))

    def reader(r: int) -> None:
        try:
            for q in range(150):
                hits = m.search(f"Writer{q % 3} fact{q % 25} herons", 5)
                torn.extend(h.memory.text for h in hits if h.memory.source != "seed"
                            and not trial_concurrency.is_whole(h.memory.text))
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    threads += [threading.Thread(target=reader, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not torn
    stored = {s["uri"] for s in m.sources()}
    assert stored == {"seed"} | {f"w{w}-{op}" for w in range(3) for op in range(25) if op % 5 != 4}
    assert m.store.index().fingerprint() == m.store.sqlite_fingerprint() and m.doctor()["healthy"]
    m.close()



def test_temporary_index_files_of_killed_processes_are_removed(tmp_path, fake_embedder):
    m = MemoryLLM(tmp_path / "home", embedder=fake_embedder)
    m.learn(text="Owls hunt at night in the forest.")
    folder = m.store.index_path.parent
    dead, live = folder / ".index-99999999-x1", folder / f".index-{os.getpid()}-x2"
    dead.write_bytes(b"half an index")  # left by a kill -9 during a save
    live.write_bytes(b"being written")  # another live process is saving right now
    m.learn(text="Herons fish at dawn.")
    assert not dead.exists() and live.exists()
    m.close()
