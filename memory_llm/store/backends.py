"""The vector index factory: one branch per backend, each imported only when chosen (store/faiss_index.py;
a scale-out backend adds its own file and a branch here)."""

from __future__ import annotations

from pathlib import Path

from memory_llm.store.vectors import Sampler, VectorIndex

BACKENDS = ("faiss",)


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
