"""The vector side of a Store: the index kept in step with SQLite, and dense search over it.

SQLite is the truth; the index holds its live memories (a superseded one leaves it, a restored one returns) and
is rebuilt from it whenever its fingerprint disagrees. A private index (FAISS):
each process keeps it in memory and follows its own writes; the generation counter in SQLite tells it when
another process wrote, and it reloads. A shared index (Milvus): every process writes to the one collection inside
its SQLite write transaction; another process's write only makes this one check the fingerprint again.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import numpy as np

from memory_llm.errors import StoreError
from memory_llm.store.backends import SHARED_BACKENDS, open_index
from memory_llm.store.db import Database, execute_in
from memory_llm.store.vectors import Fingerprint, Sampler, VectorIndex

logger = logging.getLogger(__name__)


class DenseIndex:
    """The vector index of one home, behind the VectorIndex protocol.

    Args:
        database: the home's SQLite database (the truth).
        path: where a FAISS index is saved.
        backend: one of store/backends.py BACKENDS.
        nprobe, exact_max: the index structure's settings (store/backends.py `open_index`).
        uri, token: Milvus: the server or embedded file, and its token.
    """

    def __init__(self, database: Database, path: Path, *, backend: str = "faiss", nprobe: int = 16,
                 exact_max: int = 50_000, uri: str = "", token: str = ""):
        self.database, self.path = database, path
        self.backend, self.nprobe, self.exact_max = backend, nprobe, exact_max
        self.uri, self.token = uri, token
        self.shared = backend in SHARED_BACKENDS
        self._collection: str | None = None
        self._index: VectorIndex | None = None
        self._generation = -1  # the SQLite generation self._index agrees with
        self._dirty = False  # this process changed the index since it was last saved

    @property
    def location(self) -> str:
        """Where the index lives, in words."""
        return f"Milvus collection {self.collection()} at {self.uri}" if self.shared else str(self.path)

    def collection(self) -> str:
        """The home's Milvus collection: named from a random id kept in SQLite and the home's resolved path, so
        homes share one server, and a copied home gets a collection of its own."""
        if self._collection is None:
            db = self.database
            with db.lock:
                home_id = db.meta("index_id")
                if home_id is None:
                    with self._write() as conn:
                        conn.execute("INSERT OR IGNORE INTO meta VALUES ('index_id', ?)", (uuid.uuid4().hex,))
                    home_id = db.meta("index_id")
            place = f"{home_id}:{Path(db.path).resolve().parent}"
            self._collection = "mllm_" + hashlib.sha256(place.encode()).hexdigest()[:16]
        return self._collection

    def sqlite_fingerprint(self) -> Fingerprint:
        """The fingerprint of the memory ids in SQLite (what the index must hold)."""
        with self.database.lock:
            row = self.database.conn.execute(
                "SELECT count(*), coalesce(sum(id), 0), coalesce(max(id), 0) FROM memories"
                " WHERE superseded_at IS NULL").fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def load(self) -> VectorIndex:
        """Open the saved index as it is; raises FileNotFoundError when nothing is saved, RuntimeError/OSError when
        it is unreadable, StoreError when the library is missing or a server fails."""
        return self._open(dim=None)

    def empty_kind(self) -> str:
        """The kind of index an empty home would get."""
        return "flat"  # every backend searches exactly while small (store/faiss_index.py `choose_kind`)

    def _open(self, dim: int | None, size: int = 0, sample: Sampler | None = None) -> VectorIndex:
        try:
            return open_index(self.path, backend=self.backend, dim=dim, size=size, sample=sample, nprobe=self.nprobe,
                              exact_max=self.exact_max, uri=self.uri, token=self.token,
                              collection=self.collection() if self.shared else "")
        except ImportError as exc:  # a backend's optional library: one line saying what to install
            raise StoreError(str(exc)) from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, or the one this thread is already in."""
        with self.database.lock:
            if self.database.conn.in_transaction:
                yield self.database.conn
            else:
                with self.database.write() as conn:
                    yield conn

    def _replace(self, index: VectorIndex | None, generation: int) -> None:
        if self._index is not None and self._index is not index:
            self._index.close()
        self._index, self._generation = index, generation

    def index(self) -> VectorIndex | None:
        """The vector index, in step with SQLite: loaded (or, shared, re-checked) if it agrees, else rebuilt."""
        db = self.database
        with db.lock:
            gen = db.generation()
            if self._index is not None and gen == self._generation:
                return self._index
            dim = int(db.meta("dim") or 0)
            if not dim:
                return None
            index = self._index if self.shared else None  # a shared index has nothing to reload: re-check it
            if index is None:
                try:
                    index = self.load()
                except FileNotFoundError:
                    pass
                except (RuntimeError, OSError):
                    logger.warning("vector index %s is unreadable; rebuilding it from SQLite", self.location)
            if index is not None and not self._agrees(index, dim):
                if self.shared:  # a writer may be between its Milvus write and its commit: look again under the lock
                    with self._write():
                        if not self._agrees(index, dim):
                            logger.warning("vector index disagrees with SQLite; rebuilding it")
                            if index is not self._index:
                                index.close()
                            return self.rebuild(dim)
                        gen = db.generation()
                else:
                    logger.warning("vector index disagrees with SQLite; rebuilding it")
                    index = None
            if index is None:
                return self.rebuild(dim)
            self._replace(index, gen)
            return index

    def _agrees(self, index: VectorIndex, dim: int) -> bool:
        expected = self.sqlite_fingerprint()
        matches = getattr(index, "matches", None)  # a backend's quicker check (Milvus: no reading of every id)
        agrees = matches(expected) if matches is not None else index.fingerprint() == expected
        return agrees and index.dim == dim and index.fits(len(index))

    def rebuild(self, dim: int | None = None) -> VectorIndex:
        """Build the index from the embeddings in SQLite and save it: a shared one under the write lock, so no
        write lands in between; a private one from one read snapshot (the ids, embeddings and generation agree),
        saved under the write lock only if no write landed since (else the newer writer's save stands)."""
        db = self.database
        with db.lock, (self._write() if self.shared else self._snapshot()):
            dim = dim or int(db.meta("dim") or 0)
            gen = db.generation()
            n = db.conn.execute("SELECT count(*) FROM memories WHERE superseded_at IS NULL").fetchone()[0]

            def sample(limit: int) -> np.ndarray:
                rows = db.conn.execute("SELECT embedding FROM memories WHERE superseded_at IS NULL"
                                       " ORDER BY random() LIMIT ?", (limit,)).fetchall()
                return np.frombuffer(b"".join(r[0] for r in rows), dtype=np.float32).reshape(len(rows), dim)

            if self._index is not None:
                self._index.close()
                self._index = None
            index = self._open(dim, n, sample)
            cur = db.conn.execute("SELECT id, namespace, embedding FROM memories WHERE superseded_at IS NULL ORDER BY id")
            while rows := cur.fetchmany(20_000):
                ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                vecs = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), dim)
                index.add(ids, vecs, [r[1] for r in rows])
            if self.shared:
                index.save(self.path)
        if not self.shared:
            try:
                with db.lock, self._write():
                    if db.generation() == gen:
                        index.save(self.path)
            except StoreError as exc:  # writers kept the lock past lock_timeout: the file stays behind
                logger.warning("vector index not saved (%s); it is brought up to date when next opened", exc)
        self._replace(index, gen)
        return index

    @contextmanager
    def _snapshot(self) -> Iterator[None]:
        """One read transaction (WAL: a consistent snapshot while writers go on), or the one already open."""
        conn = self.database.conn
        if conn.in_transaction:
            yield
            return
        conn.execute("BEGIN")
        try:
            yield
        finally:
            conn.execute("COMMIT")

    def prepare_write(self) -> None:
        """Before a write transaction: a shared index must be open to take the write inside it."""
        if self.shared:
            self.index()

    def write_shared(self, added: tuple[list[int], list[np.ndarray]], removed: list[int], namespace: str) -> None:
        """Inside the write transaction: apply the write to a shared index (its failure rolls SQLite back too)."""
        with self.database.lock:
            index = self._index
            if index is None or not index.shared:
                return  # a private index follows after the commit (after_write); none open: checked at next use
            try:
                if removed:
                    index.remove(np.asarray(removed, dtype=np.int64))
                if added[0]:
                    index.add(np.asarray(added[0], dtype=np.int64), np.vstack(added[1]), [namespace] * len(added[0]))
            except BaseException:
                self._replace(None, -1)  # partly applied: checked against SQLite at the next use
                raise

    def after_write(self, prev_generation: int, added: tuple[list[int], list[np.ndarray]],
                    removed: list[int]) -> None:
        """Apply a committed write to the in-memory index, or drop it when it cannot follow."""
        with self.database.lock:
            self._dirty = True
            index = self._index
            if index is None:
                return
            if index.shared:  # write_shared applied it already
                if not index.fits(len(index)):
                    self._replace(None, -1)  # rebuilt in the structure that fits at the next use
                elif self._generation == prev_generation:
                    self._generation = prev_generation + 1
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
            if self._index is not None:
                try:  # a private index is saved inside a write transaction: no other process commits between
                    # the check and the save, so the file never goes back to an older generation
                    with nullcontext() if self._index.shared else self.database.write():
                        if self._generation == self.database.generation():
                            self._index.save(self.path)
                            return
                except StoreError as exc:  # writers kept the lock past lock_timeout: the file stays behind
                    logger.warning("vector index not saved (%s); it is brought up to date when next opened", exc)
                    return
            index = self.index()  # reloads or rebuilds (a rebuild saves itself)
            if index is not None and index.shared:
                index.save(self.path)

    def close(self) -> None:
        """Release the index (a Milvus connection; an embedded Milvus Lite file for other processes)."""
        with self.database.lock:
            self._replace(None, -1)

    # ---- search -------------------------------------------------------------------------------------
    def search(self, query: np.ndarray, k: int, namespace: str | None = None) -> list[tuple[int, float]]:
        """Top-k memory ids by cosine similarity, within a namespace if given."""
        index = self.index()
        if index is None or not len(index):
            return []
        if namespace is not None and index.filters:  # the engine filters: no over-fetch, no SQLite pass
            with self.database.lock:
                ids, scores = index.search(query, k, namespace)
            return list(zip(ids.tolist(), scores.tolist()))[:k]
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

    def neighbours(self, vectors: np.ndarray, k: int, namespace: str,
                   exclude: set[int]) -> list[list[tuple[int, float]]]:
        """For each vector, up to k nearest live memories of the namespace outside `exclude`: (id, cosine), best
        first."""
        index = self.index()
        out: list[list[tuple[int, float]]] = [[] for _ in range(len(vectors))]
        if index is None or not len(index) or not len(vectors):
            return out
        alone = index.filters or self.single_namespace() == namespace  # no other namespace's vector competes
        with self.database.lock:
            ids, scores = index.search_many(vectors, (k if alone else 8 * k) + len(exclude),
                                            namespace if index.filters else None)
        flat = [int(i) for i in ids.ravel() if i >= 0]
        allowed = set(flat) if alone else self._in_namespace(sorted(set(flat)), namespace)
        for r in range(len(vectors)):
            out[r] = [(int(i), float(sc)) for i, sc in zip(ids[r], scores[r])
                      if i >= 0 and int(i) in allowed and int(i) not in exclude][:k]
        return out

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
            rows = self.database.conn.execute("SELECT id, embedding FROM memories WHERE namespace = ? AND"
                                              " superseded_at IS NULL", (namespace,)).fetchall()
        if not rows:
            return []
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
        scores = vecs @ np.asarray(query, dtype=np.float32).reshape(-1)
        order = np.argsort(-scores)[:k]
        return [(rows[i][0], float(scores[i])) for i in order]
