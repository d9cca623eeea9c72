
import numpy as np
import pytest

from memory_llm import StoreError
from memory_llm.store import Store
from memory_llm.store.records import NewChunk


def vec(i: int, dim: int = 8) -> np.ndarray:
    v = np.random.default_rng(i).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def chunks(texts, start=0):
    return [NewChunk(i, t, f"h{start + i}-{t}", vec(start + i)) for i, t in enumerate(texts)]


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "home")
    s.check_embedder("fake", 8)
    yield s
    s.close()


def test_replace_source_and_search(store):
    ids = store.replace_source("default", "a.txt", "ha", chunks(["alpha beta", "gamma delta"]))
    assert len(ids) == 2
    hits = store.dense(vec(1), 1)
    assert hits[0][0] == ids[1] and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert [i for i, _ in store.lexical("gamma", 5)] == [ids[1]]
    new_ids = store.replace_source("default", "a.txt", "hb", chunks(["epsilon"], 10))
    assert store.stats()["memories"] == 1 and store.stats()["superseded"] == 2
    assert all(not m.live for m in store.get(ids).values())  # kept, out of retrieval
    assert list(store.get(new_ids).values())[0].text == "epsilon"
    assert len(store.index()) == 1 and store.lexical("gamma", 5) == []
    assert [i for i, _ in store.lexical("gamma", 5, superseded=True)] == [ids[1]]


def test_index_persists_and_agrees_after_reopen(tmp_path, store):
    store.replace_source("default", "a.txt", "ha", chunks(["one", "two", "three"]))
    store.flush()
    again = Store(tmp_path / "home")
    assert again.index().fingerprint() == store.index().fingerprint()
    again.close()


def test_corrupted_index_is_rebuilt_from_sqlite(tmp_path, store, caplog):
    ids = store.replace_source("default", "a.txt", "ha", chunks(["one", "two"]))
    store.flush()
    store.index_path.write_bytes(b"garbage")
    again = Store(tmp_path / "home")
    assert [i for i, _ in again.dense(vec(0), 1)] == [ids[0]]
    assert "unreadable" in caplog.text
    again.close()


def test_stale_index_is_rebuilt(tmp_path, store):
    store.replace_source("default", "a.txt", "ha", chunks(["one"]))
    store.flush()
    stale = store.index_path.read_bytes()
    store.replace_source("default", "b.txt", "hb", chunks(["two"], 5))
    store.flush()
    store.index_path.write_bytes(stale)  # e.g. a crash after the commit, before the index was saved
    again = Store(tmp_path / "home")
    assert len(again.index()) == 2
    again.close()


def test_writes_by_another_process_are_seen(tmp_path, store):
    store.replace_source("default", "a.txt", "ha", chunks(["one"]))
    other = Store(tmp_path / "home")
    other.replace_source("default", "b.txt", "hb", chunks(["two"], 5))
    other.flush()
    assert len(store.index()) == 2  # generation moved: reloaded
    store.replace_source("default", "c.txt", "hc", chunks(["three"], 9))
    assert len(store.index()) == 3
    other.close()


def test_switches_to_ivf_when_large_removes_in_place_and_back(tmp_path):
    s = Store(tmp_path / "h2", exact_index_max=50)
    s.check_embedder("fake", 8)
    ids = s.replace_source("default", "a", "h", chunks([f"t{i}" for i in range(120)]))
    index = s.index()
    assert index.kind == "ivf" and len(index) == 120 and index.nlist == 3
    assert [i for i, _ in s.dense(vec(7), 1)] == [ids[7]]
    s.forget(ids=ids[:10])
    assert s.index() is index and len(index) == 110  # removed in place, no rebuild
    s.flush()
    again = Store(tmp_path / "h2", exact_index_max=50)
    assert again.index().kind == "ivf" and again.index().fingerprint() == index.fingerprint()
    s.forget(source="a")
    assert s.index().kind == "flat" and len(s.index()) == 0
    s.close()
    again.close()


def test_forget_variants(store):
    a = store.replace_source("default", "a.txt", "ha", chunks(["one", "two"]))
    store.replace_source("other", "b.txt", "hb", chunks(["three"], 5))
    assert store.forget(ids=[a[0]]) == 1
    assert store.forget(source="a.txt") == 1
    assert store.stats()["sources"] == 1
    assert store.forget(everything=True, namespace="default") == 0
    assert store.forget(everything=True) == 1
    assert store.stats()["memories"] == 0 and len(store.index()) == 0


def test_namespaces_filter_dense_and_lexical(store):
    a = store.replace_source("ns1", "a.txt", "ha", chunks(["shared word"]))
    b = store.replace_source("ns2", "b.txt", "hb", chunks(["shared word"], 3))
    assert [i for i, _ in store.dense(vec(0), 5, "ns2")] == b
    assert [i for i, _ in store.lexical("shared", 5, "ns1")] == a


def test_newer_schema_is_refused(tmp_path, store):
    store.db.execute("INSERT INTO _migrations VALUES ('m999_from_the_future', 0)")
    with pytest.raises(StoreError, match="newer memory_llm"):
        Store(tmp_path / "home")


def test_other_embedder_is_refused(store):
    from memory_llm import InputError

    with pytest.raises(InputError, match="embedded with 'fake'"):
        store.check_embedder("other-model", 8)


