import json
from pathlib import Path

import pytest

from memory_llm import InputError
from memory_llm.ingest import iter_paths, load_file, load_text

FIXTURES = Path(__file__).parent / "fixtures"


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def test_text_and_markdown(tmp_path):
    doc = load_file(write(tmp_path / "a.md", "# Title\n\nSome text."))
    assert doc.sections == ["# Title\n\nSome text."]
    assert doc.uri == str((tmp_path / "a.md").resolve())
    assert len(doc.content_hash) == 64


def test_html_drops_scripts_and_tags(tmp_path):
    doc = load_file(write(tmp_path / "p.html", "<html><head><title>T</title><style>x{}</style></head><body>"
                                               "<p>Hello <b>there</b></p><script>evil()</script><p>Bye</p></body>"))
    assert doc.sections == ["Hello there\nBye"]


def test_pdf_pages():
    doc = load_file(FIXTURES / "herons.pdf")
    assert doc.sections == ["Hello from a PDF page about herons."]


def test_json_and_jsonl_fields(tmp_path):
    j = write(tmp_path / "a.json", json.dumps([{"id": 1, "text": "first"}, {"id": 2, "text": "second"}]))
    assert load_file(j).sections == ["first", "second"]
    jl = write(tmp_path / "b.jsonl", '{"body": "x one"}\n\n{"body": "x two"}\n')
    assert load_file(jl).sections == ["x one", "x two"]
    custom = write(tmp_path / "c.jsonl", '{"note": "n1", "text": "t1"}\n')
    assert load_file(custom, text_field="note").sections == ["n1"]
    with pytest.raises(InputError, match="no field 'missing'"):
        load_file(custom, text_field="missing")
    with pytest.raises(InputError, match="no text field found"):
        load_file(write(tmp_path / "d.json", '{"a": 1}'))
    with pytest.raises(InputError, match=r"d2.jsonl:2: invalid JSON"):
        load_file(write(tmp_path / "d2.jsonl", '{"text": "ok"}\n{oops\n'))


@pytest.mark.parametrize("name,data,message", [
    ("empty.txt", "", "file is empty"),
    ("blank.txt", "  \n\n ", "file is empty"),
    ("bin.txt", b"\x00\x01\x02abc", "binary"),
    ("latin1.txt", "café".encode("latin-1"), r"not valid utf-8 text \(byte 0xe9 at offset 3\)"),
    ("bad.pdf", b"%PDF-1.4 garbage", "not a readable PDF"),
])
def test_unlearnable_files(tmp_path, name, data, message):
    with pytest.raises(InputError, match=message):
        load_file(write(tmp_path / name, data))


def test_other_encoding_on_request(tmp_path):
    path = write(tmp_path / "latin1.txt", "café au lait".encode("latin-1"))
    assert load_file(path, encoding="latin-1").sections == ["café au lait"]


def test_size_limit(tmp_path):
    path = write(tmp_path / "big.txt", "word " * 300_000)  # 1.5 MB
    with pytest.raises(InputError, match=r"1\.4 MB, over the 1 MB limit"):
        load_file(path, max_mb=1)


def test_missing_path():
    with pytest.raises(InputError, match="no such file"):
        load_file(Path("/nonexistent/x.txt"))
    with pytest.raises(InputError, match="no such file"):
        list(iter_paths([Path("/nonexistent")]))


def test_directory_walk_with_globs(tmp_path):
    for rel in ["a.md", "sub/b.txt", "sub/c.json", "sub/skip.txt", ".hidden/d.md", "img.png"]:
        write(tmp_path / "d" / rel, "x")
    found = lambda **kw: sorted(p.relative_to(tmp_path / "d").as_posix() for p, _ in iter_paths([tmp_path / "d"], **kw))
    assert found() == ["a.md", "sub/b.txt", "sub/c.json", "sub/skip.txt"]
    assert found(include=["*.txt"]) == ["sub/b.txt", "sub/skip.txt"]
    assert found(exclude=["skip*", "*.json"]) == ["a.md", "sub/b.txt"]
    assert [named for _, named in iter_paths([tmp_path / "d" / "a.md"])] == [True]


def test_text_source():
    doc = load_text("Remember the milk.")
    assert doc.uri.startswith("text:") and doc.sections == ["Remember the milk."]
    with pytest.raises(InputError):
        load_text("   ")
