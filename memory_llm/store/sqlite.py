"""SQLite store: memories, sources, FTS5, embeddings. The single source of truth of a memory home."""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from memory_llm.errors import InputError, StoreError
from memory_llm.store.migrations import MIGRATIONS, SCHEMA_VERSION
from memory_llm.store.prompts import PromptRecords
from memory_llm.store.vectors import FaissIndex, choose_kind, ivf_nlist, needs_rebuild

logger = logging.getLogger(__name__)

DB_NAME = "memory.sqlite"
INDEX_NAME = "index/vectors.faiss"
LEXICAL_TERMS = 64


@dataclass
class Memory:
    id: int
    namespace: str
    source: str
    position: int
    text: str
    created_at: float


@dataclass
class Hit:
    """A retrieved memory with its fused score and the ranks that produced it."""

    memory: Memory
    score: float
    dense_rank: int | None = None
    lexical_rank: int | None = None

    def as_dict(self) -> dict:
        m = self.memory
        return {"id": m.id, "source": m.source, "position": m.position, "namespace": m.namespace,
                "score": round(self.score, 6), "dense_rank": self.dense_rank,
                "lexical_rank": self.lexical_rank, "text": m.text}


@dataclass
class NewChunk:
    position: int
    text: str
    content_hash: str
    vector: np.ndarray


