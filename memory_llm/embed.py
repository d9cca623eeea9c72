"""Embedders: a protocol, the sentence-transformers implementation and token counting for the chunker."""

from __future__ import annotations

import threading
from typing import Protocol, Sequence

import numpy as np

# torch.set_num_threads is process-wide: one query embed at a time may lower it, so that a concurrent one can
# never read the lowered count as "the" count and leave generation on one thread for good.
_THREADS_LOCK = threading.Lock()


class Embedder(Protocol):
    name: str
    dim: int

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress=None) -> np.ndarray:
        """L2-normalised float32 vectors, one row per text."""

    def count_tokens(self, text: str) -> int: ...


class SentenceEmbedder:
    """A sentence-transformers model; counts tokens with its own tokenizer so chunks fit its window."""

    def __init__(self, name: str, device: str = "auto"):
        from memory_llm.models import load_embedder

        self.name = name
        self.model = load_embedder(name, device)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.tokenizer = self.model.tokenizer
        self.max_tokens = int(getattr(self.model, "max_seq_length", 256) or 256)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress=None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(texts) <= 4:
            return self._encode_few(texts)
        out = []
        step = batch_size * 8  # large slices let sentence-transformers sort by length (less padding)
        for i in range(0, len(texts), step):
            batch = list(texts[i:i + step])
            out.append(self.model.encode(batch, batch_size=batch_size, normalize_embeddings=True,
                                         convert_to_numpy=True, show_progress_bar=False))
            if progress is not None:
                progress(len(batch))
        return np.vstack(out).astype(np.float32, copy=False)

    def _encode_few(self, texts: Sequence[str]) -> np.ndarray:
        """A question or two: one torch thread is faster (measured 20 ms vs 65-490 ms with 2 threads right after
        a generation, labs/probe_retrieve.py), the thread pool's wake-up dominates such small work."""
        import torch

        with _THREADS_LOCK:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                vecs = self.model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True,
                                         show_progress_bar=False)
            finally:
                torch.set_num_threads(threads)
        return np.asarray(vecs, dtype=np.float32)
