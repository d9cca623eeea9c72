"""Writes that change which memories are live: a source's chunks stored in place of its old ones, supersessions
recorded and reverted, memories forgotten. Each is ONE SQLite transaction kept in step with the vector index
(store/dense.py: written while the transaction is open, published after it commits)."""

from __future__ import annotations

import time
from typing import Mapping, Sequence

import numpy as np

from memory_llm.errors import InputError
from memory_llm.store.db import Database, execute_in
from memory_llm.store.dense import DenseIndex
from memory_llm.store.prompts import PromptRecords
from memory_llm.store.records import NewChunk
from memory_llm.store.sources import forget_filter
from memory_llm.store.supersessions import Supersession, SupersessionRecords


class MemoryWrites:
    """The Store's writes of memories (store/sqlite.py delegates to it)."""

    def __init__(self, database: Database, vectors: DenseIndex, supersessions: SupersessionRecords,
                 prompts: PromptRecords):
        self._database, self.vectors, self.supersessions, self.prompts = database, vectors, supersessions, prompts

    def replace_source(self, namespace: str, uri: str, content_hash: str, chunks: Sequence[NewChunk], *,
                       kept: Mapping[int, int] | None = None, supersessions: Sequence[Supersession] = (),
                       valid_from: float | None = None, reason: str = "source") -> list[int]:
        """Store a source's chunks in ONE transaction, in place of what the source had before.

        Args:
            kept: the source's live memories that stay as they are (their text is unchanged): id → new position.
            supersessions: what the new chunks supersede (`new_chunk`: the index of the chunk among `chunks`, whose
                id is set in `new_id`; memories of other sources too). The source's other live memories are
                superseded for `reason`, with no successor: nothing stored is deleted, superseded memories leave
                retrieval. (`old_chunk` names a new chunk as the one superseded.)
            valid_from: when what the chunks say became true, where a chunk does not say (default: now).
        Returns:
            The new memories' ids, in chunk order.
        """
        now = time.time()
        kept = dict(kept or {})
        self.vectors.prepare_write()
        with self._database.write() as db:
            row = db.execute("SELECT id FROM sources WHERE namespace = ? AND uri = ?", (namespace, uri)).fetchone()
            if row is None:
                source_id = db.execute("INSERT INTO sources (namespace, uri, content_hash, created_at) VALUES"
                                       " (?, ?, ?, ?)", (namespace, uri, content_hash, now)).lastrowid
            else:
                source_id = row[0]
                db.execute("UPDATE sources SET content_hash = ?, created_at = ? WHERE id = ?",
                           (content_hash, now, source_id))
            old = [r[0] for r in db.execute("SELECT id FROM memories WHERE source_id = ? AND superseded_at IS NULL",
                                            (source_id,))]
            ids = []
            for c in chunks:
                cur = db.execute(
                    "INSERT INTO memories (source_id, namespace, position, text, content_hash, created_at, valid_from,"
                    " embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (source_id, namespace, c.position, c.text, c.content_hash, now,
                     c.valid_from if c.valid_from is not None else now if valid_from is None else valid_from,
                     np.asarray(c.vector, dtype=np.float32).tobytes()))
                ids.append(cur.lastrowid)
            for memory_id, position in kept.items():
                db.execute("UPDATE memories SET position = ? WHERE id = ? AND source_id = ?",
                           (position, memory_id, source_id))
            for x in supersessions:  # the caller's plan gets the new memories' ids
                x.new_id = ids[x.new_chunk] if x.new_chunk is not None else x.new_id
                x.old_id = ids[x.old_chunk] if x.old_chunk is not None else x.old_id
            named = {x.old_id for x in supersessions if x.sentence is None}
            gone = self.supersessions.add(db, namespace, [*supersessions, *(
                Supersession(i, None, reason) for i in old if i not in kept and i not in named)], now)
            prev = self._database.bump_generation()
            fresh = [(i, c.vector) for i, c in zip(ids, chunks) if i not in gone]  # (a new chunk may be superseded
            added = ([i for i, _ in fresh], [v for _, v in fresh])  # on arrival: older than what it restates)
            removed = [i for i in gone if i not in set(ids)]
            self.vectors.write_shared(added, removed, namespace)
        self.vectors.after_write(prev, added=added, removed=removed)
        return ids

    def supersede(self, namespace: str, supersessions: Sequence[Supersession]) -> list[Supersession]:
        """Record supersessions between stored memories in one transaction (memories superseded as a whole leave
        retrieval). Returns them with their ids."""
        if not supersessions:
            return []
        now = time.time()
        self.vectors.prepare_write()
        with self._database.write() as db:
            gone = self.supersessions.add(db, namespace, supersessions, now)
            prev = self._database.bump_generation()
            self.vectors.write_shared(([], []), gone, namespace)
        self.vectors.after_write(prev, added=([], []), removed=gone)
        return list(supersessions)

    def restore(self, memory_id: int) -> list[Supersession]:
        """Make a superseded memory live and whole again (its supersessions reverted, kept in its history; the
        exemplars they retired return). Returns the reverted supersessions."""
        now = time.time()
        self.vectors.prepare_write()
        with self._database.write() as db:
            row = db.execute("SELECT namespace, superseded_at, embedding FROM memories WHERE id = ?",
                             (memory_id,)).fetchone()
            if row is None:
                raise InputError(f"no memory has id {memory_id}")
            reverted = self.supersessions.revert(db, memory_id, now)
            self.prompts.unretire(db, [r.id for r in reverted])
            back = ([memory_id], [np.frombuffer(row[2], dtype=np.float32)]) if row[1] is not None else ([], [])
            prev = self._database.bump_generation()
            self.vectors.write_shared(back, [], row[0])
        self.vectors.after_write(prev, added=back, removed=[])
        return reverted

    def forget(self, *, ids: Sequence[int] = (), source: str | None = None, namespace: str | None = None,
               everything: bool = False, superseded: bool = False) -> int:
        """Delete memories by id, by source uri, or all (optionally within a namespace), superseded ones included;
        with `superseded`, only the superseded ones (of the namespace, if given). Returns the count."""
        self.vectors.prepare_write()
        with self._database.write() as db:
            if superseded:
                where, args = forget_filter(ids, source, namespace, True)
                where, args = f"({where}) AND m.superseded_at IS NOT NULL", args
            else:
                where, args = forget_filter(ids, source, namespace, everything)
            found = db.execute(f"SELECT m.id, m.superseded_at FROM memories m JOIN sources s ON s.id = m.source_id"
                               f" WHERE {where}", args).fetchall()
            gone = [r[0] for r in found]
            indexed = [r[0] for r in found if r[1] is None]  # superseded memories are out of the index already
            if gone:
                execute_in(db, "DELETE FROM memories WHERE id IN ({marks})", gone)
                self.supersessions.forget(db, gone)
                db.execute("DELETE FROM sources WHERE id NOT IN (SELECT DISTINCT source_id FROM memories)")
                prev = self._database.bump_generation()
                self.vectors.write_shared(([], []), indexed, "")
        if gone:
            self.vectors.after_write(prev, added=([], []), removed=indexed)
        return len(gone)
