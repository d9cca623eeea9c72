"""Learning: read files and texts, chunk them, keep what a re-learned source still says, drop repeats (the same
text, or a near-duplicate that holds the same values), embed, decide what the new memories supersede
(memory_llm.updating) and store each source in one transaction."""

from __future__ import annotations

import logging
import re
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
from memory_llm.updating import Plan, Updater

logger = logging.getLogger(__name__)

EMBED_BUFFER = 256  # chunks embedded together across small files
KEY_SCHEME = "key:"  # `learn --text ... --key NAME`: the source named by the user (a restatement replaces it)
_KEY = re.compile(r"^[^\x00-\x1f\x7f]{1,200}$")


@dataclass
class LearnReport:
    files: int = 0
    unchanged: int = 0
    chunks_added: int = 0
    chunks_kept: int = 0  # chunks of a re-learned source that did not change (they keep their memory ids)
    duplicates_skipped: int = 0
    near_duplicates_skipped: int = 0
    replaced_sources: int = 0
    skipped_files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    memory_ids: list[int] = field(default_factory=list)
    superseded: list[dict] = field(default_factory=list)  # what the new memories made stale (Supersession.as_dict)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("memory_ids")
        d["seconds"] = round(self.seconds, 3)
        return d


def key_source(key: str) -> str:
    """The source uri of a text learned under a key the user chose (`learn --text ... --key NAME`)."""
    if not isinstance(key, str) or not _KEY.match(key) or not key.strip():
        raise InputError(f"a key is 1 to 200 printable characters, not {key!r}")
    return KEY_SCHEME + key


class Learner:
    """Learns into a store with an embedder.

    Args:
        store: the home's store.
        embedder: the home's embedder (encode, count_tokens, max_tokens).
        settings: chunking, dedup threshold, file size limit, embedding batch size, supersession detection.
        bind_embedder: checks once that the home belongs to this embedder (called before the first write).
    """

    def __init__(self, store: Store, embedder, settings: Settings, bind_embedder: Callable[[], None]):
        self.store, self.embedder, self.settings, self.bind_embedder = store, embedder, settings, bind_embedder
        self.updater = Updater(store, embedder, settings)

    def learn(self, paths: Iterable[str | Path] = (), *, text: str | None = None, namespace: str = DEFAULT_NAMESPACE,
              include: Sequence[str] = (), exclude: Sequence[str] = (), text_field: str | None = None,
              encoding: str = "utf-8", source: str | None = None, key: str | None = None,
              supersedes: Sequence[int] = (), reason: str = "user", valid_from: float | None = None,
              detect: bool | None = None, progress: Callable[[str, int, int], None] | None = None) -> LearnReport:
        """Learn files, directories (recursively) and/or a text.

        Named files are read before anything is stored, so a bad one stops the run with nothing written;
        unreadable files met inside a directory are skipped and reported. Each source is committed in one
        transaction; an unchanged source adds nothing; a changed one keeps its unchanged chunks and supersedes the
        rest (kept, out of retrieval).

        Args:
            paths: files and directories.
            text: a text to learn (its source is `source`, its key, or a hash of the text).
            namespace: the namespace the memories belong to.
            include / exclude: glob patterns for directory members.
            text_field: the field holding the text in JSON/JSONL records.
            key: a name for the text's source: learning another text under the same key supersedes the last one.
            supersedes: memory ids the new memories supersede (one text or file only), for `reason` ("user",
                "update", "correction").
            valid_from: when what is learned became true (Unix time; default now).
            detect: look for stored memories the new ones restate with other values (default: the setting
                detect_supersession).
            progress: called as progress(phase, done, total).
        Returns:
            A LearnReport (files, chunks added, skipped, superseded, seconds).
        """
        start = time.perf_counter()
        check_namespace(namespace)
        s = self.settings
        if key is not None:
            if text is None or paths:
                raise InputError("a key names a text: give it with --text (or standard input)")
            if source is not None:
                raise InputError("give a key or a source, not both")
            source = key_source(key)
        detect = s.detect_supersession if detect is None else detect
        if valid_from is not None and valid_from > time.time() + 366 * 86400:
            raise InputError("the date is more than a year ahead")
        named_old = self.updater.check_supersedes(supersedes, namespace)
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
        if named_old and len(named) + len(members) != 1:
            raise InputError("--supersedes applies to one text or file")
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
        options = dict(supersedes=named_old, reason=reason, valid_from=valid_from, detect=detect)
        for doc in documents():
            report.files += 1
            if self.store.source_hash(namespace, doc.uri) == doc.content_hash and not named_old:
                report.unchanged += 1
                done += 1
                if progress is not None:
                    progress("learn", done, total)
            else:
                chunks = chunk_text(doc.sections, self.embedder.count_tokens, self._chunk_tokens(), s.chunk_overlap)
                buffer.append((doc, chunks))
            if sum(len(c) for _, c in buffer) >= EMBED_BUFFER:
                done = self._flush(buffer, namespace, report, progress, done, total, options)
                buffer = []
        done = self._flush(buffer, namespace, report, progress, done, total, options)
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

    def _flush(self, buffer, namespace: str, report: LearnReport, progress, done: int, total: int,
               options: dict) -> int:
        """Embed the buffered documents' chunks in one batch, then plan and commit each document on its own."""
        s = self.settings
        if not buffer:
            return done
        self.bind_embedder()
        self.store.index()  # load (or rebuild) before writing, so writes update it in place
        texts = [c.text for _, chunks in buffer for c in chunks]
        vectors = self.embedder.encode(texts, batch_size=s.embed_batch_size)
        offset = 0
        for doc, chunks in buffer:
            vecs = np.asarray(vectors[offset:offset + len(chunks)])
            offset += len(chunks)
            when = doc.valid_from if doc.valid_from is not None else options["valid_from"]
            new = [NewChunk(i, c.text, content_hash(c.text), v, when) for i, (c, v) in enumerate(zip(chunks, vecs))]
            plan: Plan = self.updater.plan(namespace, doc.uri, new, supersedes=options["supersedes"],
                                           reason=options["reason"], detect=options["detect"])
            ids = self.store.replace_source(namespace, doc.uri, doc.content_hash, plan.chunks, kept=plan.kept,
                                            supersessions=plan.supersessions, valid_from=options["valid_from"],
                                            reason="key" if doc.uri.startswith(KEY_SCHEME) else "source")
            self.updater.retire_exemplars(namespace, plan.supersessions)
            report.chunks_added += len(ids)
            report.chunks_kept += len(plan.kept)
            report.duplicates_skipped += plan.duplicates
            report.near_duplicates_skipped += plan.near_duplicates
            report.replaced_sources += bool(plan.replaced)
            report.memory_ids += ids
            report.superseded += [self.updater.describe(x) for x in plan.supersessions]
            done += 1
            if progress is not None:
                progress("learn", done, total)
        return done
