"""Consolidation's records: the training items synthesized from memories, and the ledger of which adapter
version learned which memory."""

from __future__ import annotations

import time
from typing import Iterable

from memory_llm.store.db import Database, execute_in
from memory_llm.store.records import Item


class TrainingRecords:
    """Training items and the ledger of one home."""

    def __init__(self, database: Database):
        self.database = database

    def add_items(self, memory_id: int, namespace: str, items: Iterable[Item], text_hash: str | None = None) -> None:
        """Store one memory's synthesized items in one transaction (a killed run keeps finished memories).

        Replaces the memory's earlier items; sets each item's `id`; `text_hash` names the text they were made from
        (`synthesized_from`). Nothing is stored for a memory forgotten meanwhile.
        """
        now = time.time()
        with self.database.write() as db:
            if db.execute("SELECT 1 FROM memories WHERE id = ?", (memory_id,)).fetchone() is None:
                return  # forgotten meanwhile
            db.execute("DELETE FROM training_items WHERE memory_id = ?", (memory_id,))
            for it in items:
                cur = db.execute("INSERT INTO training_items (memory_id, namespace, kind, prompt, answer, held_out,"
                                 " created_at, text_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 (memory_id, namespace, it.kind, it.prompt, it.answer, int(it.held_out), now,
                                  text_hash))
                it.id = cur.lastrowid

    def items(self, memory_ids: Iterable[int]) -> list[Item]:
        """The stored training items of these memories."""
        with self.database.lock:
            rows = execute_in(self.database.conn, "SELECT id, memory_id, kind, prompt, answer, held_out"
                              " FROM training_items WHERE memory_id IN ({marks}) ORDER BY id", list(memory_ids))
        return [Item(r[1], r[2], r[3], r[4], bool(r[5]), r[0]) for r in rows]

    def synthesized_from(self, memory_ids: Iterable[int]) -> dict[int, str | None]:
        """The text hash each memory's stored items were made from (None: not recorded, items made before), for
        the memories that have items."""
        with self.database.lock:
            rows = execute_in(self.database.conn, "SELECT memory_id, max(text_hash) FROM training_items WHERE"
                              " memory_id IN ({marks}) GROUP BY memory_id", list(memory_ids))
        return {r[0]: r[1] for r in rows}

    def memories_with_items(self, memory_ids: Iterable[int]) -> set[int]:
        """Which of these memories have training items stored."""
        with self.database.lock:
            rows = execute_in(self.database.conn,
                              "SELECT DISTINCT memory_id FROM training_items WHERE memory_id IN ({marks})",
                              list(memory_ids))
        return {r[0] for r in rows}

    def record_ledger(self, version: str, memory_ids: Iterable[int]) -> None:
        """Note that adapter `version` learned these memories."""
        now = time.time()
        with self.database.write() as db:
            db.executemany("INSERT OR IGNORE INTO ledger VALUES (?, ?, ?)", [(int(i), version, now) for i in memory_ids])

    def ledger(self, version: str | None = None) -> list[tuple[int, str]]:
        """(memory id, adapter version) pairs, of one version if given, by memory id."""
        sql = "SELECT memory_id, adapter_version FROM ledger" + (" WHERE adapter_version = ?" if version else "")
        with self.database.lock:
            return [(r[0], r[1]) for r in self.database.conn.execute(sql + " ORDER BY memory_id",
                                                                      [version] if version else [])]
