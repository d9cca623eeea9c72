"""The vector index factory: one branch per backend, each imported only when chosen (store/faiss_index.py,
store/milvus_index.py)."""

from __future__ import annotations

from pathlib import Path

from memory_llm.store.vectors import Sampler, VectorIndex

BACKENDS = ("faiss", "milvus")
SHARED_BACKENDS = ("milvus",)  # one index every process sees (store/vectors.py `VectorIndex`)


def open_index(path: Path, *, backend: str = "faiss", dim: int | None = None, size: int = 0,
               sample: Sampler | None = None, nprobe: int = 16, exact_max: int = 50_000, uri: str = "",
               token: str = "", collection: str = "") -> VectorIndex:
    """Read the saved index, or (given `dim`) make a new, empty one shaped for `size` vectors.

    Args:
        path: where a FAISS index is saved; read only when `dim` is None (a new index is written by its `save`).
        backend: which implementation; one of BACKENDS.
        dim: the vectors' dimension, to make a new index (Milvus: replacing the collection).
        size: how many vectors the new index will hold (decides its structure).
        sample: stored vectors to train on, for a structure that needs training (FAISS IVF).
        nprobe: inverted lists searched per query (IVF).
        exact_max: up to this many vectors the index searches exactly.
        uri: Milvus: the server (http://host:port) or an embedded Milvus Lite file (ending in .db).
        token: Milvus: the token ('user:password' or an API key), or empty.
        collection: Milvus: the collection's name.

    Returns:
        The index. Raises FileNotFoundError when nothing is saved yet, RuntimeError or OSError when a saved index
        is unreadable, ImportError (with what to install) when the backend's library is missing, ValueError for
        an unknown backend, StoreError when a Milvus server fails.
    """
    if backend == "faiss":
        from memory_llm.store.faiss_index import FaissIndex

        if dim is None:
            if not path.exists():
                raise FileNotFoundError(f"no vector index at {path}")
            return FaissIndex.load(path, nprobe=nprobe, exact_max=exact_max)
        return FaissIndex.create(dim, size, sample, nprobe=nprobe, exact_max=exact_max)
    if backend == "milvus":
        from memory_llm.store.milvus_index import MilvusIndex

        if not uri or not collection:
            raise ValueError("the milvus backend needs a uri and a collection")
        if dim is None:
            return MilvusIndex.load(uri, token, collection, nprobe=nprobe, exact_max=exact_max)
        return MilvusIndex.create(uri, token, collection, dim, size, nprobe=nprobe, exact_max=exact_max)
    raise ValueError(f"unknown vector index backend {backend!r}; known: {', '.join(BACKENDS)}")
