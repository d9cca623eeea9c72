"""The records a Store hands out and takes in: memories, search hits, new chunks, training items."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

import numpy as np


@dataclass
class Memory:
    """One stored chunk, its provenance (source uri, position in the source) and its time: when it was learned
    (`learned_at`) and when what it says became true (`valid_from`, the learn time unless given). A memory
    superseded as a whole (`superseded_at` set) is kept but leaves retrieval; one whose sentences were superseded
    one by one keeps serving the rest (`stale_sentences`; `live_text` is its text without them)."""

    id: int
    namespace: str
    source: str
    position: int
    text: str
    learned_at: float
    valid_from: float
    superseded_at: float | None = None
    stale_sentences: tuple[str, ...] = ()

    @property
    def live(self) -> bool:
        """Whether the memory is live (not superseded as a whole)."""
        return self.superseded_at is None

    @property
    def live_text(self) -> str:
        """The text without its superseded sentences (what is still true)."""
        text = self.text
        for sentence in self.stale_sentences:
            text = text.replace(sentence, "")
        return " ".join(text.split()) if self.stale_sentences else text

    @property
    def prompt_text(self) -> str:
        """How the memory is given to the model as a source: dated (when it became true), what is still true."""
        return f"({iso_date(self.valid_from)}) {self.live_text}"

    @property
    def status(self) -> str:
        """live | superseded | partly superseded."""
        return "superseded" if not self.live else "partly superseded" if self.stale_sentences else "live"

    @classmethod
    def from_row(cls, row, stale: Sequence[str] = ()) -> "Memory":
        """A Memory from a row holding MEMORY_COLUMNS' names (sqlite3.Row or a dict)."""
        learned = float(row["created_at"])
        valid = row["valid_from"]
        return cls(id=row["id"], namespace=row["namespace"], source=row["uri"], position=row["position"],
                   text=row["text"], learned_at=learned, valid_from=learned if valid is None else float(valid),
                   superseded_at=row["superseded_at"], stale_sentences=tuple(stale))

    def as_dict(self) -> dict:
        """The memory as JSON-ready fields (times as ISO 8601)."""
        return {"id": self.id, "namespace": self.namespace, "source": self.source, "position": self.position,
                "learned_at": iso_time(self.learned_at), "valid_from": iso_time(self.valid_from),
                "status": self.status, "superseded_at": iso_time(self.superseded_at),
                "stale_sentences": list(self.stale_sentences), "text": self.text}


MEMORY_COLUMNS = ("m.id AS id, m.namespace AS namespace, s.uri AS uri, m.position AS position, m.text AS text,"
                  " m.created_at AS created_at, m.valid_from AS valid_from, m.superseded_at AS superseded_at")


def iso_time(t: float | None) -> str | None:
    """A time as ISO 8601 in the machine's time zone, to the second (None stays None)."""
    if t is None:
        return None
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def iso_date(t: float) -> str:
    """A time's date (local), YYYY-MM-DD: how sources carry their date to the model and in short listings."""
    return datetime.fromtimestamp(t).astimezone().date().isoformat()


@dataclass
class Hit:
    """A retrieved memory with its fused score and the ranks that produced it."""

    memory: Memory
    score: float
    dense_rank: int | None = None
    lexical_rank: int | None = None
    similarity: float | None = None  # the best cosine of a query to it (None: beyond the dense candidates)

    def as_dict(self) -> dict:
        """The hit as JSON-ready fields (the memory's fields inlined; `text` is what is still true of it)."""
        m = self.memory
        return {"id": m.id, "source": m.source, "position": m.position, "namespace": m.namespace,
                "score": round(self.score, 6), "dense_rank": self.dense_rank,
                "lexical_rank": self.lexical_rank,
                "similarity": None if self.similarity is None else round(self.similarity, 4),
                "learned_at": iso_time(m.learned_at), "valid_from": iso_time(m.valid_from), "status": m.status,
                **({"superseded_at": iso_time(m.superseded_at)} if not m.live else {}),
                **({"stale_sentences": list(m.stale_sentences)} if m.stale_sentences else {}),
                "text": m.live_text}


@dataclass
class NewChunk:
    """A chunk about to be stored: its position in the source, text, content hash, embedding and time."""

    position: int
    text: str
    content_hash: str
    vector: np.ndarray
    valid_from: float | None = None  # when what it says became true (None: the learn's date, else now)


@dataclass
class Item:
    """A training item synthesized from one memory; `id` is set once it is stored."""

    memory_id: int
    kind: str  # "cloze" (raw continuation) | "qa" (through the chat template)
    prompt: str
    answer: str
    held_out: bool = False
    id: int | None = None
