"""FAISS, the embedded vector index backend: exact while small, IVF when large, saved atomically to one file."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import numpy as np

from memory_llm.store.vectors import Fingerprint, Sampler, fingerprint_of

logger = logging.getLogger(__name__)

IVF_TRAIN_MAX = 100_000  # k-means runs on a sample of at most this many stored vectors


def _faiss() -> ModuleType:
    """Import faiss on first use (`mllm --help` stays instant), saying what to install when it is missing."""
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss-cpu is a hard dependency
        raise ImportError("faiss is not installed: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


class FaissIndex:
    """FAISS: exact (IndexIDMap2 over IndexFlatIP) while small; IVF (IndexIVFFlat, inner product) when large.

    IVF rather than HNSW for large homes (measured: docs/lab-notes.md, vector search): at 1M vectors IVF nlist=4000 nprobe=16
    reaches recall@10 0.97 at ~1.8 ms where HNSW M=32 efSearch=128 stopped at 0.91, and IVF removes ids in
    place, so re-learning a source does not rebuild the index.
    """

    filters = False  # namespaces are filtered by the store (over-fetch, then SQLite)
    shared = False  # this process's copy, saved to one file

    def __init__(self, dim: int, kind: str = "flat", nprobe: int = 16, index: Any = None,
                 train: np.ndarray | None = None, nlist: int | None = None, exact_max: int = 50_000):
        faiss = _faiss()
        self.dim, self.kind, self.exact_max = dim, kind, exact_max
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
        self._owner: Any = None  # see load
        if kind == "ivf":
            faiss.extract_index_ivf(self.index).nprobe = nprobe

    @classmethod
    def create(cls, dim: int, size: int, sample: Sampler | None, *, nprobe: int = 16,
               exact_max: int = 50_000) -> "FaissIndex":
        """An empty index of the kind `size` vectors call for; an IVF trains on `sample(IVF_TRAIN_MAX)`."""
        kind = choose_kind(size, exact_max)
        if kind == "flat":
            return cls(dim, kind, nprobe=nprobe, exact_max=exact_max)
        if sample is None:
            raise ValueError("an IVF index needs training vectors: pass sample")
        return cls(dim, kind, nprobe=nprobe, train=sample(IVF_TRAIN_MAX), nlist=ivf_nlist(size), exact_max=exact_max)

    @property
    def nlist(self) -> int:
        """Inverted lists of an IVF index (0 for an exact one)."""
        return int(_faiss().extract_index_ivf(self.index).nlist) if self.kind == "ivf" else 0

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray, namespaces: Sequence[str] | None = None) -> None:
        """Add vectors under their memory ids (namespaces are not kept: this index does not filter)."""
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                    np.asarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> bool:
        """Remove ids in place (both kinds can)."""
        self.index.remove_ids(np.asarray(ids, dtype=np.int64))
        return True

    def search(self, query: np.ndarray, k: int, namespace: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the k nearest vectors to one query, best first."""
        _no_namespace(namespace)
        ids, scores = self.search_many(np.asarray(query, dtype=np.float32).reshape(1, -1), k)
        keep = ids[0] >= 0
        return ids[0][keep], scores[0][keep]

    def search_many(self, queries: np.ndarray, k: int,
                    namespace: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of shape (n, k); missing neighbours are -1."""
        _no_namespace(namespace)
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
        """Every id the index holds (in no particular order)."""
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
        """`fingerprint_of` the ids the index holds."""
        return fingerprint_of(self.ids())

    def fits(self, n: int) -> bool:
        """False when the kind no longer fits n, or an IVF has outgrown its lists (n calls for 2x the lists)."""
        kind = choose_kind(n, self.exact_max)
        return self.kind == kind and not (kind == "ivf" and ivf_nlist(n) > 2 * self.nlist)

    def save(self, path: Path) -> None:
        """Write the index atomically: a temp file named by this pid, fsync, rename, fsync the folder."""
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

    def close(self) -> None:
        """Nothing to release (the index is memory and a file)."""

    @classmethod
    def load(cls, path: Path, nprobe: int = 16, exact_max: int = 50_000) -> "FaissIndex":
        """Read an index file; raises RuntimeError/OSError when it is missing or unreadable."""
        faiss = _faiss()
        index = faiss.read_index(str(path))
        if isinstance(index, faiss.IndexIDMap2):
            return cls(index.d, "flat", index=index, exact_max=exact_max)
        if isinstance(faiss.downcast_index(index), faiss.IndexIVFFlat):
            loaded = cls(index.d, "ivf", nprobe=nprobe, index=faiss.downcast_index(index), exact_max=exact_max)
            loaded._owner = index  # the downcast view does not own the C++ object: keep its owner alive
            return loaded
        raise RuntimeError(f"{path} is not an index this version writes")


def _no_namespace(namespace: str | None) -> None:
    if namespace is not None:
        raise ValueError("FaissIndex does not filter by namespace (filters is False): the store filters")


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
