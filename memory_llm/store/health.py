"""`mllm doctor`: health checks of a home, and the repairs SQLite makes possible."""

from __future__ import annotations

import sqlite3

from memory_llm.errors import StoreError
from memory_llm.store.db import Database, is_busy
from memory_llm.store.dense import DenseIndex


def check(database: Database, dense: DenseIndex) -> list[dict]:
    """Health checks: SQLite integrity, FTS5 agreement, embedding sizes, index/SQLite agreement.

    Returns:
        One dict per check: check (its name), ok, detail (a sentence), repairable (`repair` can fix it).
    """
    results = []
    db = database.conn
    with database.lock:
        try:
            rows = [r[0] for r in db.execute("PRAGMA integrity_check").fetchall()]
        except sqlite3.DatabaseError as exc:
            rows = [str(exc)]
        if rows != ["ok"]:  # nothing else can be trusted (or even read) in a damaged file
            return [_result("sqlite", False, "the database file is damaged (" + "; ".join(rows[:3]) + "); restore"
                            " memory.sqlite from a backup")]
        results.append(_result("sqlite", True, "integrity ok"))
        try:
            db.execute("INSERT INTO memories_fts(memories_fts, rank) VALUES ('integrity-check', 1)")
            results.append(_result("fts", True, "full-text index agrees with memories"))
        except sqlite3.OperationalError as exc:
            if is_busy(exc):  # the check is a write: waiting past lock_timeout is not a broken index
                raise StoreError(database.busy_message(exc)) from None
            results.append(_result("fts", False, f"full-text index disagrees with memories ({exc})", True))
        except sqlite3.DatabaseError as exc:
            results.append(_result("fts", False, f"full-text index disagrees with memories ({exc})", True))
        dim = int(database.meta("dim") or 0)
        bad = db.execute("SELECT count(*) FROM memories WHERE length(embedding) != ?", (dim * 4,)).fetchone()[0]
        results.append(_result("embeddings", bad == 0, f"{bad} embedding(s) of the wrong size" if bad
                               else f"all embeddings have dim {dim}"))
        expected = dense.sqlite_fingerprint()
    if not dim:
        results.append(_result("index", True, "empty home, no index yet"))
        return results
    try:
        on_disk = dense.load()
        try:
            agrees = on_disk.fingerprint() == expected
            results.append(_result("index", agrees, f"{len(on_disk)} vectors agree with SQLite" if agrees
                                   else f"index holds {len(on_disk)} vectors, SQLite {expected[0]} memories", True))
        finally:
            on_disk.close()  # a Milvus connection (an embedded file another process may want)
    except (RuntimeError, OSError):
        results.append(_result("index", False, f"{dense.location} is missing or unreadable", True))
    return results


def repair(database: Database, dense: DenseIndex) -> list[str]:
    """Repair what can be repaired from SQLite: the FTS5 table and the vector index. Returns what was done."""
    done = []
    with database.write() as db:
        db.execute("INSERT INTO memories_fts(memories_fts) VALUES ('rebuild')")
    done.append("rebuilt the full-text index from memories")
    if database.meta("dim"):
        index = dense.rebuild()
        done.append(f"rebuilt the vector index from SQLite ({len(index)} vectors)")
    return done


def _result(name: str, ok: bool, detail: str, repairable: bool = False) -> dict:
    return {"check": name, "ok": ok, "detail": detail, "repairable": repairable and not ok}