class Store(PromptRecords):
    """One memory home on disk. Thread-safe: one connection, guarded by a lock; readers share the index.
    The prompt library's records (templates, exemplars, answer log) are in store/prompts.py."""

    def __init__(self, home: Path, *, lock_timeout: float = 30.0, exact_index_max: int = 50_000,
                 ivf_nprobe: int = 16):
        self.home = Path(home)
        self.exact_index_max, self.ivf_nprobe = exact_index_max, ivf_nprobe
        _make_private_dir(self.home)
        self.path = self.home / DB_NAME
        self.lock_timeout = lock_timeout
        self._lock = threading.RLock()
        try:
            self.db = sqlite3.connect(self.path, timeout=lock_timeout, check_same_thread=False,
                                      isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("PRAGMA synchronous=NORMAL")
            try:
                os.chmod(self.path, 0o600)
            except OSError:  # not our file (e.g. a shared read-only home): it still opens
                logger.debug("cannot make %s private", self.path)
            self._migrate()
        except sqlite3.DatabaseError as exc:
            hint = "" if _is_busy(exc) else "; run `mllm doctor`"
            raise StoreError(f"{self.path}: cannot open the memory database ({exc}){hint}") from None
        self._index: FaissIndex | None = None
        self._index_generation = -1

    # ---- schema -------------------------------------------------------------------------------------
    def _migrate(self) -> None:
        if self._schema_is_current():
            return
        with self.write():
            self.db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL)")
            done = {r[0] for r in self.db.execute("SELECT name FROM _migrations")}
            known = {name for name, _ in MIGRATIONS}
            newer = done - known
            if newer:
                raise StoreError(f"{self.path} was written by a newer memory_llm (schema has {sorted(newer)[-1]});"
                                 " upgrade memory_llm to use this home")
            for name, fn in MIGRATIONS:
                if name not in done:
                    fn(self.db)
                    self.db.execute("INSERT INTO _migrations VALUES (?, ?)", (name, time.time()))
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('generation', '0')")
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def _schema_is_current(self) -> bool:
        """Nothing to migrate? Read without the write lock, so opening a home never waits for a writer."""
        try:
            done = {r[0] for r in self.db.execute("SELECT name FROM _migrations")}
            ready = self.db.execute("SELECT count(*) FROM meta WHERE key IN ('generation', 'schema_version')").fetchone()[0]
        except sqlite3.OperationalError:  # a new home: no tables yet
            return False
        return done == {name for name, _ in MIGRATIONS} and ready == 2

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE): all or nothing, bumps nothing by itself."""
        with self._lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreError(self._busy_message(exc) if _is_busy(exc) else f"{self.path}: cannot write ({exc})") from None
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException as exc:
                if self.db.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
                    self.db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.DatabaseError):
                    raise StoreError(f"{self.path}: cannot write ({exc}); nothing was changed") from None
                raise

    def _busy_message(self, exc: Exception) -> str:
        return (f"{self.path} is busy ({exc}) after waiting {self.lock_timeout:g} s; another mllm process is"
                " writing, try again (or raise lock_timeout)")

    def _bump_generation(self) -> int:
        """Advance the generation inside the current write transaction; return the one it replaced."""
        prev = int(self.db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
        self.db.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(prev + 1),))
        return prev

    def meta(self, key: str) -> str | None:
        with self._lock:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def generation(self) -> int:
        return int(self.meta("generation") or 0)

    def check_embedder(self, name: str, dim: int) -> None:
        """Bind the home to one embedder: vectors of another model are not comparable."""
        stored = self.meta("embedder")
        if stored is None:  # the first embedder binds the home (a write only then: readers never wait for writers)
            with self.write() as db:
                stored = db.execute("SELECT value FROM meta WHERE key = 'embedder'").fetchone()
                if stored is None:
                    db.execute("INSERT INTO meta VALUES ('embedder', ?), ('dim', ?)", (name, str(dim)))
                    return
                stored = stored[0]
        stored_dim = int(self.meta("dim") or 0)
        if stored != name or stored_dim != dim:
            raise InputError(f"this home's memories were embedded with {stored!r} (dim {stored_dim}), not {name!r};"
                             f" use --embedder {stored!r} or a new MLLM_HOME")

    # ---- writes -------------------------------------------------------------------------------------
    def source_hash(self, namespace: str, uri: str) -> str | None:
        with self._lock:
            row = self.db.execute("SELECT content_hash FROM sources WHERE namespace = ? AND uri = ?",
                                  (namespace, uri)).fetchone()
        return row[0] if row else None

    def source_memory_ids(self, namespace: str, uri: str) -> list[int]:
        with self._lock:
            return [r[0] for r in self.db.execute(
                "SELECT m.id FROM memories m JOIN sources s ON s.id = m.source_id WHERE s.namespace = ? AND s.uri = ?",
                (namespace, uri))]

    def existing_hashes(self, namespace: str, hashes: Sequence[str], exclude_uri: str | None = None) -> set[str]:
        """Which of these chunk hashes are already stored in the namespace (outside exclude_uri)."""
        found: set[str] = set()
        with self._lock:
            for i in range(0, len(hashes), 500):
                part = list(hashes[i:i + 500])
                rows = self.db.execute(
                    f"SELECT m.content_hash FROM memories m JOIN sources s ON s.id = m.source_id "
                    f"WHERE m.namespace = ? AND s.uri IS NOT ? AND m.content_hash IN ({','.join('?' * len(part))})",
                    [namespace, exclude_uri, *part]).fetchall()
                found.update(r[0] for r in rows)
        return found

    def replace_source(self, namespace: str, uri: str, content_hash: str, chunks: Sequence[NewChunk]) -> list[int]:
        """Store a source's chunks in ONE transaction, replacing whatever the source had before."""
        now = time.time()
        with self.write() as db:
            old = [r[0] for r in db.execute(
                "SELECT m.id FROM memories m JOIN sources s ON s.id = m.source_id WHERE s.namespace = ? AND s.uri = ?",
                (namespace, uri))]
            db.execute("DELETE FROM sources WHERE namespace = ? AND uri = ?", (namespace, uri))
            cur = db.execute("INSERT INTO sources (namespace, uri, content_hash, created_at) VALUES (?, ?, ?, ?)",
                             (namespace, uri, content_hash, now))
            source_id = cur.lastrowid
            ids = []
            for c in chunks:
                cur = db.execute(
                    "INSERT INTO memories (source_id, namespace, position, text, content_hash, created_at, embedding)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (source_id, namespace, c.position, c.text, c.content_hash, now,
                     np.asarray(c.vector, dtype=np.float32).tobytes()))
                ids.append(cur.lastrowid)
            prev = self._bump_generation()
        self._after_write(prev, added=(ids, [c.vector for c in chunks]), removed=old)
        return ids

    def forget(self, *, ids: Sequence[int] = (), source: str | None = None, namespace: str | None = None,
               everything: bool = False) -> int:
        """Delete memories by id, by source uri, or all (optionally within a namespace). Returns the count."""
        with self.write() as db:
            where, args = _forget_filter(ids, source, namespace, everything)
            gone = [r[0] for r in db.execute(f"SELECT m.id FROM memories m JOIN sources s ON s.id = m.source_id"
                                             f" WHERE {where}", args)]
            if gone:
                for i in range(0, len(gone), 500):
                    part = gone[i:i + 500]
                    db.execute(f"DELETE FROM memories WHERE id IN ({','.join('?' * len(part))})", part)
                db.execute("DELETE FROM sources WHERE id NOT IN (SELECT DISTINCT source_id FROM memories)")
                prev = self._bump_generation()
        if gone:
            self._after_write(prev, added=([], []), removed=gone)
        return len(gone)

    # ---- index --------------------------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.home / INDEX_NAME

    def _sqlite_fingerprint(self) -> tuple[int, int, int]:
        row = self.db.execute("SELECT count(*), coalesce(sum(id), 0), coalesce(max(id), 0) FROM memories").fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def index(self) -> FaissIndex | None:
        """The vector index, in step with SQLite: loaded from disk if it agrees, else rebuilt and saved."""
        with self._lock:
            gen = self.generation()
            if self._index is not None and gen == self._index_generation:
                return self._index
            dim = int(self.meta("dim") or 0)
            if not dim:
                return None
            expected = self._sqlite_fingerprint()
            index = None
            if self.index_path.exists():
                try:
                    index = FaissIndex.load(self.index_path, nprobe=self.ivf_nprobe)
                except (RuntimeError, OSError):
                    logger.warning("vector index %s is unreadable; rebuilding it from SQLite", self.index_path)
                if index is not None and (index.fingerprint() != expected or index.dim != dim
                                          or needs_rebuild(index, len(index), self.exact_index_max)):
                    logger.warning("vector index disagrees with SQLite; rebuilding it")
                    index = None
            if index is None:
                index = self.rebuild_index(dim)
            self._index, self._index_generation = index, gen
            return index

    def rebuild_index(self, dim: int | None = None) -> FaissIndex:
        """Build the index from the embeddings in SQLite and save it atomically."""
        with self._lock:
            dim = dim or int(self.meta("dim") or 0)
            n = self.db.execute("SELECT count(*) FROM memories").fetchone()[0]
            kind = choose_kind(n, self.exact_index_max)
            train = None
            if kind == "ivf":  # k-means on a sample of up to 100k stored vectors
                rows = self.db.execute("SELECT embedding FROM memories ORDER BY random() LIMIT 100000").fetchall()
                train = np.frombuffer(b"".join(r[0] for r in rows), dtype=np.float32).reshape(len(rows), dim)
            index = FaissIndex(dim, kind, nprobe=self.ivf_nprobe, train=train, nlist=ivf_nlist(n) if train is not None else None)
            cur = self.db.execute("SELECT id, embedding FROM memories ORDER BY id")
            while rows := cur.fetchmany(20_000):
                ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
                index.add(ids, vecs)
            index.save(self.index_path)
            self._index, self._index_generation = index, self.generation()
            return index

    def _after_write(self, prev_generation: int, added: tuple[list[int], list[np.ndarray]],
                     removed: list[int]) -> None:
        """Apply a committed write to the in-memory index, or drop it when it cannot follow."""
        with self._lock:
            self._dirty = True
            index = self._index
            if index is None:
                return
            if self._index_generation != prev_generation:  # another writer got in between: reload later
                self._index = None
                return
            ok = not removed or index.remove(np.asarray(removed, dtype=np.int64))
            if not ok or needs_rebuild(index, len(index) + len(added[0]), self.exact_index_max):
                self._index = None  # rebuilt from SQLite at the next use
                return
            if added[0]:
                index.add(np.asarray(added[0], dtype=np.int64), np.vstack(added[1]))
            self._index_generation = prev_generation + 1

    _dirty = False

    def flush(self) -> None:
        """Save the index if this process changed it (once per batch of writes, not per file)."""
        with self._lock:
            if not self._dirty:
                return
            self._dirty = False
            if self._index is not None and self._index_generation == self.generation():
                self._index.save(self.index_path)
            else:
                self.index()  # reloads or rebuilds (a rebuild saves itself)

    # ---- reads --------------------------------------------------------------------------------------
    def get(self, ids: Sequence[int]) -> dict[int, Memory]:
        out: dict[int, Memory] = {}
        with self._lock:
            for i in range(0, len(ids), 500):
                part = list(ids[i:i + 500])
                rows = self.db.execute(
                    "SELECT m.id, m.namespace, s.uri, m.position, m.text, m.created_at FROM memories m"
                    f" JOIN sources s ON s.id = m.source_id WHERE m.id IN ({','.join('?' * len(part))})",
                    part).fetchall()
                out.update({r[0]: Memory(*r) for r in rows})
        return out

    def dense(self, query: np.ndarray, k: int, namespace: str | None = None) -> list[tuple[int, float]]:
        """Top-k memory ids by cosine similarity, within a namespace if given."""
        index = self.index()
        if index is None or not len(index):
            return []
        fetch = k if namespace is None or self.single_namespace() == namespace else k * 8
        with self._lock:  # FAISS releases the GIL: a search must not overlap another thread's add/remove
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
        with self._lock:
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
        with self._lock:
            rows = self.db.execute("SELECT DISTINCT namespace FROM sources LIMIT 2").fetchall()
        return rows[0][0] if len(rows) == 1 else None

    def _in_namespace(self, ids: list[int], namespace: str) -> set[int]:
        if not ids:
            return set()
        with self._lock:
            rows = self.db.execute(f"SELECT id FROM memories WHERE namespace = ? AND id IN ({','.join('?' * len(ids))})",
                                   [namespace, *ids]).fetchall()
        return {r[0] for r in rows}

    def _exact_in_namespace(self, query: np.ndarray, k: int, namespace: str) -> list[tuple[int, float]]:
        with self._lock:
            rows = self.db.execute("SELECT id, embedding FROM memories WHERE namespace = ?", (namespace,)).fetchall()
        if not rows:
            return []
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
        scores = vecs @ np.asarray(query, dtype=np.float32).reshape(-1)
        order = np.argsort(-scores)[:k]
        return [(rows[i][0], float(scores[i])) for i in order]

    def lexical(self, query: str, k: int, namespace: str | None = None) -> list[tuple[int, float]]:
        """Top-k memory ids by BM25 (FTS5) over the query's words; scores are -bm25 (higher is better)."""
        words = [w for w in re.findall(r"\w+", query.lower()) if len(w) > 1]
        if not words:
            return []
        # the first LEXICAL_TERMS distinct words: a pasted book as a query would otherwise cost minutes
        match = " OR ".join(f'"{w}"' for w in list(dict.fromkeys(words))[:LEXICAL_TERMS])
        sql = ("SELECT f.rowid, bm25(memories_fts) AS s FROM memories_fts f"
               + (" JOIN memories m ON m.id = f.rowid" if namespace is not None else "")
               + " WHERE memories_fts MATCH ?" + (" AND m.namespace = ?" if namespace is not None else "")
               + " ORDER BY s LIMIT ?")
        args = [match, namespace, k] if namespace is not None else [match, k]
        with self._lock:
            rows = self.db.execute(sql, args).fetchall()
        return [(r[0], -float(r[1])) for r in rows]

    def stats(self) -> dict:
        with self._lock:
            memories = self.db.execute("SELECT count(*) FROM memories").fetchone()[0]
            sources = self.db.execute("SELECT count(*) FROM sources").fetchone()[0]
            by_ns = {r[0]: r[1] for r in self.db.execute(
                "SELECT namespace, count(*) FROM memories GROUP BY namespace ORDER BY namespace")}
        index = self.index() if memories else None
        return {"memories": memories, "sources": sources, "namespaces": by_ns,
                "index_type": index.kind if index is not None else choose_kind(0, self.exact_index_max),
                "index_size": len(index) if index is not None else 0,
                "index_bytes": self.index_path.stat().st_size if self.index_path.exists() else 0,
                "db_bytes": self.path.stat().st_size, "embedder": self.meta("embedder"),
                "schema_version": int(self.meta("schema_version") or 0)}

    def list_sources(self, namespace: str | None = None) -> list[dict]:
        sql = ("SELECT s.uri, s.namespace, count(m.id) AS chunks, s.created_at FROM sources s"
               " LEFT JOIN memories m ON m.source_id = s.id"
               + (" WHERE s.namespace = ?" if namespace is not None else "") + " GROUP BY s.id ORDER BY s.uri")
        with self._lock:
            rows = self.db.execute(sql, [namespace] if namespace is not None else []).fetchall()
        return [dict(r) for r in rows]

    # ---- consolidation: training items and the ledger ----------------------------------------------
    def memory_ids(self, namespace: str | None = None) -> list[int]:
        sql = "SELECT id FROM memories" + (" WHERE namespace = ?" if namespace is not None else "") + " ORDER BY id"
        with self._lock:
            return [r[0] for r in self.db.execute(sql, [namespace] if namespace is not None else [])]

    def add_items(self, memory_id: int, namespace: str, items) -> None:
        """Store one memory's synthesized items in one transaction (a killed run keeps finished memories)."""
        now = time.time()
        with self.write() as db:
            if db.execute("SELECT 1 FROM memories WHERE id = ?", (memory_id,)).fetchone() is None:
                return  # forgotten meanwhile
            db.execute("DELETE FROM training_items WHERE memory_id = ?", (memory_id,))
            for it in items:
                cur = db.execute("INSERT INTO training_items (memory_id, namespace, kind, prompt, answer, held_out,"
                                 " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 (memory_id, namespace, it.kind, it.prompt, it.answer, int(it.held_out), now))
                it.id = cur.lastrowid

    def items(self, memory_ids) -> list:
        from memory_llm.consolidate.synth import Item

        out = []
        ids = list(memory_ids)
        with self._lock:
            for i in range(0, len(ids), 500):
                part = ids[i:i + 500]
                rows = self.db.execute(
                    "SELECT id, memory_id, kind, prompt, answer, held_out FROM training_items"
                    f" WHERE memory_id IN ({','.join('?' * len(part))}) ORDER BY id", part).fetchall()
                out += [Item(r[1], r[2], r[3], r[4], bool(r[5]), r[0]) for r in rows]
        return out

    def memories_with_items(self, memory_ids) -> set[int]:
        ids = list(memory_ids)
        found: set[int] = set()
        with self._lock:
            for i in range(0, len(ids), 500):
                part = ids[i:i + 500]
                found.update(r[0] for r in self.db.execute(
                    f"SELECT DISTINCT memory_id FROM training_items WHERE memory_id IN ({','.join('?' * len(part))})",
                    part))
        return found

    def record_ledger(self, version: str, memory_ids) -> None:
        now = time.time()
        with self.write() as db:
            db.executemany("INSERT OR IGNORE INTO ledger VALUES (?, ?, ?)", [(int(i), version, now) for i in memory_ids])

    def ledger(self, version: str | None = None) -> list[tuple[int, str]]:
        sql = "SELECT memory_id, adapter_version FROM ledger" + (" WHERE adapter_version = ?" if version else "")
        with self._lock:
            return [tuple(r) for r in self.db.execute(sql + " ORDER BY memory_id", [version] if version else [])]

    # ---- health -------------------------------------------------------------------------------------
    def check(self) -> list[dict]:
        """Health checks: SQLite integrity, FTS5 agreement, embedding sizes, index/SQLite agreement."""
        results = []
        with self._lock:
            try:
                rows = [r[0] for r in self.db.execute("PRAGMA integrity_check").fetchall()]
            except sqlite3.DatabaseError as exc:
                rows = [str(exc)]
            if rows != ["ok"]:  # nothing else can be trusted (or even read) in a damaged file
                return [_check("sqlite", False, "the database file is damaged (" + "; ".join(rows[:3]) + "); restore"
                               " memory.sqlite from a backup")]
            results.append(_check("sqlite", True, "integrity ok"))
            try:
                self.db.execute("INSERT INTO memories_fts(memories_fts, rank) VALUES ('integrity-check', 1)")
                results.append(_check("fts", True, "full-text index agrees with memories"))
            except sqlite3.OperationalError as exc:
                if _is_busy(exc):  # the check is a write: waiting past lock_timeout is not a broken index
                    raise StoreError(self._busy_message(exc)) from None
                results.append(_check("fts", False, f"full-text index disagrees with memories ({exc})", True))
            except sqlite3.DatabaseError as exc:
                results.append(_check("fts", False, f"full-text index disagrees with memories ({exc})", True))
            dim = int(self.meta("dim") or 0)
            bad = self.db.execute("SELECT count(*) FROM memories WHERE length(embedding) != ?", (dim * 4,)).fetchone()[0]
            results.append(_check("embeddings", bad == 0, f"{bad} embedding(s) of the wrong size" if bad
                                  else f"all embeddings have dim {dim}"))
            expected = self._sqlite_fingerprint()
        if not dim:
            results.append(_check("index", True, "empty home, no index yet"))
            return results
        try:
            on_disk = FaissIndex.load(self.index_path, nprobe=self.ivf_nprobe)
            agrees = on_disk.fingerprint() == expected
            results.append(_check("index", agrees, f"{len(on_disk)} vectors agree with SQLite" if agrees
                                  else f"index holds {len(on_disk)} vectors, SQLite {expected[0]} memories", True))
        except (RuntimeError, OSError):
            results.append(_check("index", False, f"{self.index_path} is missing or unreadable", True))
        return results

    def repair(self) -> list[str]:
        """Repair what can be repaired from SQLite: the FTS5 table and the vector index."""
        done = []
        with self.write() as db:
            db.execute("INSERT INTO memories_fts(memories_fts) VALUES ('rebuild')")
        done.append("rebuilt the full-text index from memories")
        if self.meta("dim"):
            index = self.rebuild_index()
            done.append(f"rebuilt the vector index from SQLite ({len(index)} vectors)")
        return done

    def close(self) -> None:
        with self._lock:
            self.flush()
            self.db.close()


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


def _check(name: str, ok: bool, detail: str, repairable: bool = False) -> dict:
    return {"check": name, "ok": ok, "detail": detail, "repairable": repairable and not ok}


def _forget_filter(ids: Sequence[int], source: str | None, namespace: str | None,
                   everything: bool) -> tuple[str, list]:
    clauses, args = [], []
    if ids:
        if any(not 0 < int(i) < 2 ** 63 for i in ids):
            raise InputError(f"nothing forgotten: no memory matches id(s) {', '.join(map(str, ids))}")
        clauses.append(f"m.id IN ({','.join('?' * len(ids))})")
        args += [int(i) for i in ids]
    if source is not None:
        clauses.append("(s.uri = ? OR s.uri = ?)")
        args += [source, str(Path(source).expanduser().resolve()) if not source.startswith(("text:", "stdin:")) else source]
    if not clauses and not everything:
        raise InputError("say what to forget: memory ids, --source, or --all")
    if namespace is not None:
        clauses.append("m.namespace = ?")
        args.append(namespace)
    return " AND ".join(clauses) or "1", args


def _make_private_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StoreError(f"cannot create memory home {path}: {exc.strerror}") from None
