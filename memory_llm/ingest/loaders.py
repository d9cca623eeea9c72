"""Loaders: turn a file (txt, md, html, pdf, json, jsonl) into text sections, with clear errors for bad input."""

from __future__ import annotations

import codecs
import fnmatch
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterable, Iterator

from memory_llm.errors import InputError
from memory_llm.store.sources import content_uri

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text", ""}
SUFFIXES = TEXT_SUFFIXES | {".html", ".htm", ".pdf", ".json", ".jsonl", ".ndjson"}
TEXT_FIELDS = ("text", "content", "body", "train_context", "document", "passage")


@dataclass
class Document:
    """What a loader produces: a uri (provenance), sections of text, and the hash of the raw bytes."""

    uri: str
    sections: list[str]
    content_hash: str
    valid_from: float | None = None  # when what it says became true, where the source says so (else the learn's)


def load_text(text: str, uri: str | None = None) -> Document:
    """A document from a string (`--text` or stdin); its uri is derived from the content when not given."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if not text.strip():
        raise InputError("nothing to learn: the text is empty")
    return Document(uri or content_uri("text", text), [text], digest)


def load_file(path: Path, *, text_field: str | None = None, max_mb: float = 20.0,
              encoding: str = "utf-8") -> Document:
    """Read one file into a Document. Raises InputError with a one-line reason when it is not learnable."""
    path = Path(path)
    st = _stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: not a regular file")
    size = st.st_size
    if size > max_mb * 1024 * 1024:
        raise InputError(f"{path}: file is {size / 1024 / 1024:.1f} MB, over the {max_mb:g} MB limit"
                         " (raise it with --max-file-mb)")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    if not raw.strip():
        raise InputError(f"{path}: file is empty, nothing to learn")
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        sections = _pdf_sections(path, raw)
    else:
        text = _decode_bom(raw)
        if text is None:
            if b"\x00" in raw[:8192]:
                raise InputError(f"{path}: looks like a binary file, nothing to learn")
            text = _decode(path, raw, encoding)
        if suffix in (".html", ".htm"):
            sections = [_html_text(text)]
        elif suffix == ".json":
            sections = _json_sections(path, text, text_field)
        elif suffix in (".jsonl", ".ndjson"):
            sections = _jsonl_sections(path, text, text_field)
        else:
            sections = [text]
    sections = [s.strip() for s in sections if s and s.strip()]
    if not sections:
        raise InputError(f"{path}: no text found, nothing to learn")
    return Document(str(path.resolve()), sections, hashlib.sha256(raw).hexdigest())


# a byte-order mark names the encoding (UTF-32 before UTF-16: its little-endian mark starts with UTF-16's)
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _decode_bom(raw: bytes) -> str | None:
    """The text of a file that starts with a byte-order mark (UTF-8/16/32), or None."""
    for mark, encoding in _BOMS:
        if raw.startswith(mark):
            try:
                return raw.decode(encoding)
            except UnicodeDecodeError:
                return None  # a binary file that happens to start like a mark
    return None


def _stat(path: Path) -> os.stat_result:
    """stat() a path with a one-line InputError for every way it can fail (missing, loop, too long, denied)."""
    try:
        return path.stat()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file or directory") from None
    except (OSError, ValueError) as exc:  # ValueError: an embedded NUL byte
        raise InputError(f"{path}: cannot open ({getattr(exc, 'strerror', None) or exc})") from None


def _decode(path: Path, raw: bytes, encoding: str) -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid {encoding} text (byte 0x{raw[exc.start]:02x} at offset {exc.start});"
                         " convert it to UTF-8 or pass --encoding") from None
    except LookupError:
        raise InputError(f"unknown encoding {encoding!r}") from None


class _TextExtractor(HTMLParser):
    SKIP = {"script", "style", "noscript", "template", "head"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre",
             "blockquote", "title", "table", "ul", "ol"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self._skip:
            self._skip -= 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def _html_text(html: str) -> str:
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


def _pdf_sections(path: Path, raw: bytes) -> list[str]:
    try:
        import io

        from pypdf import PdfReader
    except ImportError:  # pragma: no cover
        raise InputError("reading PDF needs pypdf: pip install pypdf") from None
    try:
        reader = PdfReader(io.BytesIO(raw))
        return [page.extract_text() or "" for page in reader.pages]
    except Exception as exc:  # a parser of untrusted bytes raises anything (fuzzing found LimitReachedError)
        raise InputError(f"{path}: not a readable PDF ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _field(path: Path, record, text_field: str | None, where: str) -> str | None:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        return None
    if text_field:
        if text_field not in record:
            raise InputError(f"{path}{where}: no field {text_field!r} (fields: {', '.join(list(record)[:8])})")
        value = record[text_field]
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    for name in TEXT_FIELDS:
        if isinstance(record.get(name), str):
            return record[name]
    raise InputError(f"{path}{where}: no text field found; choose one with --text-field"
                     f" (fields: {', '.join(list(record)[:8])})")


def _json_sections(path: Path, text: str, text_field: str | None) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to read") from None
    records = data if isinstance(data, list) else [data]
    return [s for i, r in enumerate(records) if (s := _field(path, r, text_field, f" item {i}"))]


def _jsonl_sections(path: Path, text: str, text_field: str | None) -> list[str]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise InputError(f"{path}:{n}: JSON nested too deeply to read") from None
        if (s := _field(path, record, text_field, f":{n}")):
            out.append(s)
    return out


def iter_paths(paths: Iterable[Path], include: Iterable[str] = (), exclude: Iterable[str] = ()) -> Iterator[tuple[Path, bool]]:
    """Expand files and directories (recursively) into (file, named) pairs; named = given explicitly.

    Directory members are kept when their suffix is learnable, they match an include glob (if any) and no
    exclude glob; hidden files and folders are skipped.
    """
    include, exclude = list(include), list(exclude)

    def wanted(p: Path, root: Path) -> bool:
        rel = p.relative_to(root).as_posix()
        if any(part.startswith(".") for part in p.relative_to(root).parts):
            return False
        if include and not any(fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(p.name, g) for g in include):
            return False
        if any(fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(p.name, g) for g in exclude):
            return False
        return include != [] or p.suffix.lower() in SUFFIXES - {""}

    for path in paths:
        path = Path(path).expanduser()
        if stat.S_ISDIR(_stat(path).st_mode):
            for p in sorted(path.rglob("*")):
                if p.is_file() and wanted(p, path):
                    yield p, False
        else:
            yield path, True
