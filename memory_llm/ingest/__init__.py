"""Ingestion: loaders (file → text sections), chunker (text → token-bounded chunks), content hashes."""

from memory_llm.ingest.chunker import Chunk, chunk_text, content_hash
from memory_llm.ingest.loaders import Document, iter_paths, load_file, load_text

__all__ = ["Chunk", "Document", "chunk_text", "content_hash", "iter_paths", "load_file", "load_text"]
