"""Provenance: how a source is named (its uri), and how a request to forget selects memories by it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

from memory_llm.errors import InputError

CONTENT_SCHEMES = ("text:", "stdin:")  # uris named by their content, not by a path


def content_uri(scheme: str, text: str) -> str:
    """The uri of a source known only by its text: `scheme:` and 16 hex digits of its SHA-256.

    Args:
        scheme: what the text came from: "text", "stdin", or "chat:<session>".
        text: the source's text (learning the same text again replaces it rather than adding a copy).
    """
    return f"{scheme}:{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}"


def forget_filter(ids: Sequence[int], source: str | None, namespace: str | None,
                  everything: bool) -> tuple[str, list[Any]]:
    """The WHERE clause (over memories m JOIN sources s) and its arguments selecting what `forget` deletes.

    A source is matched as given and, unless named by its content, as a resolved path (`notes.md` in the
    current folder matches the file learned by its absolute path). Raises InputError when nothing is named or
    an id cannot exist.
    """
    clauses: list[str] = []
    args: list[Any] = []
    if ids:
        if any(not 0 < int(i) < 2 ** 63 for i in ids):
            raise InputError(f"nothing forgotten: no memory matches id(s) {', '.join(map(str, ids))}")
        clauses.append(f"m.id IN ({','.join('?' * len(ids))})")
        args += [int(i) for i in ids]
    if source is not None:
        clauses.append("(s.uri = ? OR s.uri = ?)")
        args += [source, source if source.startswith(CONTENT_SCHEMES) else str(Path(source).expanduser().resolve())]
    if not clauses and not everything:
        raise InputError("say what to forget: memory ids, --source, or --all")
    if namespace is not None:
        clauses.append("m.namespace = ?")
        args.append(namespace)
    return " AND ".join(clauses) or "1", args
