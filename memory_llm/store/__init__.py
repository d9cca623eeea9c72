"""Storage: SQLite (source of truth) and the vector index derived from it."""

from memory_llm.store.prompts import Exemplar, LoggedAnswer, Template
from memory_llm.store.sqlite import Hit, Memory, Store
from memory_llm.store.vectors import FaissIndex, VectorIndex

__all__ = ["Exemplar", "FaissIndex", "Hit", "LoggedAnswer", "Memory", "Store", "Template", "VectorIndex"]
