"""The vector index behind a small protocol; FAISS is the embedded backend.

The index is derived data: SQLite holds every embedding, so an index can always be rebuilt. It is written
atomically (temp file, fsync, rename) and checked against SQLite by a fingerprint of the ids it holds.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)

Fingerprint = tuple[int, int, int]  # (count, sum of ids, max id)


class VectorIndex(Protocol):
    """What the store needs from a vector index. Vectors are L2-normalised; scores are inner products."""

    kind: str
    dim: int

    def __len__(self) -> int: ...
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...
    def remove(self, ids: np.ndarray) -> bool:
        """Remove ids; return False when the index type cannot remove in place (caller rebuilds)."""
    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...
    def fingerprint(self) -> Fingerprint: ...
    def save(self, path: Path) -> None: ...


def fingerprint_of(ids: np.ndarray) -> Fingerprint:
    ids = np.asarray(ids, dtype=np.int64)
    return (int(ids.size), int(ids.sum()) if ids.size else 0, int(ids.max()) if ids.size else 0)


def _faiss():
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss-cpu is a hard dependency
        raise ImportError("faiss is not installed: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


class FaissIndex:
    """FAISS, exact (IndexFlatIP) while small and HNSW when large; ids are memory ids (IndexIDMap2)."""

    def __init__(self, dim: int, kind: str = "flat", hnsw_m: int = 32, ef_search: int = 128,
                 ef_construction: int = 80, index=None):
        faiss = _faiss()
        self.dim, self.kind = dim, kind
        if index is None:
            if kind == "flat":
                inner = faiss.IndexFlatIP(dim)
            elif kind == "hnsw":
                inner = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
                inner.hnsw.efConstruction = ef_construction
            else:
                raise ValueError(f"unknown index kind {kind!r}")
            index = faiss.IndexIDMap2(inner)
        self.index = index
        if kind == "hnsw":
            faiss.downcast_index(self.index.index).hnsw.efSearch = ef_search

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                    np.asarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> bool:
        if self.kind != "flat":
            return False
        self.index.remove_ids(np.asarray(ids, dtype=np.int64))
        return True

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ids, scores = self.search_many(np.asarray(query, dtype=np.float32).reshape(1, -1), k)
        keep = ids[0] >= 0
        return ids[0][keep], scores[0][keep]

    def search_many(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of shape (n, k); missing neighbours are -1."""
        faiss = _faiss()
        k = min(k, len(self))
        if k <= 0:
            return np.full((len(queries), 0), -1, dtype=np.int64), np.zeros((len(queries), 0), dtype=np.float32)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        # a few queries run faster on one thread: OpenMP start-up dominates (measured: 100x on 2 busy cores)
        threads = faiss.omp_get_max_threads()
        if len(queries) < 16:
            faiss.omp_set_num_threads(1)
        try:
            scores, ids = self.index.search(queries, k)
        finally:
            faiss.omp_set_num_threads(threads)
        return ids, scores

    def ids(self) -> np.ndarray:
        return _faiss().vector_to_array(self.index.id_map).astype(np.int64)

    def fingerprint(self) -> Fingerprint:
        return fingerprint_of(self.ids())

    def save(self, path: Path) -> None:
        faiss = _faiss()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".index-", dir=path.parent)
        os.close(fd)
        try:
            faiss.write_index(self.index, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _fsync_dir(path.parent)

    @classmethod
    def load(cls, path: Path, ef_search: int = 128) -> "FaissIndex":
        """Read an index file; raises RuntimeError/OSError when it is missing or unreadable."""
        faiss = _faiss()
        index = faiss.read_index(str(path))
        inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else None
        if inner is None:
            raise RuntimeError(f"{path} is not an id-mapped index")
        kind = "hnsw" if isinstance(inner, faiss.IndexHNSWFlat) else "flat"
        return cls(index.d, kind, ef_search=ef_search, index=index)


def choose_kind(n: int, exact_max: int) -> str:
    """Exact search while small (perfect recall, fast enough); HNSW beyond exact_max vectors."""
    return "flat" if n <= exact_max else "hnsw"


def open_index(dim: int, n: int, exact_max: int, hnsw_m: int = 32, ef_search: int = 128) -> FaissIndex:
    """A new empty index of the right kind for n vectors."""
    return FaissIndex(dim, choose_kind(n, exact_max), hnsw_m=hnsw_m, ef_search=ef_search)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
