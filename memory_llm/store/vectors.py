"""The vector index behind a small protocol, and the one factory that picks a backend.

The index is derived data: SQLite holds every embedding, so an index can always be rebuilt, and the Store checks
it against SQLite by a fingerprint of the ids it holds. A backend is one module (FAISS: store/faiss_index.py,
Milvus: store/milvus_index.py) plus one branch in `backends.open_index`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

logger = logging.getLogger(__name__)

Fingerprint = tuple[int, int, int]  # (count, sum of ids, max id)
Sampler = Callable[[int], np.ndarray]  # up to n stored vectors at random, shape (<= n, dim)


class VectorIndex(Protocol):
    """What the store needs from a vector index. Vectors are L2-normalised; scores are inner products.

    Two kinds of index:
      private (`shared` False, FAISS): this process's copy, saved to a file; the store applies its own writes after
          they commit and reloads when another process wrote.
      shared (`shared` True, Milvus): one collection every process sees; the store applies a write inside its
          SQLite transaction (so the two move under one lock) and `save` only makes the writes durable.
    An index that `filters` takes a namespace in `search`/`search_many` and filters inside the engine; the store
    over-fetches and filters through SQLite for one that does not.
    """

    kind: str  # the index structure, reported by `mllm stats` ("flat" or "ivf")
    dim: int
    filters: bool  # search/search_many take a namespace
    shared: bool  # the index lives outside this process (see above)

    def __len__(self) -> int: ...

    def add(self, ids: np.ndarray, vectors: np.ndarray, namespaces: Sequence[str] | None = None) -> None:
        """Add vectors under their memory ids; `namespaces` (one per id) is required by an index that filters."""

    def remove(self, ids: np.ndarray) -> bool:
        """Remove ids; return False when the index cannot remove in place (the caller rebuilds)."""

    def search(self, query: np.ndarray, k: int, namespace: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the k nearest vectors to one query, best first; fewer when the index is small.
        A namespace is allowed only when the index `filters`."""

    def search_many(self, queries: np.ndarray, k: int,
                    namespace: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of shape (n, k) for n queries; missing neighbours have id -1."""

    def fingerprint(self) -> Fingerprint:
        """`fingerprint_of` the ids the index holds (compared with SQLite's)."""

    def fits(self, n: int) -> bool:
        """Whether the index still suits n vectors; False: rebuild it from SQLite."""

    def save(self, path: Path) -> None:
        """Make the index durable: a private one is written to `path` atomically (a crash leaves the old file or
        the new one); a shared one is flushed."""

    def close(self) -> None:
        """Release what the index holds open (connections); the index is not used afterwards."""


def fingerprint_of(ids: np.ndarray) -> Fingerprint:
    """(count, sum, max) of a set of ids: cheap to compute on both sides, and any add or remove changes it."""
    ids = np.asarray(ids, dtype=np.int64)
    return (int(ids.size), int(ids.sum()) if ids.size else 0, int(ids.max()) if ids.size else 0)
