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
    """FAISS: exact (IndexIDMap2 over IndexFlatIP) while small; IVF (IndexIVFFlat, inner product) when large.

    IVF rather than HNSW for large homes (measured, BENCHMARKS.md): at 1M vectors IVF nlist=4000 nprobe=16
    reaches recall@10 0.97 at ~1.8 ms where HNSW M=32 efSearch=128 stopped at 0.91, and IVF removes ids in
    place, so re-learning a source does not rebuild the index.
    """

    def __init__(self, dim: int, kind: str = "flat", nprobe: int = 16, index=None, train: np.ndarray | None = None,
                 nlist: int | None = None):
        faiss = _faiss()
        self.dim, self.kind = dim, kind
        if index is None:
            if kind == "flat":
                index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
            elif kind == "ivf":
                if train is None or not len(train):
                    raise ValueError("an IVF index needs training vectors")
                nlist = nlist or ivf_nlist(len(train))
                self._quantizer = faiss.IndexFlatIP(dim)  # the IVF borrows it: keep it alive
                index = faiss.IndexIVFFlat(self._quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
                index.train(np.ascontiguousarray(train, dtype=np.float32))
            else:
                raise ValueError(f"unknown index kind {kind!r}")
        self.index = index
        if kind == "ivf":
            faiss.extract_index_ivf(self.index).nprobe = nprobe

    @property
    def nlist(self) -> int:
        return int(_faiss().extract_index_ivf(self.index).nlist) if self.kind == "ivf" else 0

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                    np.asarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> bool:
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
        faiss = _faiss()
        if self.kind == "flat":
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        invlists = faiss.extract_index_ivf(self.index).invlists
        parts = []
        for lst in range(invlists.nlist):
            size = invlists.list_size(lst)
            if size:
                parts.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy())
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)

    def fingerprint(self) -> Fingerprint:
        return fingerprint_of(self.ids())

    def save(self, path: Path) -> None:
        faiss = _faiss()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_dead_temp_files(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".index-{os.getpid()}-", dir=path.parent)
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
    def load(cls, path: Path, nprobe: int = 16) -> "FaissIndex":
        """Read an index file; raises RuntimeError/OSError when it is missing or unreadable."""
        faiss = _faiss()
        index = faiss.read_index(str(path))
        if isinstance(index, faiss.IndexIDMap2):
            return cls(index.d, "flat", index=index)
        if isinstance(faiss.downcast_index(index), faiss.IndexIVFFlat):
            loaded = cls(index.d, "ivf", nprobe=nprobe, index=faiss.downcast_index(index))
            loaded._owner = index  # the downcast view does not own the C++ object: keep its owner alive
            return loaded
        raise RuntimeError(f"{path} is not an index this version writes")


def remove_dead_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary index files of processes that died while saving (kill -9 mid-write); a live
    process's file is left alone (its pid is in the name). Returns what was removed."""
    removed = []
    for tmp in folder.glob(".index-*-*"):
        pid = tmp.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def ivf_nlist(n: int) -> int:
    """Inverted lists for n vectors: about 4·sqrt(n), with at least 39 training points per list."""
    return max(1, min(int(4 * n ** 0.5), n // 39))


def choose_kind(n: int, exact_max: int) -> str:
    """Exact search while small (perfect recall, fast enough); IVF beyond exact_max vectors."""
    return "flat" if n <= exact_max else "ivf"


def needs_rebuild(index: "FaissIndex", n: int, exact_max: int) -> bool:
    """The kind no longer fits n, or an IVF has outgrown its lists (retrain when n calls for 2x the lists)."""
    kind = choose_kind(n, exact_max)
    return index.kind != kind or (kind == "ivf" and ivf_nlist(n) > 2 * index.nlist)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
