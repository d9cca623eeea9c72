"""Supersession records: which memory replaced which, when and why, and the reversals.

A memory superseded as a whole keeps its row (its text, embedding and training items) with `superseded_at` set: it
leaves the vector index and lexical search (store/dense.py holds live memories only) and returns when the
supersession is reverted. A supersession with a `sentence` retires that sentence of a memory whose other sentences
stay true (a note of several facts, one of them restated elsewhere): the memory stays live and is shown without
it. Every row is kept when reverted (`reverted_at`), so a memory's history reads in full.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from memory_llm.store.db import Database, execute_in
from memory_llm.store.records import iso_time

REASONS = ("source", "key", "user", "update", "correction", "detected")


@dataclass
class Supersession:
    """One memory (or one sentence of it) made stale by another. `new_id` None: retired with no successor (a chunk
    gone from its edited file); `sentence` None: the whole memory."""

    old_id: int
    new_id: int | None
    reason: str
    sentence: str | None = None
    detail: dict = field(default_factory=dict)
    new_chunk: int | None = None  # while planned by a learn: the new memory as its index among the source's chunks
    old_chunk: int | None = None  # ... or the old one (a new memory older than what it restates is superseded)
    id: int | None = None
    namespace: str = ""
    created_at: float = 0.0
    reverted_at: float | None = None

    def as_dict(self) -> dict:
        return {"id": self.id, "old_id": self.old_id, "new_id": self.new_id, "reason": self.reason,
                "sentence": self.sentence, "detail": self.detail, "namespace": self.namespace,
                "created_at": iso_time(self.created_at), "reverted_at": iso_time(self.reverted_at)}


_COLUMNS = "id, namespace, old_id, new_id, sentence, reason, detail, created_at, reverted_at"


def _row(r: Sequence) -> Supersession:
    return Supersession(old_id=r[2], new_id=r[3], reason=r[5], sentence=r[4], detail=json.loads(r[6] or "{}"),
                        id=r[0], namespace=r[1], created_at=r[7], reverted_at=r[8])


class SupersessionRecords:
    """The supersessions of one home (rows written inside the Store's write transactions)."""

    def __init__(self, database: Database):
        self.database = database

    @staticmethod
    def add(db: sqlite3.Connection, namespace: str, items: Iterable[Supersession], now: float) -> list[int]:
        """Inside a write transaction: record supersessions and mark the memories superseded as a whole. Returns
        the ids of memories that left retrieval (newly superseded as a whole)."""
        gone: list[int] = []
        for s in items:
            if s.old_id == s.new_id:
                raise ValueError(f"memory {s.old_id} cannot supersede itself")
            if s.reason not in REASONS:
                raise ValueError(f"unknown supersession reason {s.reason!r}")
            cur = db.execute("INSERT INTO supersessions (namespace, old_id, new_id, sentence, reason, detail,"
                             " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (namespace, s.old_id, s.new_id, s.sentence, s.reason, json.dumps(s.detail), now))
            s.id, s.namespace, s.created_at = cur.lastrowid, namespace, now
            if s.sentence is None:
                cur = db.execute("UPDATE memories SET superseded_at = ? WHERE id = ? AND superseded_at IS NULL",
                                 (now, s.old_id))
                if cur.rowcount:
                    gone.append(s.old_id)
        return gone

    @staticmethod
    def revert(db: sqlite3.Connection, memory_id: int, now: float) -> list[Supersession]:
        """Inside a write transaction: revert every standing supersession of a memory (it is live and whole
        again). Returns the reverted rows."""
        rows = [_row(r) for r in db.execute(f"SELECT {_COLUMNS} FROM supersessions WHERE old_id = ? AND"
                                            " reverted_at IS NULL ORDER BY id", (memory_id,))]
        if rows:
            db.execute("UPDATE supersessions SET reverted_at = ? WHERE old_id = ? AND reverted_at IS NULL",
                       (now, memory_id))
        db.execute("UPDATE memories SET superseded_at = NULL WHERE id = ?", (memory_id,))
        for r in rows:
            r.reverted_at = now
        return rows

    @staticmethod
    def forget(db: sqlite3.Connection, memory_ids: Sequence[int]) -> None:
        """Inside a write transaction: drop the rows of forgotten memories' own supersessions (their sentences
        hold the forgotten text); a successor forgotten leaves its predecessor superseded."""
        execute_in(db, "DELETE FROM supersessions WHERE old_id IN ({marks})", list(memory_ids))

    def standing(self, memory_ids: Iterable[int]) -> dict[int, list[Supersession]]:
        """The standing (not reverted) supersessions of these memories, by memory id, oldest first."""
        with self.database.lock:
            rows = execute_in(self.database.conn, f"SELECT {_COLUMNS} FROM supersessions WHERE reverted_at IS NULL"
                              " AND old_id IN ({marks}) ORDER BY id", list(memory_ids))
        out: dict[int, list[Supersession]] = {}
        for r in rows:
            out.setdefault(r[2], []).append(_row(r))
        return out

    def stale_sentences(self, memory_ids: Iterable[int]) -> dict[int, list[str]]:
        """The superseded sentences of memories that otherwise stay live, by memory id."""
        with self.database.lock:
            rows = execute_in(self.database.conn, "SELECT old_id, sentence FROM supersessions WHERE reverted_at IS"
                              " NULL AND sentence IS NOT NULL AND old_id IN ({marks}) ORDER BY id", list(memory_ids))
        out: dict[int, list[str]] = {}
        for old, sentence in rows:
            out.setdefault(old, []).append(sentence)
        return out

    def involving(self, memory_id: int) -> list[Supersession]:
        """Every supersession (reverted ones too) in which the memory is the old or the new one, oldest first."""
        with self.database.lock:
            rows = self.database.conn.execute(f"SELECT {_COLUMNS} FROM supersessions WHERE old_id = ? OR new_id = ?"
                                              " ORDER BY id", (memory_id, memory_id)).fetchall()
        return [_row(r) for r in rows]

    def stale_ids(self, memory_ids: Iterable[int]) -> set[int]:
        """Which of these memories hold something no longer true: superseded (whole or a sentence) or gone."""
        ids = sorted({int(i) for i in memory_ids})
        with self.database.lock:
            live = {r[0] for r in execute_in(self.database.conn, "SELECT id FROM memories WHERE superseded_at IS NULL"
                                             " AND id IN ({marks})", ids)}
            partial = {r[0] for r in execute_in(self.database.conn, "SELECT DISTINCT old_id FROM supersessions"
                                                " WHERE reverted_at IS NULL AND old_id IN ({marks})", ids)}
        return {i for i in ids if i not in live or i in partial}
