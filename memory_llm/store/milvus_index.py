"""Milvus, the scale-out vector index backend: one collection per home, on a Milvus server or cluster, or in an
embedded Milvus Lite file; the namespace is the collection's partition key and filters inside the engine.

The collection is derived data like the FAISS file: the store fills it from SQLite, checks it by the fingerprint
of the ids it holds, and rebuilds it when they disagree. It is shared by every process that opens the home, so
the store writes to it inside its SQLite transaction (store/dense.py) and `save` only flushes.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Iterator, Sequence

import numpy as np

from memory_llm.errors import StoreError
from memory_llm.store.faiss_index import choose_kind, ivf_nlist
from memory_llm.store.vectors import Fingerprint, fingerprint_of

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'memory-llm[milvus]'"
MAX_TOPK = 16_384  # Milvus refuses a larger limit
INSERT_ROWS = 5_000  # rows per insert: well under gRPC's 64 MB message limit at dim 1024
NAMESPACE_BYTES = 512  # a namespace is at most 128 characters, 4 UTF-8 bytes each

_clients: dict[tuple[str, str], list] = {}  # (uri, token) -> [MilvusClient, users]
_clients_lock = threading.Lock()


def _pymilvus() -> ModuleType:
    """Import pymilvus on first use, saying what to install when it is missing."""
    try:
        import pymilvus
    except ImportError:
        raise ImportError(f"the milvus vector backend needs pymilvus and milvus-lite: {INSTALL_HINT}") from None
    return pymilvus


def is_embedded(uri: str) -> bool:
    """Whether `uri` names a Milvus Lite file served inside this process (pymilvus's rule: it ends in .db)."""
    return uri.endswith(".db")


def _connect(uri: str, token: str) -> Any:
    """A client for `uri`, shared by this process's indexes (counted: the last `_disconnect` closes it)."""
    pymilvus = _pymilvus()
    with _clients_lock:
        entry = _clients.get((uri, token))
        if entry is None:
            if is_embedded(uri):
                Path(uri).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # milvus_lite logs a traceback before pymilvus raises; the error below says it in one line
            try:
                with _quiet("milvus_lite.server_manager"):
                    client = pymilvus.MilvusClient(uri=uri, token=token, timeout=30)
            except pymilvus.MilvusException as exc:
                if is_embedded(uri):
                    raise StoreError(
                        f"{uri}: cannot open the embedded Milvus Lite data ({exc.message}); it serves one process at"
                        " a time: stop the other mllm process, or run `milvus-lite server --data-dir <dir>` and set"
                        " milvus_uri = \"http://127.0.0.1:19530\"") from None
                raise StoreError(f"cannot reach Milvus at {uri} ({exc.message})") from None
            entry = _clients[(uri, token)] = [client, 0]
        entry[1] += 1
        return entry[0]


def _disconnect(uri: str, token: str) -> None:
    with _clients_lock:
        entry = _clients.get((uri, token))
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _clients[(uri, token)]
        entry[0].close()
        if is_embedded(uri):  # let another process open the file once this one is done with it
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(uri)


def namespace_filter(namespace: str) -> str:
    """The Milvus filter selecting one namespace: a double-quoted literal, JSON-escaped (quotes, backslashes)."""
    return "namespace == " + json.dumps(namespace, ensure_ascii=False)


class MilvusIndex:
    """A Milvus collection: id (INT64, primary), namespace (VARCHAR, partition key), vector (FLOAT_VECTOR, IP).

    The structure follows FAISS's rule (store/faiss_index.py): FLAT (exact) up to exact_max vectors, IVF_FLAT with
    about 4·sqrt(n) lists beyond, searched with nprobe lists.
    """

    filters = True  # the namespace is the partition key: filtered inside the engine
    shared = True  # every process sees the one collection

    def __init__(self, uri: str, token: str, collection: str, *, dim: int, kind: str, nlist: int, nprobe: int,
                 exact_max: int, count: int | None = None):
        self.uri, self.token, self.collection = uri, token, collection
        self.dim, self.kind, self.nlist, self.nprobe, self.exact_max = dim, kind, nlist, nprobe, exact_max
        self.client = _connect(uri, token)
        self._count = count
        self._closed = False

    # ---- opening -------------------------------------------------------------------------------------
    @classmethod
    def create(cls, uri: str, token: str, collection: str, dim: int, size: int, *, nprobe: int = 16,
               exact_max: int = 50_000) -> "MilvusIndex":
        """A new, empty collection shaped for `size` vectors, replacing whatever had the name."""
        pymilvus = _pymilvus()
        kind = choose_kind(size, exact_max)
        nlist = ivf_nlist(size) if kind == "ivf" else 0
        index = cls(uri, token, collection, dim=dim, kind=kind, nlist=nlist, nprobe=nprobe, exact_max=exact_max,
                    count=0)
        client, DataType = index.client, pymilvus.DataType
        with index._errors("create the collection"):
            if client.has_collection(collection):
                client.drop_collection(collection)
            schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("namespace", DataType.VARCHAR, max_length=NAMESPACE_BYTES, is_partition_key=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            params = client.prepare_index_params()
            if kind == "flat":
                params.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
            else:
                params.add_index(field_name="vector", index_type="IVF_FLAT", metric_type="IP",
                                 params={"nlist": nlist})
            # Strong: a search sees every write acknowledged before it (learn, then ask at once)
            client.create_collection(collection, schema=schema, index_params=params, consistency_level="Strong")
        return index

    @classmethod
    def load(cls, uri: str, token: str, collection: str, *, nprobe: int = 16,
             exact_max: int = 50_000) -> "MilvusIndex":
        """The existing collection; FileNotFoundError when there is none, RuntimeError when it is not one of ours."""
        client = _connect(uri, token)
        try:
            with _errors(uri, "open the collection"):
                if not client.has_collection(collection):
                    raise FileNotFoundError(f"no Milvus collection {collection!r} at {uri}")
                fields = {f["name"]: f for f in client.describe_collection(collection)["fields"]}
                if set(fields) != {"id", "namespace", "vector"}:
                    raise RuntimeError(f"Milvus collection {collection!r} is not a memory_llm index")
                dim = int(fields["vector"]["params"]["dim"])
                described = client.describe_index(collection, "vector") or {}
                kind = {"FLAT": "flat", "IVF_FLAT": "ivf"}.get(described.get("index_type", ""), "")
                if not kind:
                    raise RuntimeError(f"Milvus collection {collection!r} has an index this version does not write")
                nlist = int(described.get("nlist") or described.get("params", {}).get("nlist") or 0)
                client.load_collection(collection)  # a collection is released when its server restarts
            # the index takes its own reference before this one goes: an embedded server must not stop in between
            index = cls(uri, token, collection, dim=dim, kind=kind, nlist=nlist, nprobe=nprobe, exact_max=exact_max)
        finally:
            _disconnect(uri, token)
        return index

    # ---- the protocol --------------------------------------------------------------------------------
    def __len__(self) -> int:
        if self._count is None:
            with self._errors("count the vectors"):
                rows = self.client.query(self.collection, filter="", output_fields=["count(*)"])
            self._count = int(rows[0]["count(*)"])
        return self._count

    def add(self, ids: np.ndarray, vectors: np.ndarray, namespaces: Sequence[str] | None = None) -> None:
        """Insert vectors under their memory ids, each in its namespace (its partition)."""
        if not len(ids):
            return
        if namespaces is None or len(namespaces) != len(ids):
            raise ValueError("MilvusIndex.add needs one namespace per id")
        vectors = np.asarray(vectors, dtype=np.float32)
        with self._errors("insert vectors"):
            for start in range(0, len(ids), INSERT_ROWS):
                stop = start + INSERT_ROWS
                rows = [{"id": int(i), "namespace": ns, "vector": v}
                        for i, ns, v in zip(ids[start:stop], namespaces[start:stop], vectors[start:stop].tolist())]
                self.client.insert(self.collection, rows)
        if self._count is not None:
            self._count += len(ids)

    def remove(self, ids: np.ndarray) -> bool:
        """Delete ids (in place)."""
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64)]
        with self._errors("delete vectors"):
            for start in range(0, len(ids), INSERT_ROWS):
                self.client.delete(self.collection, ids=ids[start:start + INSERT_ROWS])
        self._count = None  # ids not held are not counted by Milvus: ask again when needed
        return True

    def search(self, query: np.ndarray, k: int, namespace: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the k nearest vectors to one query (within a namespace if given), best first."""
        ids, scores = self.search_many(np.asarray(query, dtype=np.float32).reshape(1, -1), k, namespace)
        keep = ids[0] >= 0
        return ids[0][keep], scores[0][keep]

    def search_many(self, queries: np.ndarray, k: int,
                    namespace: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of shape (n, k) (within a namespace if given); missing neighbours are -1."""
        queries = np.asarray(queries, dtype=np.float32)
        k = min(k, MAX_TOPK)
        ids = np.full((len(queries), max(k, 0)), -1, dtype=np.int64)
        scores = np.zeros((len(queries), max(k, 0)), dtype=np.float32)
        if k <= 0 or not len(queries):
            return ids, scores
        params: dict[str, Any] = {"metric_type": "IP"}
        if self.kind == "ivf":
            params["params"] = {"nprobe": self.nprobe}
        with self._errors("search"):
            results = self.client.search(self.collection, data=queries.tolist(), limit=k, search_params=params,
                                         filter=namespace_filter(namespace) if namespace is not None else "",
                                         output_fields=[])
        for r, hits in enumerate(results):
            for j, hit in enumerate(hits[:k]):
                ids[r, j], scores[r, j] = hit["id"], hit["distance"]
        return ids, scores

    def ids(self) -> np.ndarray:
        """Every id the collection holds (in no particular order)."""
        out: list[int] = []
        # Milvus Lite lacks the timestamp call the iterator starts with: pymilvus warns and its gRPC server logs a
        # traceback, then the iterator goes on with a client-side timestamp; neither is news to a user
        with self._errors("read the ids"), _quiet("grpc._server", "pymilvus.client.iterator.query_iterator"):
            it = self.client.query_iterator(self.collection, batch_size=10_000, filter="", output_fields=["id"])
            try:
                while batch := it.next():
                    out += [row["id"] for row in batch]
            finally:
                it.close()
        self._count = len(out)
        return np.asarray(out, dtype=np.int64)

    def fingerprint(self) -> Fingerprint:
        """`fingerprint_of` the ids the collection holds."""
        return fingerprint_of(self.ids())

    def matches(self, expected: Fingerprint) -> bool:
        """Whether the collection agrees with SQLite's fingerprint, checked in two small queries instead of reading
        every id: the count, and that the largest id is there once with none beyond it.

        Enough for what can go wrong: writes reach the collection inside the SQLite transaction, so a crash or a
        failed write can leave only rows SQLite rolled back: inserts (ids beyond SQLite's largest, as ids are never
        reused) or deletes (fewer rows). `fingerprint` reads every id (`mllm doctor`)."""
        count, _, top = expected
        with self._errors("check the collection"):
            rows = self.client.query(self.collection, filter="", output_fields=["count(*)"])
            self._count = int(rows[0]["count(*)"])
            if self._count != count or not count:
                return self._count == count
            over = self.client.query(self.collection, filter=f"id >= {int(top)}", output_fields=["id"], limit=2)
        return [int(r["id"]) for r in over] == [int(top)]

    def fits(self, n: int) -> bool:
        """False when n calls for the other kind (FAISS's rule: store/faiss_index.py `choose_kind`). Unlike a FAISS
        IVF, the lists never need rebuilding as the collection grows: Milvus trains them per sealed segment (and
        Milvus Lite does not report nlist back, so a reopened collection could not compare it)."""
        return self.kind == choose_kind(n, self.exact_max)

    def save(self, path: Path) -> None:
        """Flush: seal what was written into indexed segments (searches over unflushed rows are slower)."""
        with self._errors("flush"):
            self.client.flush(self.collection)

    def close(self) -> None:
        """Release this index's share of the client (the last one closes it and frees an embedded file)."""
        if not self._closed:
            self._closed = True
            _disconnect(self.uri, self.token)

    def _errors(self, doing: str) -> Any:
        return _errors(self.uri, doing)


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence these loggers below CRITICAL for the duration."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextmanager
def _errors(uri: str, doing: str) -> Iterator[None]:
    """Turn Milvus's errors into a one-line StoreError naming the server and what was being done."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, _pymilvus().MilvusException):
            raise StoreError(f"Milvus at {uri} failed to {doing}: {exc.message}") from None
        raise
