"""The hostile-input catalogue (docs/hostile-inputs.md lists every case with its test): each input either
gives one `Error:` line and exit 1, or is handled correctly; either way nothing stored changes."""

import json
import os
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memory_llm import InputError, MemoryLLM, StoreError
from memory_llm.config import Settings
from memory_llm.evaluate import load_probes
from memory_llm.ingest import chunk_text, load_file
from test_cli import assert_clean_error, fake_models, mllm, stored  # noqa: F401 - fake_models is an autouse fixture

BASELINE = "Owls hunt at night in the old forest."


@pytest.fixture(autouse=True)
def baseline(fake_models):  # noqa: F811 - after the fakes are in place
    """One memory that every case must leave as it was."""
    assert mllm("learn", "--text", BASELINE).exit_code == 0
    yield
    hits = json.loads(mllm("search", "owls forest", "--json").stdout)["hits"]
    assert any(h["text"] == BASELINE for h in hits), "the baseline memory changed"


def deep_json(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


def write(path: Path, data) -> Path:
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data, encoding="utf-8")
    return path


def symlink_loop(p: Path) -> Path:
    os.symlink(p / "loop-b", p / "loop-a")
    os.symlink(p / "loop-a", p / "loop-b")
    return p / "loop-a"


def broken_pdf(p: Path) -> Path:
    real = (Path(__file__).parent / "fixtures" / "herons.pdf").read_bytes()
    return write(p / "cut.pdf", real[:300])