def test_not_a_database(tmp_path):
    home = tmp_path / "bad"
    home.mkdir()
    (home / "memory.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        Store(home)


def test_home_is_private(tmp_path, store):
    assert (store.home.stat().st_mode & 0o077) == 0
    assert (store.path.stat().st_mode & 0o077) == 0


def test_a_failed_transaction_leaves_nothing(store, monkeypatch):
    bad = chunks(["one", "two"])
    bad[1].vector = "not a vector"  # fails inside the transaction, after the first insert
    with pytest.raises(Exception):
        store.replace_source("default", "a.txt", "ha", bad)
    assert store.stats()["memories"] == 0 and store.stats()["sources"] == 0
    assert store.db.execute("SELECT count(*) FROM memories_fts").fetchone()[0] == 0


def test_more_ids_than_one_statement_binds(store):
    from memory_llm.store import Item

    ids = store.replace_source("default", "a", "ha", chunks([f"t{i}" for i in range(1234)]))
    assert list(store.get(ids)) == ids
    assert len(store.existing_hashes("default", [f"h{i}-t{i}" for i in range(1234)])) == 1234
    store.add_items(ids[0], "default", [Item(ids[0], "qa", "q", "a")])
    store.add_items(ids[-1], "default", [Item(ids[-1], "cloze", "p", "c", held_out=True)])
    assert [(i.memory_id, i.kind, i.held_out) for i in store.items(ids)] == [(ids[0], "qa", False),
                                                                          (ids[-1], "cloze", True)]
    assert store.memories_with_items(ids) == {ids[0], ids[-1]}
    assert store.forget(source="a") == 1234 and store.sqlite_fingerprint() == (0, 0, 0)


def test_index_agrees_with_the_public_sqlite_fingerprint(store):
    store.replace_source("default", "a", "ha", chunks(["one", "two"]))
    assert store.index().fingerprint() == store.sqlite_fingerprint()


def test_open_index_builds_reads_and_refuses_unknown_backends(tmp_path):
    from memory_llm.store import FaissIndex, VectorIndex, open_index

    path = tmp_path / "vectors.faiss"
    index: VectorIndex = open_index(path, dim=8, size=0)
    assert isinstance(index, FaissIndex) and index.kind == "flat" and index.fits(10)
    index.add(np.arange(1, 4), np.stack([vec(i) for i in range(3)]))
    index.save(path)
    again = open_index(path)
    assert again.fingerprint() == (3, 6, 3) and [int(i) for i in again.search(vec(1), 1)[0]] == [2]
    assert not open_index(path, exact_max=2).fits(3)
    sample = np.stack([vec(i) for i in range(120)])
    assert open_index(path, dim=8, size=120, sample=lambda n: sample[:n], exact_max=50).kind == "ivf"
    with pytest.raises(ValueError, match="unknown vector index backend 'nosuch'"):
        open_index(path, backend="nosuch")


def test_content_uris_name_text_by_its_hash():
    import hashlib

    from memory_llm.ingest.loaders import load_text
    from memory_llm.store import content_uri

    digest = hashlib.sha256("Owls hunt.".encode()).hexdigest()[:16]
    assert content_uri("stdin", "Owls hunt.") == f"stdin:{digest}"
    assert load_text("Owls hunt.").uri == f"text:{digest}"


class ListIndex:
    """A VectorIndex in plain numpy: the Store must need nothing beyond the protocol."""

    kind = "list"
    filters = False
    shared = False

    def __init__(self, dim: int):
        self.dim, self.vectors = dim, {}

    def __len__(self):
        return len(self.vectors)

    def add(self, ids, vectors, namespaces=None):
        self.vectors.update(zip(map(int, ids), vectors))

    def remove(self, ids):
        for i in ids:
            self.vectors.pop(int(i), None)
        return True

    def search_many(self, queries, k, namespace=None):
        ids = np.array(list(self.vectors), dtype=np.int64)
        scores = np.stack(list(self.vectors.values())) @ np.asarray(queries).T if len(ids) else np.zeros((0, 1))
        order = np.argsort(-scores.T, axis=1)[:, :k]
        return ids[order], np.take_along_axis(scores.T, order, axis=1)

    def search(self, query, k, namespace=None):
        ids, scores = self.search_many(np.asarray(query).reshape(1, -1), k)
        return ids[0], scores[0]

    def fingerprint(self):
        from memory_llm.store.vectors import fingerprint_of

        return fingerprint_of(np.array(list(self.vectors), dtype=np.int64))

    def fits(self, n):
        return True

    def close(self):
        pass

    def save(self, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_a_backend_needs_only_the_protocol(tmp_path, monkeypatch):
    from memory_llm.store import dense

    def open_list_index(path, *, dim=None, **options):
        if dim is None:
            raise OSError("nothing saved")
        return ListIndex(dim)

    monkeypatch.setattr(dense, "open_index", open_list_index)
    s = Store(tmp_path / "h3", index_backend="list")
    s.check_embedder("fake", 8)
    ids = s.replace_source("default", "a", "h", chunks(["one", "two", "three"]))
    s.replace_source("other", "b", "hb", chunks(["four"], 3))
    assert [i for i, _ in s.dense(vec(1), 1)] == [ids[1]] and s.dense(vec(3), 5, "default")[0][0] in ids
    s.forget(ids=[ids[1]])
    assert s.stats()["index_type"] == "list" and s.stats()["index_size"] == 3
    assert s.neighbours(np.stack([vec(0)]), 2, "default", set())[0][0][1] == pytest.approx(1.0, abs=1e-5)
    assert not s.check()[-1]["ok"] and "rebuilt the vector index from SQLite (3 vectors)" in s.repair()
    s.close()
