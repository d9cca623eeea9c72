"""The records a Store hands out and takes in: memories, search hits, new chunks, training items."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Memory:
    """One stored chunk and its provenance (source uri, position in the source)."""

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
    similarity: float | None = None  # the best cosine of a query to it (None: beyond the dense candidates)

    def as_dict(self) -> dict:
        """The hit as JSON-ready fields (the memory's fields inlined)."""
        m = self.memory
        return {"id": m.id, "source": m.source, "position": m.position, "namespace": m.namespace,
                "score": round(self.score, 6), "dense_rank": self.dense_rank,
                "lexical_rank": self.lexical_rank,
                "similarity": None if self.similarity is None else round(self.similarity, 4), "text": m.text}


@dataclass
class NewChunk:
    """A chunk about to be stored: its position in the source, text, content hash and embedding."""

    position: int
    text: str
    content_hash: str
    vector: np.ndarray


@dataclass
class Item:
    """A training item synthesized from one memory; `id` is set once it is stored."""

    memory_id: int
    kind: str  # "cloze" (raw continuation) | "qa" (through the chat template)
    prompt: str
    answer: str
    held_out: bool = False
    id: int | None = None