ERRORS = {  # case → (setup returning the arguments, fragment of the one-line error)
    "nul-bytes": (lambda p: ["learn", str(write(p / "n.txt", b"text\x00more"))], "binary"),
    "utf16-without-bom-is-binary": (lambda p: ["learn", str(write(p / "u.txt", "hi there".encode("utf-16-le")))],
                                    "binary"),
    "unknown-encoding": (lambda p: ["learn", str(write(p / "a.txt", "x")), "--encoding", "klingon"],
                         "unknown encoding"),
    "file-name-too-long": (lambda p: ["learn", str(p / ("x" * 300 + ".txt"))], "File name too long"),
    "symlink-loop": (lambda p: ["learn", str(symlink_loop(p))], "symbolic links"),
    "fifo": (lambda p: (os.mkfifo(p / "f.txt"), ["learn", str(p / "f.txt")])[1], "not a regular file"),
    "device": (lambda p: ["learn", "/dev/zero"], "not a regular file"),
    "deep-json": (lambda p: ["learn", str(write(p / "d.json", deep_json()))], "nested too deeply"),
    "deep-jsonl": (lambda p: ["learn", str(write(p / "d.jsonl", '{"text": "ok"}\n' + deep_json() + "\n"))],
                   "d.jsonl:2: JSON nested too deeply"),
    "malformed-json": (lambda p: ["learn", str(write(p / "m.json", '{"text": "x",'))], "invalid JSON"),
    "malformed-jsonl-line": (lambda p: ["learn", str(write(p / "m.jsonl", '{"text": "a"}\n{oops\n'))],
                             "m.jsonl:2: invalid JSON"),
    "json-without-text": (lambda p: ["learn", str(write(p / "n.json", '{"n": 5}'))], "no text field"),
    "truncated-pdf": (lambda p: ["learn", str(broken_pdf(p))], "not a readable PDF"),
    "random-bytes-pdf": (lambda p: ["learn", str(write(p / "r.pdf", os.urandom(3000)))], "not a readable PDF"),
    "path-traversal-name": (lambda p: ["learn", str(p / ".." / ".." / ".." / "no-such-dir" / "passwd")],
                            "no such file"),
    "empty-search": (lambda p: ["search", ""], "query is empty"),
    "whitespace-search": (lambda p: ["search", " \t\n "], "query is empty"),
    "forget-id-beyond-int64": (lambda p: ["forget", str(2 ** 70)], "no memory matches id(s)"),
    "home-is-a-file": (lambda p: ["learn", "--text", "x", "--home", str(write(p / "f", "x"))],
                       "cannot create memory home"),
    "eval-deep-json": (lambda p: ["eval", str(write(p / "e.jsonl", deep_json() + "\n"))], "nested too deeply"),
    "eval-not-an-object": (lambda p: ["eval", str(write(p / "e.jsonl", "[1, 2]\n"))], "must be a JSON object"),
    "eval-huge-line": (lambda p: ["eval", str(write(p / "e.jsonl", '{"input": "' + "x" * 2_000_000 + '"}\n'))],
                       "'answers' must be"),
    "eval-name-too-long": (lambda p: ["eval", str(p / ("e" * 300 + ".jsonl"))], "File name too long"),
    "learn-date-not-iso": (lambda p: ["learn", "--text", "Owls sleep by day.", "--date", "31/12/2026"], "not a date"),
    "learn-date-far-ahead": (lambda p: ["learn", "--text", "Owls sleep by day.", "--date", "2999-01-01"],
                             "more than a year ahead"),
    "learn-supersedes-unknown": (lambda p: ["learn", "--text", "Owls sleep by day.", "--supersedes", "999999"],
                                 "no memory has id 999999"),
    "learn-supersedes-beyond-int64": (lambda p: ["learn", "--text", "Owls sleep.", "--supersedes", str(2 ** 70)],
                                      "no memory has id"),
    "learn-key-control-characters": (lambda p: ["learn", "--text", "Owls sleep.", "--key", "a\x01b"],
                                     "a key is 1 to 200 printable characters"),
    "learn-key-with-a-file": (lambda p: ["learn", str(write(p / "k.txt", "Owls sleep.")), "--key", "k"],
                              "a key names a text"),
    "update-empty-text": (lambda p: ["update", "1", "  "], "the new text is empty"),
    "update-unknown": (lambda p: ["update", "999999", "Owls sleep."], "no memory has id 999999"),
    "history-beyond-int64": (lambda p: ["history", str(2 ** 70)], "no memory has id"),
    "restore-unknown": (lambda p: ["restore", "999999"], "no memory has id 999999"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_hostile_input_is_one_clean_error(tmp_path, case):
    setup, fragment = ERRORS[case]
    result = mllm(*setup(tmp_path))
    assert_clean_error(result, fragment)
    assert stored() == 1


def test_unreadable_file_is_one_clean_error(tmp_path, monkeypatch):
    path = write(tmp_path / "secret.txt", "private")
    real = Path.read_bytes

    def read_bytes(self):  # (tests may run as root, where chmod 000 does not stop reading: simulate EACCES)
        if self.name == "secret.txt":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert_clean_error(mllm("learn", str(path)), "cannot read (Permission denied)")
    assert stored() == 1


@pytest.mark.parametrize("config,fragment", [
    ("a = " + "[" * 5000 + "]" * 5000, "nested too deeply"),
    ("top_k = [1, 2]", "top_k=[1, 2] is not a valid int"),
    ("top_k = -3", "top_k=-3 must be > 0"),
    ("colour = 'blue'", "unknown setting 'colour'"),
    ("model = \"\xff", "not valid TOML"),
])
def test_hostile_settings_file_is_one_clean_error(config, fragment):
    path = Path(os.environ["MLLM_HOME"]) / "config.toml"
    path.write_text(config, encoding="latin-1")
    assert_clean_error(mllm("stats"), fragment)
    path.unlink()


def test_huge_line_without_spaces_is_cut_into_bounded_chunks(tmp_path):
    path = write(tmp_path / "line.txt", "a" * 3_000_000)
    out = json.loads(mllm("learn", str(path), "--json").stdout)
    texts = [h["text"] for h in json.loads(mllm("search", "a" * 50, "-k", "3", "--json").stdout)["hits"]]
    assert out["chunks_added"] > 1 and all(len(t) <= 200 * 16 for t in texts)


def test_character_limit_holds_whatever_the_tokenizer_counts():
    one_token = lambda text: 1  # noqa: E731 - a tokenizer that maps any long word to one unknown token
    chunks = chunk_text(["x" * 100_000 + " tail."], one_token, max_tokens=50, overlap=0)
    assert all(len(c.text) <= 50 * 16 for c in chunks) and "".join(c.text for c in chunks).startswith("x" * 1000)


@pytest.mark.parametrize("name,data", [
    ("utf16.txt", "Herons nest in tall trees.".encode("utf-16")),
    ("utf8bom.txt", "Herons nest in tall trees.".encode("utf-8-sig")),
    ("utf32.txt", "Herons nest in tall trees.".encode("utf-32")),
])
def test_files_with_a_byte_order_mark_are_decoded(tmp_path, name, data):
    assert mllm("learn", str(write(tmp_path / name, data))).exit_code == 0
    hit = json.loads(mllm("search", "herons nest", "--json").stdout)["hits"][0]
    assert hit["text"] == "Herons nest in tall trees."


def test_invisible_bidi_emoji_and_mixed_scripts_round_trip(tmp_path):
    text = "Ze\u200bro\u200dwidth \u202eRTL\u202c mark. Καλημέρα κόσμε مرحبا שלום 你好世界 🦉🎉 naïve café."
    assert mllm("learn", "--text", text).exit_code == 0
    for query in ("Καλημέρα", "مرحبا", "🦉", "café"):
        hits = json.loads(mllm("search", query, "--json").stdout)["hits"]
        assert any(h["text"] == text for h in hits), query


def test_ten_thousand_tiny_files(tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    for i in range(10_000):
        (d / f"f{i:05d}.txt").write_text(f"Tiny note {i} mentions token t{i} and code c{i * 7}.")
    out = json.loads(mllm("learn", str(d), "--json").stdout)
    assert out["files"] == 10_000 and stored() == 1 + out["chunks_added"] and out["chunks_added"] > 9_000


def test_directory_named_like_a_file_and_a_looping_tree(tmp_path):
    d = tmp_path / "notes.txt"
    d.mkdir()
    write(d / "inner.md", "Herons nest in tall trees.")
    os.symlink(d, d / "self")  # a link back to its own folder: the walk must terminate
    out = json.loads(mllm("learn", str(d), "--json").stdout)
    assert out["files"] == 1 and out["chunks_added"] == 1


def test_malformed_html_is_learned_leniently(tmp_path):
    path = write(tmp_path / "b.html", "<html><body><p>Herons <b>nest <script>evil()</script> in trees<div")
    assert mllm("learn", str(path)).exit_code == 0
    texts = [h["text"] for h in json.loads(mllm("search", "herons", "--json").stdout)["hits"]]
    assert any("Herons" in t and "evil" not in t for t in texts)


def test_sql_text_is_stored_verbatim(tmp_path):
    text = "Robert'); DROP TABLE memories;-- and \" OR 1=1 -- are names; SELECT * FROM sources;"
    assert mllm("learn", "--text", text).exit_code == 0
    assert any(h["text"] == text for h in json.loads(mllm("search", "Robert", "--json").stdout)["hits"])
    assert stored() == 2


@pytest.mark.parametrize("query", ['"unbalanced', "owls)", "((owls", "NEAR(owls forest)", "owls*", "* ^ -",
                                   "owls AND OR NOT", "text:owls", "owls'; DROP TABLE memories;--", "{owls}"])
def test_full_text_query_syntax_is_plain_text(query):
    result = mllm("search", query, "--json")
    assert result.exit_code == 0, result.output
    assert stored() == 1


def test_question_longer_than_the_model_window_is_one_clean_error():
    question = "why " * 1100  # the tiny model reads 4096 positions; its tokenizer is one token per character
    assert_clean_error(mllm("ask", question, "--max-new-tokens", "2"), "the model reads at most 4096")
    assert mllm("ask", "why " * 100, "--max-new-tokens", "2").exit_code == 0


def test_huge_query_uses_a_bounded_full_text_match(tmp_path, fake_embedder):
    m = MemoryLLM(Path(os.environ["MLLM_HOME"]), embedder=fake_embedder)
    statements = []
    m.store.db.set_trace_callback(statements.append)
    hits = m.search("owls forest " + " ".join(f"w{i}" for i in range(200_000)), 3)
    match = [s for s in statements if "MATCH" in s][0]
    assert hits[0].memory.text == BASELINE and match.count(" OR ") < 64
    m.close()


def test_path_like_namespace_stays_inside_the_home(tmp_path):
    before = set(tmp_path.rglob("*"))
    assert mllm("learn", "--text", "Herons nest in trees.", "-n", "../../escape").exit_code == 0
    hits = json.loads(mllm("search", "herons", "-n", "../../escape", "--json").stdout)["hits"]
    assert len(hits) == 1 and hits[0]["namespace"] == "../../escape"
    assert json.loads(mllm("search", "herons", "--json").stdout)["hits"][0]["text"] == BASELINE
    created = {p for p in set(tmp_path.rglob("*")) - before if "home" not in p.relative_to(tmp_path).parts}
    assert not created


def test_read_only_database_reads_and_refuses_writes_cleanly(monkeypatch):
    from memory_llm.store import sqlite as store_sqlite

    real = sqlite3.connect  # (root ignores chmod; open the file read-only as a non-owner would)
    with monkeypatch.context() as patch:
        patch.setattr(store_sqlite.sqlite3, "connect", lambda path, **kw: real(f"file:{path}?mode=ro", uri=True, **kw))
        assert json.loads(mllm("search", "owls", "--json").stdout)["hits"][0]["text"] == BASELINE
        assert_clean_error(mllm("learn", "--text", "Herons fish at dawn."), "readonly database")
    assert stored() == 1


def test_damaged_database_pages_give_clean_errors_and_doctor_says_so(tmp_path, fake_embedder):
    home = tmp_path / "other-home"  # (its only connection is closed below, so every page is in the main file)
    m = MemoryLLM(home, embedder=fake_embedder)
    for i in range(150):
        m.learn(text=f"Record {i} says r{i} s{i * 3} t{i * 7} " * 10, source=f"s{i}")
    m.close()
    raw = bytearray((home / "memory.sqlite").read_bytes())
    page = 4096
    for off in range(page * 20, len(raw) - page, page):
        raw[off + 100:off + 3000] = b"\xaa" * 2900
    (home / "memory.sqlite").write_bytes(bytes(raw))
    assert_clean_error(mllm("stats", "--home", str(home)), "run `mllm doctor`")
    report = mllm("doctor", "--json", "--home", str(home))
    assert report.exit_code == 1
    checks = json.loads(report.stdout)["checks"]
    assert checks[0]["check"] == "sqlite" and not checks[0]["ok"] and "backup" in checks[0]["detail"]


def test_garbage_database_file_is_a_clean_error(tmp_path):
    other = tmp_path / "other-home"  # (a fresh path: this process still has the baseline home open)
    other.mkdir()
    write(other / "memory.sqlite", os.urandom(8192))
    assert_clean_error(mllm("learn", "--text", "x", "--home", str(other)), "file is not a database")


def test_truncated_vector_index_is_rebuilt():
    path = Path(os.environ["MLLM_HOME"]) / "index" / "vectors.faiss"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = mllm("search", "owls", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["hits"][0]["text"] == BASELINE


def test_another_embedder_dimension_is_refused(tmp_path):
    from conftest import FakeEmbedder

    other = MemoryLLM(Path(os.environ["MLLM_HOME"]), embedder=FakeEmbedder(dim=32))
    with pytest.raises(InputError, match=r"embedded with 'fake-embedder' \(dim 64\)"):
        other.learn(text="Herons fish at dawn.")
    with pytest.raises(InputError, match="embedded with"):
        other.search("owls")
    other.close()


# ---- adapters: doctor and doctor --repair -------------------------------------------------------------
def make_version(root: Path, name: str, base: str = "smollm2") -> Path:
    """A version directory with a real safetensors file (tiny), a config and a manifest."""
    from safetensors.numpy import save_file

    path = root / name
    path.mkdir(parents=True)
    save_file({"lora_A": np.ones((4, 8), dtype=np.float32)}, str(path / "adapter_model.safetensors"))
    write(path / "adapter_config.json", json.dumps({"peft_type": "LORA", "r": 4}))
    write(path / "manifest.json", json.dumps({"base_model": base, "version": name, "memories": []}))
    return path


def adapters_doctor(*args):
    result = mllm("doctor", "--json", *args)
    report = json.loads(result.stdout)
    return result.exit_code, [c for c in report["checks"] if c["check"] == "adapters"][0], report["repaired"]


@pytest.mark.parametrize("damage,detail", [
    (lambda v: (v / "adapter_model.safetensors").write_bytes((v / "adapter_model.safetensors").read_bytes()[:-40]),
     "weights truncated"),
    (lambda v: (v / "adapter_model.safetensors").write_bytes(b"\xff" * 64), "weights unreadable"),
    (lambda v: (v / "manifest.json").write_text("{broken"), "manifest unreadable"),
    (lambda v: (v / "adapter_config.json").unlink(), "adapter_config.json missing"),
    (lambda v: [f.unlink() for f in v.iterdir()] and v.rmdir(), "missing"),
])
def test_doctor_finds_a_broken_current_adapter_and_repair_rolls_back(damage, detail):
    root = Path(os.environ["MLLM_HOME"]) / "adapters"
    make_version(root, "v0001")
    make_version(root, "v0002", base="another/model")  # intact, but not for this base: never rolled back to
    current = make_version(root, "v0003")
    write(root / "current", "v0003\n")
    code, check, _ = adapters_doctor()
    assert code == 0 and check["ok"] and "v0003 is intact" in check["detail"]
    damage(current)
    code, check, _ = adapters_doctor()
    assert code == 1 and not check["ok"] and check["repairable"] and detail in check["detail"]
    code, check, repaired = adapters_doctor("--repair")
    assert code == 0 and check["ok"] and repaired == ["rolled the current adapter back from broken 'v0003' to v0001"]
    assert (root / "current").read_text().strip() == "v0001"


def test_current_pointer_outside_the_adapters_folder_is_never_followed(tmp_path):
    root = Path(os.environ["MLLM_HOME"]) / "adapters"
    make_version(tmp_path, "elsewhere")  # an intact-looking adapter outside the home
    root.mkdir(parents=True)
    write(root / "current", f"../../{tmp_path.name}/elsewhere\n")
    code, check, _ = adapters_doctor()
    assert code == 1 and "is missing" in check["detail"]
    code, check, repaired = adapters_doctor("--repair")
    assert code == 0 and "none is current" in repaired[0] and (root / "current").read_text() == ""


def test_adapter_for_another_base_model_is_reported_not_repaired():
    root = Path(os.environ["MLLM_HOME"]) / "adapters"
    make_version(root, "v0001", base="another/model")
    write(root / "current", "v0001\n")
    code, check, repaired = adapters_doctor("--repair")
    assert code == 1 and "made for base model 'another/model'" in check["detail"] and not check["repairable"]
    assert repaired == [] and (root / "current").read_text().strip() == "v0001"


# ---- properties: any input either loads or is an InputError, never another exception --------------------
PROPS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPS
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".txt", ".md", ".html", ".json", ".jsonl", ".pdf"]))
def test_loaders_accept_or_refuse_any_bytes(tmp_path, data, suffix):
    path = write(tmp_path / f"any{suffix}", data)
    try:
        doc = load_file(path)
    except InputError as exc:
        assert "\n" not in str(exc)
    else:
        assert doc.sections and all(s.strip() for s in doc.sections)


@PROPS
@given(text=st.text(max_size=3000), budget=st.integers(1, 40))
def test_chunks_never_exceed_the_token_or_character_budget(text, budget):
    count = lambda s: len(s.split())  # noqa: E731
    for chunk in chunk_text([text], count, max_tokens=budget, overlap=0):
        assert chunk.text.strip() and count(chunk.text) <= budget and len(chunk.text) <= budget * 16


@PROPS
@given(line=st.one_of(st.text(max_size=200), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["id", "kind", "input", "answers", "tags", "x"]), inner, max_size=5)).map(json.dumps)))
def test_eval_parser_accepts_or_refuses_any_line(tmp_path, line):
    path = write(tmp_path / "p.jsonl", line + "\n")
    try:
        probes = load_probes(path)
    except InputError as exc:
        assert "\n" not in str(exc)
    else:
        assert all(p.input.strip() and p.answers for p in probes)


