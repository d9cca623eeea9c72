"""The Store: one memory home on disk. SQLite (memories, sources, FTS5, embeddings) is its single source of truth.

The Store is a facade over parts that share one Database (store/db.py):
  dense.py     the vector index kept in step with SQLite, and dense search
  training.py  consolidation's training items and ledger
  prompts.py   prompt templates, rated exemplars, the answer log
  supersessions.py  which memory superseded which, when and why
  writes.py    a source's chunks stored, supersessions recorded and reverted, memories forgotten
  health.py    `mllm doctor`'s checks and repairs
It reads memories and their sources itself.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from memory_llm.errors import InputError
from memory_llm.store import health
from memory_llm.store.db import Database, execute_in, make_private_dir
from memory_llm.store.dense import DenseIndex
from memory_llm.store.prompts import Exemplar, LoggedAnswer, PromptRecords, Template
from memory_llm.store.records import MEMORY_COLUMNS, Item, Memory, NewChunk
from memory_llm.store.supersessions import Supersession, SupersessionRecords
from memory_llm.store.training import TrainingRecords
from memory_llm.store.vectors import Fingerprint, VectorIndex
from memory_llm.store.writes import MemoryWrites

logger = logging.getLogger(__name__)

DB_NAME = "memory.sqlite"
INDEX_NAME = "index/vectors.faiss"
MILVUS_NAME = "index/milvus.db"  # the embedded Milvus Lite data (vector_backend milvus, no milvus_uri)
LEXICAL_TERMS = 64


class Store:
    """One memory home on disk. Thread-safe: one connection, guarded by a lock; readers share the index.

    Args:
        home: the home's folder (created, private to its owner).
        lock_timeout: seconds to wait for another process's write before giving up.
        exact_index_max: up to this many memories the vector index is exact.
        ivf_nprobe: inverted lists searched per query once the index is approximate.
        index_backend: the vector index implementation (see store/backends.py `open_index`).
        index_uri: Milvus: the server (http://host:port) or a Milvus Lite file; empty: <home>/index/milvus.db.
        index_token: Milvus: the token, or empty.
    """

    def __init__(self, home: Path, *, lock_timeout: float = 30.0, exact_index_max: int = 50_000,
                 ivf_nprobe: int = 16, index_backend: str = "faiss", index_uri: str = "", index_token: str = ""):
        self.home = Path(home)
        self.exact_index_max, self.ivf_nprobe, self.lock_timeout = exact_index_max, ivf_nprobe, lock_timeout
        make_private_dir(self.home)
        self.path = self.home / DB_NAME
        self._database = Database(self.path, lock_timeout)
        self.db: sqlite3.Connection = self._database.conn
        self._lock = self._database.lock
        self.vectors = DenseIndex(self._database, self.home / INDEX_NAME, backend=index_backend, nprobe=ivf_nprobe,
                                  exact_max=exact_index_max, uri=index_uri or str(self.home / MILVUS_NAME),
                                  token=index_token)
        self.training = TrainingRecords(self._database)
        self.prompts = PromptRecords(self._database)
        self.supersessions = SupersessionRecords(self._database)
        self.writes = MemoryWrites(self._database, self.vectors, self.supersessions, self.prompts)

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE): all or nothing, bumps nothing by itself."""
        with self._database.write() as db:
            yield db

    def meta(self, key: str) -> str | None:
        """A value of the meta table (embedder, dim, generation, schema_version), or None."""
        return self._database.meta(key)

    def generation(self) -> int:
        """The write counter: it moves on every committed change of the memories."""
        return self._database.generation()

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
        """The content hash a source was stored with, or None when it is not stored."""
        with self._lock:
            row = self.db.execute("SELECT content_hash FROM sources WHERE namespace = ? AND uri = ?",
                                  (namespace, uri)).fetchone()
        return row[0] if row else None

    def existing_hashes(self, namespace: str, hashes: Sequence[str], exclude_uri: str | None = None) -> dict[str, int]:
        """Which of these chunk hashes live memories of the namespace hold (outside exclude_uri): hash → memory id."""
        with self._lock:
            rows = execute_in(self.db, "SELECT m.content_hash, m.id FROM memories m JOIN sources s ON s.id ="
                              " m.source_id WHERE m.namespace = ? AND s.uri IS NOT ? AND m.superseded_at IS NULL"
                              " AND m.content_hash IN ({marks})", hashes, [namespace, exclude_uri])
        return {r[0]: r[1] for r in rows}

    def source_memories(self, namespace: str, uri: str) -> list[Memory]:
        """A source's live memories, in position order."""
        with self._lock:
            ids = [r[0] for r in self.db.execute(
                "SELECT m.id FROM memories m JOIN sources s ON s.id = m.source_id WHERE s.namespace = ? AND s.uri = ?"
                " AND m.superseded_at IS NULL ORDER BY m.position", (namespace, uri))]
        found = self.get(ids)
        return [found[i] for i in ids if i in found]

    def replace_source(self, namespace: str, uri: str, content_hash: str, chunks: Sequence[NewChunk], *,
                       kept: Mapping[int, int] | None = None, supersessions: Sequence[Supersession] = (),
                       valid_from: float | None = None, reason: str = "source") -> list[int]:
        """Store a source's chunks in one transaction, in place of what it had (store/writes.py has the details).
        Returns the new memories' ids, in chunk order."""
        return self.writes.replace_source(namespace, uri, content_hash, chunks, kept=kept,
                                          supersessions=supersessions, valid_from=valid_from, reason=reason)

    def supersede(self, namespace: str, supersessions: Sequence[Supersession]) -> list[Supersession]:
        """Record supersessions between stored memories in one transaction. Returns them with their ids."""
        return self.writes.supersede(namespace, supersessions)

    def restore(self, memory_id: int) -> list[Supersession]:
        """Make a superseded memory live and whole again. Returns the reverted supersessions."""
        return self.writes.restore(memory_id)

    def forget(self, *, ids: Sequence[int] = (), source: str | None = None, namespace: str | None = None,
               everything: bool = False, superseded: bool = False) -> int:
        """Delete memories by id, by source uri, or all (optionally within a namespace), superseded ones included;
        with `superseded`, only the superseded ones. Returns the count."""
        return self.writes.forget(ids=ids, source=source, namespace=namespace, everything=everything,
                                  superseded=superseded)

    # ---- the vector index (store/dense.py) ----------------------------------------------------------
    @property
    def index_path(self) -> Path:
        """Where the vector index is saved."""
        return self.vectors.path

    def sqlite_fingerprint(self) -> Fingerprint:
        """The fingerprint of the memory ids in SQLite: `index().fingerprint()` must equal it."""
        return self.vectors.sqlite_fingerprint()

    def index(self) -> VectorIndex | None:
        """The vector index, in step with SQLite (None before anything was learned)."""
        return self.vectors.index()

    def rebuild_index(self, dim: int | None = None) -> VectorIndex:
        """Build the index from the embeddings in SQLite and save it atomically."""
        return self.vectors.rebuild(dim)

    def flush(self) -> None:
        """Save the index if this process changed it (once per batch of writes, not per file)."""
        self.vectors.flush()

    def dense(self, query: np.ndarray, k: int, namespace: str | None = None) -> list[tuple[int, float]]:
        """Top-k memory ids by cosine similarity, within a namespace if given."""
        return self.vectors.search(query, k, namespace)

    def neighbours(self, vectors: np.ndarray, k: int, namespace: str,
                   exclude: set[int]) -> list[list[tuple[int, float]]]:
        """For each vector, up to k nearest live memories of the namespace outside `exclude`: (id, cosine)."""
        return self.vectors.neighbours(vectors, k, namespace, exclude)

    def single_namespace(self) -> str | None:
        """The home's only namespace, or None when it has none or several."""
        return self.vectors.single_namespace()

    # ---- reads --------------------------------------------------------------------------------------
    def get(self, ids: Sequence[int]) -> dict[int, Memory]:
        """The memories of these ids, superseded ones included (missing ones are left out), by id."""
        with self._lock:
            rows = execute_in(self.db, f"SELECT {MEMORY_COLUMNS} FROM memories m JOIN sources s ON s.id = m.source_id"
                              " WHERE m.id IN ({marks})", ids)
        stale = self.supersessions.stale_sentences([r["id"] for r in rows]) if rows else {}
        return {r["id"]: Memory.from_row(r, stale.get(r["id"], ())) for r in rows}

    def embeddings(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        """The stored embeddings of these ids (missing ones are left out), by id."""
        with self._lock:
            rows = execute_in(self.db, "SELECT id, embedding FROM memories WHERE id IN ({marks})", ids)
        return {r[0]: np.frombuffer(r[1], dtype=np.float32) for r in rows}

    def lexical(self, query: str, k: int, namespace: str | None = None,
                superseded: bool = False) -> list[tuple[int, float]]:
        """Top-k live memory ids by BM25 (FTS5) over the query's words (with `superseded`, superseded ones too);
        scores are -bm25 (higher is better)."""
        words = [w for w in re.findall(r"\w+", query.lower()) if len(w) > 1]
        if not words:
            return []
        # the first LEXICAL_TERMS distinct words: a pasted book as a query would otherwise cost minutes
        match = " OR ".join(f'"{w}"' for w in list(dict.fromkeys(words))[:LEXICAL_TERMS])
        sql = ("SELECT f.rowid, bm25(memories_fts) AS s FROM memories_fts f JOIN memories m ON m.id = f.rowid"
               " WHERE memories_fts MATCH ?" + (" AND m.namespace = ?" if namespace is not None else "")
               + ("" if superseded else " AND m.superseded_at IS NULL") + " ORDER BY s LIMIT ?")
        args = [match, namespace, k] if namespace is not None else [match, k]
        with self._lock:
            rows = self.db.execute(sql, args).fetchall()
        return [(r[0], -float(r[1])) for r in rows]

    def memory_ids(self, namespace: str | None = None, superseded: bool = False) -> list[int]:
        """Every live memory id (of one namespace if given; with `superseded`, superseded ones too), ascending."""
        where = [w for w, on in (("namespace = ?", namespace is not None), ("superseded_at IS NULL", not superseded))
                 if on]
        sql = "SELECT id FROM memories" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        with self._lock:
            return [r[0] for r in self.db.execute(sql, [namespace] if namespace is not None else [])]

    def superseded_vectors(self, namespace: str | None = None) -> tuple[list[int], np.ndarray | None]:
        """The superseded memories' ids and embeddings (of one namespace if given): `search --history` ranks them
        beside the live ones found in the index."""
        sql = "SELECT id, embedding FROM memories WHERE superseded_at IS NOT NULL" + (
            " AND namespace = ?" if namespace is not None else "")
        with self._lock:
            rows = self.db.execute(sql, [namespace] if namespace is not None else []).fetchall()
        if not rows:
            return [], None
        return [r[0] for r in rows], np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)

    def stale_ids(self, memory_ids: Iterable[int]) -> set[int]:
        """Which of these memories hold something no longer true: superseded (whole, or a sentence) or forgotten."""
        return self.supersessions.stale_ids(memory_ids)

    def history(self, memory_id: int) -> list[Supersession]:
        """Every supersession the memory took part in (as old or new; reverted ones too), oldest first."""
        return self.supersessions.involving(memory_id)

    def stats(self) -> dict:
        """Counts and sizes of the home, as shown by `mllm stats`."""
        with self._lock:
            memories = self.db.execute("SELECT count(*) FROM memories WHERE superseded_at IS NULL").fetchone()[0]
            superseded = self.db.execute("SELECT count(*) FROM memories WHERE superseded_at IS NOT NULL").fetchone()[0]
            sources = self.db.execute("SELECT count(*) FROM sources").fetchone()[0]
            by_ns = {r[0]: r[1] for r in self.db.execute(
                "SELECT namespace, count(*) FROM memories WHERE superseded_at IS NULL GROUP BY namespace"
                " ORDER BY namespace")}
        index = self.index() if memories else None
        return {"memories": memories, "superseded": superseded, "sources": sources, "namespaces": by_ns,
                "index_backend": self.vectors.backend,
                "index_type": index.kind if index is not None else self.vectors.empty_kind(),
                "index_size": len(index) if index is not None else 0,
                "index_bytes": self.index_path.stat().st_size if self.index_path.exists() else 0,
                "db_bytes": self.path.stat().st_size, "embedder": self.meta("embedder"),
                "schema_version": int(self.meta("schema_version") or 0)}

    def list_sources(self, namespace: str | None = None) -> list[dict]:
        """Each source (of one namespace if given) with its uri, namespace, chunk count and time, by uri."""
        sql = ("SELECT s.uri, s.namespace, count(m.id) AS chunks, s.created_at FROM sources s"
               " LEFT JOIN memories m ON m.source_id = s.id AND m.superseded_at IS NULL"
               + (" WHERE s.namespace = ?" if namespace is not None else "") + " GROUP BY s.id ORDER BY s.uri")
        with self._lock:
            rows = self.db.execute(sql, [namespace] if namespace is not None else []).fetchall()
        return [dict(r) for r in rows]

    # ---- consolidation (store/training.py) ----------------------------------------------------------
    def add_items(self, memory_id: int, namespace: str, items: Iterable[Item], text_hash: str | None = None) -> None:
        """Store one memory's synthesized items in one transaction, replacing its earlier ones."""
        self.training.add_items(memory_id, namespace, items, text_hash)

    def items(self, memory_ids: Iterable[int]) -> list[Item]:
        """The stored training items of these memories."""
        return self.training.items(memory_ids)

    def memories_with_items(self, memory_ids: Iterable[int]) -> set[int]:
        """Which of these memories have training items stored."""
        return self.training.memories_with_items(memory_ids)

    def record_ledger(self, version: str, memory_ids: Iterable[int]) -> None:
        """Note that adapter `version` learned these memories."""
        self.training.record_ledger(version, memory_ids)

    def ledger(self, version: str | None = None) -> list[tuple[int, str]]:
        """(memory id, adapter version) pairs, of one version if given."""
        return self.training.ledger(version)

    # ---- prompt library (store/prompts.py) ----------------------------------------------------------
    def templates(self) -> list[Template]:
        return self.prompts.templates()

    def template(self, name: str) -> Template | None:
        return self.prompts.template(name)

    def seed_templates(self, templates: Sequence[Template]) -> None:
        self.prompts.seed_templates(templates)

    def put_templates(self, templates: Sequence[Template], exemplars: Sequence[Exemplar] = ()) -> tuple[int, int]:
        return self.prompts.put_templates(templates, exemplars)

    def remove_template(self, name: str) -> bool:
        return self.prompts.remove_template(name)

    def template_vectors(self) -> tuple[list[Template], list[np.ndarray | None]]:
        return self.prompts.template_vectors()

    def set_template_vectors(self, pairs: Sequence[tuple[str, np.ndarray]]) -> None:
        self.prompts.set_template_vectors(pairs)

    def exemplars(self, namespace: str | None = None, min_rating: int | None = None) -> list[Exemplar]:
        return self.prompts.exemplars(namespace, min_rating)

    def exemplar_vectors(self, namespace: str, min_rating: int) -> tuple[list[Exemplar], list[np.ndarray | None]]:
        return self.prompts.exemplar_vectors(namespace, min_rating)

    def set_exemplar_vectors(self, pairs: Sequence[tuple[int, np.ndarray]]) -> None:
        self.prompts.set_exemplar_vectors(pairs)

    def add_exemplars(self, exemplars: Sequence[Exemplar]) -> list[int]:
        return self.prompts.add_exemplars(exemplars)

    def remove_exemplar(self, exemplar_id: int, namespace: str | None = None) -> bool:
        return self.prompts.remove_exemplar(exemplar_id, namespace)

    def log_answer(self, *, namespace: str, question: str, answer: str, template: str | None,
                   exemplar_ids: Sequence[int], memory_ids: Sequence[int], model: str | None,
                   adapter: str | None, session_id: str | None = None) -> int:
        return self.prompts.log_answer(namespace=namespace, question=question, answer=answer, template=template,
                                       exemplar_ids=exemplar_ids, memory_ids=memory_ids, model=model,
                                       adapter=adapter, session_id=session_id)

    def logged_answer(self, answer_id: int, namespace: str | None = None) -> LoggedAnswer | None:
        return self.prompts.logged_answer(answer_id, namespace)

    def answers(self, namespace: str, session_id: str | None = None, limit: int = 100) -> list[LoggedAnswer]:
        return self.prompts.answers(namespace, session_id, limit)

    def record_feedback(self, answer: LoggedAnswer, kind: str, correction: str | None = None) -> list[int]:
        return self.prompts.record_feedback(answer, kind, correction)

    # ---- health (store/health.py) -------------------------------------------------------------------
    def check(self) -> list[dict]:
        """Health checks: SQLite integrity, FTS5 agreement, embedding sizes, index/SQLite agreement."""
        return health.check(self._database, self.vectors)

    def repair(self) -> list[str]:
        """Repair what can be repaired from SQLite: the FTS5 table and the vector index."""
        return health.repair(self._database, self.vectors)

    def close(self) -> None:
        """Save the index if it changed, release it, and close the database."""
        with self._lock:
            try:
                self.flush()
            finally:
                self.vectors.close()
                self._database.close()
