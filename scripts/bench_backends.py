#!/usr/bin/env python
"""Vector backends side by side: FAISS, embedded Milvus Lite, and Milvus over the network (`milvus-lite server` on
127.0.0.1), on the same memories through the library's Store, and the raw index under it (the engine's limit).

Per backend, in a process of its own (so peak RSS is its own), on --n synthetic 384-d memories (bench_search.py's
clustered mixture, like sentence embeddings) learned as 100 sources across 10 namespaces:
  learn      Store.replace_source of every source + flush (SQLite, FTS5 and the index; IVF once > exact_max)
  open       a new Store on the home until its first search answers (the fingerprint check included)
  p50        Store.dense, k=10, one query per call: all namespaces, and one namespace (10 % of the memories)
  raw p50    the index's own search on the same queries (the engine, without the store around it)
  recall@10  against exact search (numpy), unfiltered and in the namespace
  RSS        peak resident memory of the benchmark process, and of the server process (network path)
Then Fictional Knowledge: the documents learned with the real embedder (all-MiniLM-L6-v2) into a home per backend,
recall@3 of the right document on the gen probes, and how many probes got the same top-3 documents as on FAISS.

    MLLM_CACHE=/tmp/mcache .venv/bin/python scripts/bench_backends.py --write
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _benchmd import command_line, free_port, log, machine, median, table, today, write_section  # noqa: E402

BACKENDS = ("faiss", "milvus-lite", "milvus-server")
SOURCES, NAMESPACES, K = 100, 10, 10
FILTER_NS = "team3"


def store_kwargs(backend: str, uri: str) -> dict:
    if backend == "faiss":
        return {}
    return {"index_backend": "milvus", "index_uri": uri if backend == "milvus-server" else ""}


def settings_kwargs(backend: str, uri: str) -> dict:
    if backend == "faiss":
        return {}
    return {"vector_backend": "milvus", "milvus_uri": uri if backend == "milvus-server" else ""}


def namespace_of(source: int) -> str:
    return f"team{source % NAMESPACES}"


# ---- the parent: data, ground truth, the server, the table ------------------------------------------------
def make_data(work: Path, n: int, queries: int) -> None:
    from bench_search import Mixture

    mix = Mixture(4000)
    data, q = mix.sample(n, seed=1), mix.sample(queries, seed=2)
    rows_ns = np.array([int(namespace_of(r * SOURCES // n)[4:]) for r in range(n)])
    truth = np.argsort(-(q @ data.T), axis=1)[:, :K]
    in_ns = np.flatnonzero(rows_ns == int(FILTER_NS[4:]))
    truth_ns = in_ns[np.argsort(-(q @ data[in_ns].T), axis=1)[:, :K]]
    np.save(work / "data.npy", data)
    np.save(work / "queries.npy", q)
    np.save(work / "truth.npy", truth)
    np.save(work / "truth_ns.npy", truth_ns)


def start_server(work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cli = Path(sys.executable).parent / "milvus-lite"
    proc = subprocess.Popen([str(cli), "server", "--data-dir", str(work / "server-data"), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("milvus-lite server did not start")
            time.sleep(0.2)


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_child(backend: str, work: Path, uri: str, args) -> dict:
    out = work / f"{backend}.json"
    cmd = [sys.executable, __file__, "--child", backend, "--work", str(work), "--uri", uri,
           "--fk-docs", str(args.fk_docs), "--out", str(out)]
    log(f"{backend}: start")
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="synthetic memories (default 100000)")
    p.add_argument("--queries", type=int, default=300, help="queries for latency and recall")
    p.add_argument("--fk-docs", type=int, default=130, help="Fictional Knowledge documents (0: skip that part)")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--write", action="store_true", help="replace the section in BENCHMARKS.md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--uri", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = child(args.child, Path(args.work), args.uri, args.fk_docs)
        Path(args.out).write_text(json.dumps(result))
        return
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise SystemExit(f"unknown backend(s) {sorted(unknown)}; known: {', '.join(BACKENDS)}")
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        make_data(work, args.n, args.queries)
        log(f"data and exact ground truth: {time.perf_counter() - t0:.1f}s")
        results = {}
        for backend in backends:
            server, uri = (start_server(work) if backend == "milvus-server" else (None, ""))
            try:
                results[backend] = run_child(backend, work, uri, args)
                if server is not None:
                    results[backend]["server_rss_mb"] = peak_rss_mb(server.pid)
            finally:
                if server is not None:
                    server.terminate()
                    server.wait(10)
    report(results, args)


def report(results: dict, args) -> None:
    base = results.get("faiss", {}).get("fk_top3")
    rows = []
    for b, r in results.items():
        same = (sum(x == y for x, y in zip(r["fk_top3"], base)) if base is not None and r.get("fk_top3") else None)
        rows.append([b, f"{r['learn_s']:.1f}", f"{r['open_s']:.2f}", f"{r['p50_ms']:.2f}", f"{r['p50_ns_ms']:.2f}",
                     f"{r['raw_p50_ms']:.2f}", f"{r['raw_p50_ns_ms']:.2f}", f"{r['recall10']:.3f}",
                     f"{r['recall10_ns']:.3f}", f"{r['rss_mb']:.0f}",
                     f"{r['server_rss_mb']:.0f}" if "server_rss_mb" in r else "-",
                     f"{r['fk_recall3']:.3f}" if r.get("fk_recall3") is not None else "-",
                     f"{same}/{len(base)}" if same is not None else "-"])
    headers = ["backend", "learn s", "open s", "p50 ms", f"p50 ms in 1 ns", "raw p50 ms", "raw p50 ms in 1 ns",
               "recall@10", "recall@10 in 1 ns", "peak RSS MB", "server RSS MB", "FK recall@3 gen",
               "FK top-3 = FAISS"]
    kinds = {b: r["kind"] for b, r in results.items()}
    body = (f"{today()}, {machine()}. `{command_line()}`\n\n{table(headers, rows)}\n\n"
            f"{args.n:,} synthetic 384-d memories (bench_search.py's clustered mixture), {SOURCES} sources over "
            f"{NAMESPACES} namespaces; 'in 1 ns' searches one namespace (10 %); {args.queries} queries, k={K}, one "
            f"per call, medians. Index kind at this size: {kinds}. learn = Store.replace_source of every source +"
            f" flush; open = a new Store until its first search answers; raw = the index's own search (the engine,"
            f" no store around it). FAISS filters a namespace by over-fetching and checking SQLite; Milvus filters"
            f" in the engine (partition key). Peak RSS: the benchmark process before the embedder loads (the"
            f" {args.n:,} vectors and their ground truth included); server RSS: the `milvus-lite server` process"
            f" (VmHWM). FK: "
            f"{args.fk_docs} Fictional Knowledge documents learned with all-MiniLM-L6-v2 into a home per backend; "
            f"gen probes; 'top-3 = FAISS' counts probes whose first 3 documents equal FAISS's.")
    print(body)
    if args.write:
        write_section("Vector backends: FAISS vs Milvus Lite vs Milvus server (issue 20)", body)


# ---- the child: one backend ---------------------------------------------------------------------------------
def child(backend: str, work: Path, uri: str, fk_docs: int) -> dict:
    from memory_llm.store import Store
    from memory_llm.store.records import NewChunk

    data, queries = np.load(work / "data.npy"), np.load(work / "queries.npy")
    truth, truth_ns = np.load(work / "truth.npy"), np.load(work / "truth_ns.npy")
    n = len(data)
    home = work / f"home-{backend}"
    store = Store(home, **store_kwargs(backend, uri))
    store.check_embedder("bench", data.shape[1])
    row_of: dict[int, int] = {}
    t0 = time.perf_counter()
    for s in range(SOURCES):
        lo, hi = s * n // SOURCES, (s + 1) * n // SOURCES
        chunks = [NewChunk(r - lo, f"memory {r} of source {s}", f"h{r}", data[r]) for r in range(lo, hi)]
        ids = store.replace_source(namespace_of(s), f"source-{s:03d}.txt", f"hs{s}", chunks)
        row_of.update(zip(ids, range(lo, hi)))
    store.flush()
    learn_s = time.perf_counter() - t0
    log(f"{backend}: learned {n:,} in {learn_s:.1f}s")
    store.close()

    t0 = time.perf_counter()
    store = Store(home, **store_kwargs(backend, uri))
    store.dense(queries[0], K)
    open_s = time.perf_counter() - t0
    index = store.index()
    kind = index.kind

    def timed(fn) -> tuple[float, list]:
        for q in queries[:10]:
            fn(q)
        times, found = [], []
        for q in queries:
            t = time.perf_counter()
            found.append(fn(q))
            times.append(time.perf_counter() - t)
        return median(times) * 1000, found

    def rec(found: list, gt: np.ndarray) -> float:
        return float(np.mean([len({row_of[i] for i in f} & set(g.tolist())) / K for f, g in zip(found, gt)]))

    p50, found = timed(lambda q: [i for i, _ in store.dense(q, K)])
    p50_ns, found_ns = timed(lambda q: [i for i, _ in store.dense(q, K, FILTER_NS)])
    raw_p50, _ = timed(lambda q: index.search(q, K))
    if index.filters:
        raw_p50_ns, _ = timed(lambda q: index.search(q, K, FILTER_NS))
    else:  # FAISS: the over-fetch the store does before checking SQLite
        raw_p50_ns, _ = timed(lambda q: index.search(q, K * 8))
    result = {"kind": kind, "learn_s": learn_s, "open_s": open_s, "p50_ms": p50, "p50_ns_ms": p50_ns,
              "raw_p50_ms": raw_p50, "raw_p50_ns_ms": raw_p50_ns, "recall10": rec(found, truth),
              "recall10_ns": rec(found_ns, truth_ns)}
    log(f"{backend}: {result}")
    store.close()
    result["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the embedder loads
    if fk_docs:
        result.update(fictional_knowledge(backend, work, uri, fk_docs))
    return result


def fictional_knowledge(backend: str, work: Path, uri: str, docs: int) -> dict:
    from bench_fictional_knowledge import probe_doc, probe_kind, ranked_docs
    from prepare_fictional_knowledge import prepare

    from memory_llm import MemoryLLM
    from memory_llm.evaluate import load_probes

    fk = work / "fk"
    if not fk.exists():
        prepare(docs, out=fk)
    probes = [p for p in load_probes(fk / "eval.jsonl") if probe_kind(p) == "gen"]
    m = MemoryLLM(work / f"fk-home-{backend}", **settings_kwargs(backend, uri))
    t0 = time.perf_counter()
    m.learn([fk / "docs"])
    log(f"{backend}: FK learned in {time.perf_counter() - t0:.1f}s")
    top3 = [ranked_docs(m.search(p.input, 10))[:3] for p in probes]
    m.close()
    hits = [probe_doc(p) in t for p, t in zip(probes, top3)]
    return {"fk_recall3": sum(hits) / len(hits), "fk_top3": top3}


if __name__ == "__main__":
    main()
