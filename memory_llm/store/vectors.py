"""The vector index behind a small protocol, and the one factory that picks a backend.

The index is derived data: SQLite holds every embedding, so an index can always be rebuilt, and the Store checks
it against SQLite by a fingerprint of the ids it holds. A backend is one module (FAISS: store/faiss_index.py)
plus one branch in `open_index`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

logger = logging.getLogger(__name__)

Fingerprint = tuple[int, int, int]  # (count, sum of ids, max id)
Sampler = Callable[[int], np.ndarray]  # up to n stored vectors at random, shape (<= n, dim)

BACKENDS = ("faiss",)


class VectorIndex(Protocol):
    """What the store needs from a vector index. Vectors are L2-normalised; scores are inner products."""

    kind: str  # the index structure, reported by `mllm stats` (FAISS: "flat" or "ivf")
    dim: int

    def __len__(self) -> int: ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> bool:
        """Remove ids; return False when the index cannot remove in place (the caller rebuilds)."""

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the k nearest vectors to one query, best first; fewer when the index is small."""

    def search_many(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of shape (n, k) for n queries; missing neighbours have id -1."""

    def fingerprint(self) -> Fingerprint:
        """`fingerprint_of` the ids the index holds (compared with SQLite's)."""

    def fits(self, n: int) -> bool:
        """Whether the index still suits n vectors; False: rebuild it from SQLite."""

    def save(self, path: Path) -> None:
        """Write the index to `path` atomically (a crash leaves the old file or the new one)."""


def fingerprint_of(ids: np.ndarray) -> Fingerprint:
    """(count, sum, max) of a set of ids: cheap to compute on both sides, and any add or remove changes it."""
    ids = np.asarray(ids, dtype=np.int64)
    return (int(ids.size), int(ids.sum()) if ids.size else 0, int(ids.max()) if ids.size else 0)


def open_index(path: Path, *, backend: str = "faiss", dim: int | None = None, size: int = 0,
               sample: Sampler | None = None, nprobe: int = 16, exact_max: int = 50_000) -> VectorIndex:
    """Read the index saved at `path`, or (given `dim`) make a new, empty one shaped for `size` vectors.

    Args:
        path: where the index is saved; read only when `dim` is None (a new index is written by its `save`).
        backend: which implementation; one of BACKENDS.
        dim: the vectors' dimension, to make a new index.
        size: how many vectors the new index will hold (decides its structure).
        sample: stored vectors to train on, for a structure that needs training (FAISS IVF).
        nprobe: inverted lists searched per query (FAISS IVF).
        exact_max: up to this many vectors the index searches exactly.

    Returns:
        The index. Raises RuntimeError or OSError when a saved index is missing or unreadable, ImportError
        (with what to install) when the backend's library is missing, ValueError for an unknown backend.
    """
    if backend == "faiss":
        from memory_llm.store.faiss_index import FaissIndex

        if dim is None:
            return FaissIndex.load(path, nprobe=nprobe, exact_max=exact_max)
        return FaissIndex.create(dim, size, sample, nprobe=nprobe, exact_max=exact_max)
    raise ValueError(f"unknown vector index backend {backend!r}; known: {', '.join(BACKENDS)}")
