"""Token-aware chunking at sentence boundaries, with overlap, and content hashes."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Callable

# A chunk holds at most this many characters per token of its budget: a tokenizer may count a 3 MB "word"
# as one unknown token, and such a chunk would flood the prompt.
MAX_CHARS_PER_TOKEN = 16
# A sentence ends at . ! ? (optionally followed by quotes/brackets) before whitespace, or at a blank line.
_SENTENCE = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n\s*\n+")


@dataclass
class Chunk:
    text: str
    position: int


def content_hash(text: str) -> str:
    """Hash of a chunk's text with its whitespace folded, for exact de-duplication. Letter case counts: "Tulip9"
    and "tulip9" are different passwords."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text) if s and s.strip()]


def chunk_text(sections: list[str], count_tokens: Callable[[str], int], max_tokens: int = 200,
               overlap: int = 40) -> list[Chunk]:
    """Pack sentences into chunks of at most max_tokens; the next chunk starts with trailing sentences of the
    previous one worth up to `overlap` tokens. A sentence longer than max_tokens is split on words (a word
    longer than that on characters); a chunk never exceeds max_tokens * MAX_CHARS_PER_TOKEN characters.
    Chunks never span two sections (pages, records)."""
    chunks: list[Chunk] = []
    max_chars = max_tokens * MAX_CHARS_PER_TOKEN
    for section in sections:
        units: list[tuple[str, int]] = []
        for sentence in split_sentences(section):
            n = count_tokens(sentence)
            if n <= max_tokens and len(sentence) <= max_chars:
                units.append((sentence, n))
            else:
                units.extend(_split_long(sentence, count_tokens, max_tokens))
        current: list[tuple[str, int]] = []
        size = chars = 0  # tokens and characters (with the joining spaces) in `current`
        for unit in units:
            if current and (size + unit[1] > max_tokens or chars + 1 + len(unit[0]) > max_chars):
                chunks.append(Chunk(" ".join(u[0] for u in current), len(chunks)))
                carry: list[tuple[str, int]] = []
                carried = carried_chars = 0
                for prev in reversed(current):
                    if (carried + prev[1] > overlap or carried + prev[1] + unit[1] > max_tokens
                            or carried_chars + len(prev[0]) + 1 + len(unit[0]) > max_chars):
                        break
                    carry.insert(0, prev)
                    carried += prev[1]
                    carried_chars += len(prev[0]) + 1
                current, size, chars = carry, carried, max(carried_chars - 1, 0)
            chars += len(unit[0]) + (1 if current else 0)
            current.append(unit)
            size += unit[1]
        if current:
            chunks.append(Chunk(" ".join(u[0] for u in current), len(chunks)))
    return chunks


def _split_long(sentence: str, count_tokens: Callable[[str], int], max_tokens: int) -> list[tuple[str, int]]:
    """Split on words; a word that alone is too long (a URL, base64, a script without spaces) on characters."""
    max_chars = max_tokens * MAX_CHARS_PER_TOKEN
    out: list[tuple[str, int]] = []
    for piece in _fit(sentence.split(), " ", count_tokens, max_tokens, max_chars, bound=max_tokens):
        if count_tokens(piece) > max_tokens or len(piece) > max_chars:
            out += [(p, count_tokens(p)) for p in _fit(list(piece), "", count_tokens, max_tokens, max_chars,
                                                        bound=max_chars)]
        else:
            out.append((piece, count_tokens(piece)))
    return out


def _fit(parts: list[str], sep: str, count_tokens: Callable[[str], int], max_tokens: int, max_chars: int,
         bound: int) -> list[str]:
    """Consecutive parts joined into pieces, each the longest within max_tokens and max_chars (at least one
    part); a piece never spans more than `bound` parts, so a huge input costs O(n log bound), not O(n²)."""
    out, start = [], 0
    while start < len(parts):
        lo, hi = start + 1, min(len(parts), start + bound)
        while lo < hi:  # largest end that fits (binary search: both limits grow with the end)
            mid = (lo + hi + 1) // 2
            text = sep.join(parts[start:mid])
            if len(text) <= max_chars and count_tokens(text) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        out.append(sep.join(parts[start:lo]))
        start = lo
    return out
