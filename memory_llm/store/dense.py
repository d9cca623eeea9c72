"""The vector side of a Store: the index kept in step with SQLite, and dense search over it.

SQLite is the truth; the index is rebuilt from it whenever its fingerprint disagrees. Each process keeps the
index in memory and follows its own writes; the generation counter in SQLite tells it when another process
wrote, and it reloads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from memory_llm.store.db import Database, execute_in
from memory_llm.store.backends import open_index
from memory_llm.store.vectors import Fingerprint, Sampler, VectorIndex

logger = logging.getLogger(__name__)


class DenseIndex:
    """The vector index of one home, behind the VectorIndex protocol."""

    def __init__(self, database: Database, path: Path, *, backend: str = "faiss", nprobe: int = 16,
                 exact_max: int = 50_000):
        self.database, self.path = database, path
        self.backend, self.nprobe, self.exact_max = backend, nprobe, exact_max
        self._index: VectorIndex | None = None
        self._generation = -1  # the SQLite generation self._index agrees with
        self._dirty = False  # this process changed the index since it was last saved

    def sqlite_fingerprint(self) -> Fingerprint:
        """The fingerprint of the memory ids in SQLite (what the index must hold)."""
        with self.database.lock:
            row = self.database.conn.execute(
                "SELECT count(*), coalesce(sum(id), 0), coalesce(max(id), 0) FROM memories").fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def load(self) -> VectorIndex:
        """Read the saved index as it is; raises RuntimeError/OSError when it is missing or unreadable."""
        return open_index(self.path, backend=self.backend, nprobe=self.nprobe, exact_max=self.exact_max)

    def empty_kind(self) -> str:
        """The kind of index an empty home would get."""
        return self._new(dim=1, size=0).kind

    def _new(self, dim: int, size: int, sample: Sampler | None = None) -> VectorIndex:
        return open_index(self.path, backend=self.backend, dim=dim, size=size, sample=sample, nprobe=self.nprobe,
                          exact_max=self.exact_max)

    def index(self) -> VectorIndex | None:
        """The vector index, in step with SQLite: loaded from disk if it agrees, else rebuilt and saved."""
        db = self.database
        with db.lock:
            gen = db.generation()
            if self._index is not None and gen == self._generation:
                return self._index
            dim = int(db.meta("dim") or 0)
            if not dim:
                return None
            expected = self.sqlite_fingerprint()
            index = None
            if self.path.exists():
                try:
                    index = self.load()
                except (RuntimeError, OSError):
                    logger.warning("vector index %s is unreadable; rebuilding it from SQLite", self.path)
                if index is not None and (index.fingerprint() != expected or index.dim != dim
                                          or not index.fits(len(index))):
                    logger.warning("vector index disagrees with SQLite; rebuilding it")
                    index = None
            if index is None:
                index = self.rebuild(dim)
            self._index, self._generation = index, gen
            return index

    def rebuild(self, dim: int | None = None) -> VectorIndex:
        """Build the index from the embeddings in SQLite and save it atomically."""
        db = self.database
        with db.lock:
            dim = dim or int(db.meta("dim") or 0)
            n = db.conn.execute("SELECT count(*) FROM memories").fetchone()[0]

            def sample(limit: int) -> np.ndarray:
                rows = db.conn.execute("SELECT embedding FROM memories ORDER BY random() LIMIT ?", (limit,)).fetchall()
                return np.frombuffer(b"".join(r[0] for r in rows), dtype=np.float32).reshape(len(rows), dim)

            index = self._new(dim, n, sample)
            cur = db.conn.execute("SELECT id, embedding FROM memories ORDER BY id")
            while rows := cur.fetchmany(20_000):
                ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
                index.add(ids, vecs)
            index.save(self.path)
            self._index, self._generation = index, db.generation()
            return index

    def after_write(self, prev_generation: int, added: tuple[list[int], list[np.ndarray]],
                    removed: list[int]) -> None:
        """Apply a committed write to the in-memory index, or drop it when it cannot follow."""
        with self.database.lock:
            self._dirty = True
            index = self._index
            if index is None:
                return
            if self._generation != prev_generation:  # another writer got in between: reload later
                self._index = None
                return
            ok = not removed or index.remove(np.asarray(removed, dtype=np.int64))
            if not ok or not index.fits(len(index) + len(added[0])):
                self._index = None  # rebuilt from SQLite at the next use
                return
            if added[0]:
                index.add(np.asarray(added[0], dtype=np.int64), np.vstack(added[1]))
            self._generation = prev_generation + 1

    def flush(self) -> None:
        """Save the index if this process changed it (once per batch of writes, not per file)."""
        with self.database.lock:
            if not self._dirty:
                return
            self._dirty = False
            if self._index is not None and self._generation == self.database.generation():
                self._index.save(self.path)
            else:
                self.index()  # reloads or rebuilds (a rebuild saves itself)

    # ---- search -------------------------------------------------------------------------------------
    def search(self, query: np.ndarray, k: int, namespace: str | None = None) -> list[tuple[int, float]]:
        """Top-k memory ids by cosine similarity, within a namespace if given."""
        index = self.index()
        if index is None or not len(index):
            return []
        fetch = k if namespace is None or self.single_namespace() == namespace else k * 8
        with self.database.lock:  # FAISS releases the GIL: a search must not overlap another thread's add/remove
            ids, scores = index.search(query, fetch)
        hits = list(zip(ids.tolist(), scores.tolist()))
        if namespace is not None and fetch != k:
            allowed = self._in_namespace([i for i, _ in hits], namespace)
            hits = [(i, s) for i, s in hits if i in allowed]
            if len(hits) < k and len(ids) == fetch:
                hits = self._exact_in_namespace(query, k, namespace)
        return hits[:k]

    def nearest_scores(self, vectors: np.ndarray, k: int, namespace: str, exclude: set[int]) -> np.ndarray:
        """For each vector, the best cosine to a stored memory of the namespace outside `exclude` (or -1)."""
        index = self.index()
        best = np.full(len(vectors), -1.0, dtype=np.float32)
        if index is None or not len(index) or not len(vectors):
            return best
        with self.database.lock:
            ids, scores = index.search_many(vectors, k + len(exclude))
        flat = [int(i) for i in ids.ravel() if i >= 0]
        allowed = set(flat) if self.single_namespace() == namespace else self._in_namespace(sorted(set(flat)), namespace)
        for r in range(len(vectors)):
            for i, sc in zip(ids[r], scores[r]):
                if i >= 0 and int(i) in allowed and int(i) not in exclude:
                    best[r] = sc
                    break
        return best

    def single_namespace(self) -> str | None:
        """The home's only namespace, or None when it has none or several."""
        with self.database.lock:
            rows = self.database.conn.execute("SELECT DISTINCT namespace FROM sources LIMIT 2").fetchall()
        return rows[0][0] if len(rows) == 1 else None

    def _in_namespace(self, ids: list[int], namespace: str) -> set[int]:
        with self.database.lock:
            rows = execute_in(self.database.conn, "SELECT id FROM memories WHERE namespace = ? AND id IN ({marks})",
                              ids, [namespace])
        return {r[0] for r in rows}

    def _exact_in_namespace(self, query: np.ndarray, k: int, namespace: str) -> list[tuple[int, float]]:
        with self.database.lock:
            rows = self.database.conn.execute("SELECT id, embedding FROM memories WHERE namespace = ?",
                                              (namespace,)).fetchall()
        if not rows:
            return []
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
        scores = vecs @ np.asarray(query, dtype=np.float32).reshape(-1)
        order = np.argsort(-scores)[:k]
        return [(rows[i][0], float(scores[i])) for i in order]
