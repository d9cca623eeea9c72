"""Learning: read files and texts, chunk them, drop repeats (same hash, or near-duplicate vectors), embed and
store each source in one transaction."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from memory_llm.config import DEFAULT_NAMESPACE, Settings, check_namespace
from memory_llm.errors import InputError
from memory_llm.ingest import Document, chunk_text, content_hash, iter_paths, load_file, load_text
from memory_llm.store import Store
from memory_llm.store.records import NewChunk

logger = logging.getLogger(__name__)

EMBED_BUFFER = 256  # chunks embedded together across small files


@dataclass
class LearnReport:
    files: int = 0
    unchanged: int = 0
    chunks_added: int = 0
    duplicates_skipped: int = 0
    near_duplicates_skipped: int = 0
    replaced_sources: int = 0
    skipped_files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    memory_ids: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("memory_ids")
        d["seconds"] = round(self.seconds, 3)
        return d



class Learner:
    """Learns into a store with an embedder.

    Args:
        store: the home's store.
        embedder: the home's embedder (encode, count_tokens, max_tokens).
        settings: chunking, dedup threshold, file size limit, embedding batch size.
        bind_embedder: checks once that the home belongs to this embedder (called before the first write).
    """

    def __init__(self, store: Store, embedder, settings: Settings, bind_embedder: Callable[[], None]):
        self.store, self.embedder, self.settings, self.bind_embedder = store, embedder, settings, bind_embedder

    def learn(self, paths: Iterable[str | Path] = (), *, text: str | None = None, namespace: str = DEFAULT_NAMESPACE,
              include: Sequence[str] = (), exclude: Sequence[str] = (), text_field: str | None = None,
              encoding: str = "utf-8", source: str | None = None,
              progress: Callable[[str, int, int], None] | None = None) -> LearnReport:
        """Learn files, directories (recursively) and/or a text.

        Named files are read before anything is stored, so a bad one stops the run with nothing written;
        unreadable files met inside a directory are skipped and reported. Each source is committed in one
        transaction; an unchanged source adds nothing; a changed one replaces its old chunks.

        Args:
            paths: files and directories.
            text: a text to learn (its source is `source` or a hash of the text).
            namespace: the namespace the memories belong to.
            include / exclude: glob patterns for directory members.
            text_field: the field holding the text in JSON/JSONL records.
            progress: called as progress(phase, done, total).
        Returns:
            A LearnReport (files, chunks added, skipped, seconds).
        """
        start = time.perf_counter()
        check_namespace(namespace)
        s = self.settings
        report = LearnReport()
        named: list[Document] = []
        members: list[Path] = []
        if text is not None:
            named.append(load_text(text, source))
        for path, is_named in iter_paths([Path(p) for p in paths], include, exclude):
            if is_named:
                named.append(load_file(path, text_field=text_field, max_mb=s.max_file_mb, encoding=encoding))
            else:
                members.append(path)
        if not named and not members:
            raise InputError("nothing to learn: no learnable files found" if paths else "nothing to learn")
        total = len(named) + len(members)

        def documents() -> Iterator[Document]:
            yield from named
            for path in members:
                try:
                    yield load_file(path, text_field=text_field, max_mb=s.max_file_mb, encoding=encoding)
                except InputError as exc:
                    logger.warning("skipped %s", exc)
                    report.skipped_files.append(str(exc))

        buffer: list[tuple[Document, list]] = []
        done = 0
        for doc in documents():
            report.files += 1
            if self.store.source_hash(namespace, doc.uri) == doc.content_hash:
                report.unchanged += 1
                done += 1
                if progress is not None:
                    progress("learn", done, total)
            else:
                chunks = chunk_text(doc.sections, self.embedder.count_tokens, self._chunk_tokens(), s.chunk_overlap)
                buffer.append((doc, chunks))
            if sum(len(c) for _, c in buffer) >= EMBED_BUFFER:
                done = self._flush(buffer, namespace, report, progress, done, total)
                buffer = []
        done = self._flush(buffer, namespace, report, progress, done, total)
        if progress is not None:
            progress("learn", total, total)
        self.store.flush()
        report.seconds = time.perf_counter() - start
        return report

    def _chunk_tokens(self) -> int:
        """chunk_tokens, capped at the embedder's window (beyond it a chunk's tail would not be embedded)."""
        window = getattr(self.embedder, "max_tokens", None)
        if window and self.settings.chunk_tokens > window - 2:
            logger.warning("chunk_tokens=%d exceeds the embedder's window; using %d", self.settings.chunk_tokens,
                           window - 2)
            return window - 2
        return self.settings.chunk_tokens

    def _flush(self, buffer, namespace: str, report: LearnReport, progress, done: int, total: int) -> int:
        """Embed the buffered documents' chunks in one batch, then commit each document on its own."""
        s = self.settings
        if not buffer:
            return done
        self.bind_embedder()
        self.store.index()  # load (or rebuild) before writing, so writes update it in place
        texts = [c.text for _, chunks in buffer for c in chunks]
        vectors = self.embedder.encode(texts, batch_size=s.embed_batch_size)
        offset = 0
        for doc, chunks in buffer:
            vecs = vectors[offset:offset + len(chunks)]
            offset += len(chunks)
            new = self._novel_chunks(doc, chunks, vecs, namespace, report)
            ids = self.store.replace_source(namespace, doc.uri, doc.content_hash, new)
            report.chunks_added += len(ids)
            report.memory_ids += ids
            done += 1
            if progress is not None:
                progress("learn", done, total)
        return done

    def _novel_chunks(self, doc: Document, chunks, vectors: np.ndarray, namespace: str,
                      report: LearnReport) -> list[NewChunk]:
        """Drop chunks that repeat stored memories (same hash) or nearly repeat them (cosine ≥ threshold)."""
        hashes = [content_hash(c.text) for c in chunks]
        stored = self.store.existing_hashes(namespace, hashes, exclude_uri=doc.uri)
        old_ids = set(self.store.source_memory_ids(namespace, doc.uri))
        threshold = self.settings.dedup_threshold
        nearest = self.store.nearest_scores(np.asarray(vectors), 2, namespace, old_ids)
        kept: list[NewChunk] = []
        seen: set[str] = set()
        for chunk, h, vec, near in zip(chunks, hashes, vectors, nearest):
            if h in stored or h in seen:
                report.duplicates_skipped += 1
                continue
            if near >= threshold or any(float(vec @ k.vector) >= threshold for k in kept):
                report.near_duplicates_skipped += 1
                continue
            seen.add(h)
            kept.append(NewChunk(len(kept), chunk.text, h, vec))
        if old_ids:
            report.replaced_sources += 1
        return kept
