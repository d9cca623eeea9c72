"""The store's vector behaviour on every backend: FAISS, embedded Milvus Lite, and Milvus over the network (a
`milvus-lite server` this module starts on 127.0.0.1 and stops)."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from memory_llm import InputError, StoreError
from memory_llm.store import Store
from memory_llm.store.records import NewChunk

pymilvus = pytest.importorskip("pymilvus", reason="the [milvus] extra is not installed")


def vec(i: int, dim: int = 8) -> np.ndarray:
    v = np.random.default_rng(i).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def chunks(texts, start=0):
    return [NewChunk(i, t, f"h{start + i}-{t}", vec(start + i)) for i, t in enumerate(texts)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory):
    """A `milvus-lite server` on 127.0.0.1 for this module; its URI."""
    port = free_port()
    cli = Path(sys.executable).parent / "milvus-lite"
    log = tmp_path_factory.mktemp("milvus-server") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(cli), "server", "--data-dir", str(log.parent / "data"), "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"milvus-lite server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(params=["faiss", "milvus-lite", "milvus-server"])
def backend(request) -> dict:
    """The Store keyword arguments choosing one backend."""
    if request.param == "faiss":
        return {}
    if request.param == "milvus-lite":
        return {"index_backend": "milvus"}
    return {"index_backend": "milvus", "index_uri": request.getfixturevalue("milvus_server")}


@pytest.fixture
def open_store(tmp_path, backend):
    opened = []

    def make(name="home", **kw):
        s = Store(tmp_path / name, **backend, **kw)
        s.check_embedder("fake", 8)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


def test_learn_search_replace_and_reopen(open_store):
    store = open_store()
    ids = store.replace_source("default", "a.txt", "ha", chunks(["alpha beta", "gamma delta"]))
    hits = store.dense(vec(1), 1)
    assert hits[0][0] == ids[1] and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert [i for i, _ in store.lexical("gamma", 5)] == [ids[1]]
    new_ids = store.replace_source("default", "a.txt", "hb", chunks(["epsilon"], 10))
    assert len(store.index()) == 1 and [i for i, _ in store.dense(vec(10), 5)] == new_ids
    store.flush()
    again = open_store()
    assert again.index().fingerprint() == store.index().fingerprint() == store.sqlite_fingerprint()
    assert [i for i, _ in again.dense(vec(10), 5)] == new_ids


def test_writes_by_another_store_are_seen(open_store):
    store, other = open_store(), open_store()
    store.replace_source("default", "a.txt", "ha", chunks(["one"]))
    other.replace_source("default", "b.txt", "hb", chunks(["two"], 5))
    other.flush()
    assert len(store.index()) == 2 and store.dense(vec(5), 1)[0][0] == other.dense(vec(5), 1)[0][0]
    store.replace_source("default", "c.txt", "hc", chunks(["three"], 9))
    assert len(other.index()) == 3


def test_forget_and_namespaces_filter_in_the_engine(open_store):
    store = open_store()
    odd = 'the "quoted" \\ one 🙂'
    a = store.replace_source("ns1", "a.txt", "ha", chunks(["shared word", "more"]))
    b = store.replace_source(odd, "b.txt", "hb", chunks(["shared word"], 3))
    assert [i for i, _ in store.dense(vec(0), 5, odd)] == b
    assert {i for i, _ in store.dense(vec(3), 5, "ns1")} == set(a)
    near = store.neighbours(np.stack([vec(3)]), 1, "ns1", set())[0]  # b's vector is not in ns1
    assert {i for i, _ in near} <= set(a) and all(score < 0.99 for _, score in near)
    assert store.neighbours(np.stack([vec(3)]), 1, odd, set())[0][0][1] == pytest.approx(1.0, abs=1e-5)
    assert store.index().filters == (store.vectors.backend == "milvus")
    assert store.forget(ids=[a[0]]) == 1 and [i for i, _ in store.dense(vec(0), 5, "ns1")] == [a[1]]
    assert store.forget(everything=True, namespace=odd) == 1
    assert store.dense(vec(3), 5, odd) == [] and len(store.index()) == 1


def test_an_index_that_disagrees_is_rebuilt_and_repaired(open_store):
    store = open_store()
    ids = store.replace_source("default", "a.txt", "ha", chunks(["one", "two", "three"]))
    store.flush()
    index = store.index()
    index.remove(np.asarray(ids[:1]))  # e.g. a crash between the index write and the commit
    index.save(store.index_path)
    again = open_store()
    assert {c["check"]: c["ok"] for c in again.check()}["index"] is False
    assert len(again.index()) == 3  # the disagreement is seen on open and rebuilt from SQLite
    assert [i for i, _ in again.dense(vec(0), 1)] == [ids[0]]
    assert any("vector index" in line for line in again.repair())
    assert {c["check"]: c["ok"] for c in again.check()}["index"] is True


def test_rows_a_rolled_back_write_left_in_the_index_are_seen(open_store):
    store = open_store()
    ids = store.replace_source("default", "a.txt", "ha", chunks(["one", "two"]))
    index = store.index()
    index.remove(np.asarray(ids[-1:]))  # a replace whose commit never came: old rows deleted, new ones inserted
    index.add(np.asarray([ids[-1] + 1, ids[-1] + 2]), np.stack([vec(7), vec(8)]), ["default", "default"])
    index.save(store.index_path)
    again = open_store()
    assert len(again.index()) == 2 and again.index().fingerprint() == store.sqlite_fingerprint()
    assert [i for i, _ in again.dense(vec(1), 1)] == [ids[1]]


def test_switches_to_ivf_when_large_and_back(open_store, caplog):
    store = open_store(exact_index_max=50)
    ids = store.replace_source("default", "a", "h", chunks([f"t{i}" for i in range(120)]))
    index = store.index()
    assert index.kind == "ivf" and len(index) == 120 and index.nlist == 3
    assert [i for i, _ in store.dense(vec(7), 1)] == [ids[7]]
    store.flush()
    caplog.clear()
    again = open_store(exact_index_max=50)
    assert again.index().kind == "ivf" and [i for i, _ in again.dense(vec(7), 1)] == [ids[7]]
    assert "rebuilding" not in caplog.text  # a reopened IVF is used as it is
    store.forget(ids=ids[:10])
    assert store.index() is index and len(index) == 110  # removed in place, no rebuild
    store.forget(source="a")
    assert store.index().kind == "flat" and len(store.index()) == 0


def test_a_failed_write_leaves_both_sides_as_they_were(open_store):
    store = open_store()
    store.replace_source("default", "a.txt", "ha", chunks(["one"]))
    bad = chunks(["two", "three"], 5)
    bad[1].vector = "not a vector"
    with pytest.raises(Exception):
        store.replace_source("default", "b.txt", "hb", bad)
    assert store.stats()["memories"] == 1
    assert store.index().fingerprint() == store.sqlite_fingerprint()


def test_embedded_milvus_serves_one_process_and_says_so(tmp_path):
    store = Store(tmp_path / "home", index_backend="milvus")
    store.check_embedder("fake", 8)
    store.replace_source("default", "a.txt", "ha", chunks(["one"]))
    code = ("from memory_llm.store import Store\nfrom memory_llm import StoreError\n"
            f"s = Store({str(tmp_path / 'home')!r}, index_backend='milvus')\n"
            "try:\n    s.index()\nexcept StoreError as e:\n    print('REFUSED', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "REFUSED" in out.stdout and "milvus-lite server" in out.stdout and "Traceback" not in out.stderr
    store.close()  # releases the file: now another process may open it
    out = subprocess.run([sys.executable, "-c", code + "print('OPEN', len(s.index()))\n"], capture_output=True,
                         text=True, timeout=120)
    assert "OPEN 1" in out.stdout, out.stderr[-2000:]


def test_an_unreachable_server_is_one_line(tmp_path):
    store = Store(tmp_path / "home", index_backend="milvus", index_uri=f"http://127.0.0.1:{free_port()}")
    store.check_embedder("fake", 8)
    with pytest.raises(StoreError, match="cannot reach Milvus"):
        store.replace_source("default", "a.txt", "ha", chunks(["one"]))
    assert store.stats()["memories"] == 0  # nothing stored when the index cannot take the write
    store.close()


def test_backend_settings_are_checked(tmp_path):
    from memory_llm.config import Settings

    with pytest.raises(InputError, match="vector_backend"):
        Settings.load(tmp_path / "h", vector_backend="qdrant")
    s = Settings.load(tmp_path / "h", vector_backend="milvus", milvus_uri="http://db:19530")
    assert (s.vector_backend, s.milvus_uri) == ("milvus", "http://db:19530")


def test_memory_llm_learns_and_answers_on_milvus(tmp_path, fake_embedder, tiny_generator):
    from memory_llm import MemoryLLM

    m = MemoryLLM(tmp_path / "home", embedder=fake_embedder, generator=tiny_generator, max_new_tokens=4,
                  vector_backend="milvus")
    m.learn(text="The Larkspur Observatory opened in 1911.", namespace="team")
    m.learn(text="Quarterly reviews happen in March.", namespace="other")
    hits = m.search("When did the Larkspur Observatory open?", k=3, namespace="team")
    assert [h.memory.text for h in hits] == ["The Larkspur Observatory opened in 1911."]
    assert m.store.vectors.location.startswith("Milvus collection mllm_")
    m.close()