@PROPS
@given(text=st.text(max_size=200))
def test_settings_accept_or_refuse_any_config_file(tmp_path, text):
    home = tmp_path / "settings-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(text, encoding="utf-8")
    try:
        Settings.load(home)
    except InputError as exc:
        assert "\n" not in str(exc).strip()


def test_malformed_pdf_in_a_real_process_prints_one_line(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import trial_crash

    result = trial_crash.fake_cli(tmp_path / "pdf-home", "learn", str(broken_pdf(tmp_path)))
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"Error: {tmp_path / 'cut.pdf'}: not a readable PDF (Stream has ended unexpectedly)"]


def test_mutated_pdfs_load_or_give_one_input_error(tmp_path):
    """300 copies of a real PDF with random bytes changed or cut (seed 0): a parser of untrusted files may
    raise anything (pypdf raised LimitReachedError on copy 213), which must still be one InputError."""
    import random

    raw = (Path(__file__).parent / "fixtures" / "herons.pdf").read_bytes()
    rng = random.Random(0)
    path = tmp_path / "mutant.pdf"
    for _ in range(300):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 20)):
            at = rng.randrange(len(data))
            data[at] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[:rng.randrange(len(data))]
        path.write_bytes(bytes(data))
        try:
            load_file(path)
        except InputError as exc:
            assert "\n" not in str(exc)
