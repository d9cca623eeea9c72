"""Storage: SQLite (source of truth) and the vector index derived from it."""

from memory_llm.store.faiss_index import FaissIndex
from memory_llm.store.prompts import Exemplar, LoggedAnswer, Template
from memory_llm.store.records import Hit, Item, Memory, NewChunk
from memory_llm.store.sources import content_uri
from memory_llm.store.sqlite import Store
from memory_llm.store.backends import open_index
from memory_llm.store.vectors import VectorIndex

__all__ = ["Exemplar", "FaissIndex", "Hit", "Item", "LoggedAnswer", "Memory", "NewChunk", "Store", "Template",
           "VectorIndex", "content_uri", "open_index"]
