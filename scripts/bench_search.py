#!/usr/bin/env python
"""Vector search: p50/p95 latency and recall@10 vs exact, at several sizes, 384-dim synthetic clustered data.

Compared in one run, on the same vectors and queries:
  lib        memory_llm.store.vectors.FaissIndex of the kind the library chooses (choose_kind: flat <= exact_max,
             else IVF-Flat with nlist=ivf_nlist(n), trained on <= 100k vectors, nprobe=Settings.ivf_nprobe; the
             HNSW-era API open_index is used if present), built as Store.rebuild_index does, via FaissIndex.search
  faiss-flat raw faiss.IndexFlatIP (exact: the ground truth and the latency floor of exact search)
  faiss-ivf  the lib's own IVF searched directly (the difference is wrapper overhead only) + an nprobe sweep
  faiss-hnsw raw faiss.IndexHNSWFlat M=32 efConstruction=80 (the library's previous large-index choice)
  store      Store.dense through a real memory home (SQLite + index), sizes in --store-sizes
plus an efSearch sweep on HNSW and, with --hnsw-alt, more HNSW variants. Built ANN indexes are cached in --cache
with their build times (reruns skip the builds and report the recorded times).

Latency: one query per search call, k=10, faiss.omp_set_num_threads(1) (single-threaded search, as one
request of a CLI/server would run). Builds use all cores (2 here). Ground truth: batch exact search.

Data: a two-level Gaussian mixture, L2-normalised: 64 topic centres, --centres cluster centres around them
(Zipf-like cluster sizes), points = centre + within-cluster noise that lives mostly in a 24-dim subspace (one of
64, chosen by cluster) plus small isotropic noise. Cosine(point, its centre) ~0.75, mean cosine between random
points ~0.12, nearest neighbour of a query ~0.73 and 10th ~0.62, like sentence embeddings. Queries are fresh draws from the same mixture (near the data, never in it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchmd import command_line, machine, pct, table, today, write_section  # noqa: E402

import faiss  # noqa: E402

from memory_llm.store import faiss_index as V  # noqa: E402
from memory_llm.store.faiss_index import FaissIndex  # noqa: E402
from memory_llm.config import Settings  # noqa: E402

DIM = 384
K = 10
EXACT_MAX = 50_000  # the library default (Settings.exact_index_max)
LIB_M, LIB_EFC, LIB_EFS = 32, 80, 128  # the HNSW the library used before it switched to IVF
LIB_NPROBE = Settings.__dataclass_fields__['ivf_nprobe'].default if 'ivf_nprobe' in Settings.__dataclass_fields__ else 16
HOLD: list = []


# ---- data -----------------------------------------------------------------------------------------------
class Mixture:
    def __init__(self, n_centres: int, dim: int = DIM, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim = dim
        topics = _norm(rng.standard_normal((64, dim), dtype=np.float32))
        common = _norm(rng.standard_normal((1, dim), dtype=np.float32))  # shared direction: embeddings are anisotropic
        topic_of = rng.integers(0, 64, n_centres)
        centres = 0.45 * common + 0.6 * topics[topic_of] + 0.65 * _norm(
            rng.standard_normal((n_centres, dim), dtype=np.float32))
        self.centres = _norm(centres)
        w = 1.0 / np.arange(1, n_centres + 1) ** 0.8
        self.weights = rng.permutation(w / w.sum())
        self.bases = (rng.standard_normal((64, dim, 24), dtype=np.float32) / np.sqrt(dim)).astype(np.float32)
        self.sub = 0.16  # ||B z|| ~ 0.16 * sqrt(24 * 1) ~ 0.78
        self.iso = 0.02  # ||iso|| ~ 0.02 * sqrt(384) ~ 0.39

    def sample(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.dim), dtype=np.float32)
        for s in range(0, n, 50_000):
            m = min(50_000, n - s)
            c = rng.choice(len(self.centres), size=m, p=self.weights)
            z = rng.standard_normal((m, 24), dtype=np.float32)
            x = self.centres[c].copy()
            b = c % 64
            for j in np.unique(b):
                sel = b == j
                x[sel] += self.sub * z[sel] @ self.bases[j].T
            x += self.iso * rng.standard_normal((m, self.dim), dtype=np.float32)
            out[s:s + m] = _norm(x)
        return out


def _norm(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ---- measurement ----------------------------------------------------------------------------------------
def interleaved(methods: dict, queries: np.ndarray, warmup: int = 20) -> dict:
    """methods: name -> (setup, search). Step i runs every method in turn, method j on query (i + j*shift) % nq,
    so the methods are interleaved in time (machine noise hits them alike) but never run the same query back to
    back (which would find the same graph nodes hot in cache); the order rotates every step. setup() is untimed (e.g. set efSearch).
    Returns name -> (per-query ms list, ids per query in query order)."""
    nq, names = len(queries), list(methods)
    shift = max(1, nq // max(1, len(names)))
    times = {name: [] for name in names}
    ids = {name: [None] * nq for name in names}
    for q in queries[:warmup]:
        for setup, search in methods.values():
            setup()
            search(q)
    for i in range(nq):
        r = i % len(names)  # rotate the order too: no method always runs right after the heaviest one
        for name in names[r:] + names[:r]:
            j = names.index(name)
            setup, search = methods[name]
            qi = (i + j * shift) % nq
            setup()
            t = time.perf_counter_ns()
            res = search(queries[qi])
            times[name].append((time.perf_counter_ns() - t) / 1e6)
            ids[name][qi] = res
    return {name: (times[name], ids[name]) for name in names}


def recall(results: list[np.ndarray], truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(np.asarray(r)[:K], t)) for r, t in zip(results, truth))
    return hits / (len(results) * K)


def row(name: str, n: int, times, rec: float, build: float | None, params: str):
    return {"n": n, "method": name, "params": params, "p50_ms": pct(times, 50), "p95_ms": pct(times, 95),
            "recall@10": rec, "build_s": build}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


MAX_THREADS = faiss.omp_get_max_threads()  # read before anything sets it to 1
BUILD_THREADS = None


def build_threads():
    faiss.omp_set_num_threads(MAX_THREADS if BUILD_THREADS is None else BUILD_THREADS)


def search_threads():
    faiss.omp_set_num_threads(1)


def nothing():
    pass


def raw_search(index):
    return lambda q: index.search(q.reshape(1, -1), K)[1][0]


def set_ef(index, ef):
    def setup():
        index.hnsw.efSearch = ef
    return setup


def set_nprobe(index, nprobe):
    def setup():
        index.nprobe = nprobe
    return setup


def report(out: list[dict], res: dict, truth: np.ndarray, n: int, meta: dict) -> None:
    """meta: name -> (label, params, build_s)."""
    for name, (times, ids) in res.items():
        label, params, build = meta[name]
        out.append(row(label, n, times, recall(ids, truth[:len(ids)]), build, params))
        r = out[-1]
        log(f"  {label} [{params}]: p50 {r['p50_ms']:.3f} ms p95 {r['p95_ms']:.3f} ms recall {r['recall@10']:.4f}")


def raw_saver(index):
    return lambda path: faiss.write_index(index, str(path))


def raw_loader(path):
    return faiss.read_index(str(path))


BUILD_CPU: dict[int, float | None] = {}


def cpu_note(index) -> str:
    cpu = BUILD_CPU.get(id(index))
    return f" (build CPU {cpu:.0f} s)" if cpu else ""


def cached(args, key: str, build, saver, loader):
    """Build an index (timed), or load it from --cache with the build time measured when it was built."""
    if args.cache:
        d = Path(args.cache)
        path, info = d / f"{key}.faiss", d / f"{key}.json"
        if path.exists() and info.exists() and not args.rebuild:
            t = time.perf_counter()
            index = loader(path)
            log(f"  loaded {key} from the cache in {time.perf_counter() - t:.1f} s")
            saved = json.loads(info.read_text())
            BUILD_CPU[id(index)] = saved.get("build_cpu_s")
            return index, saved["build_s"]
    t, c = time.perf_counter(), time.process_time()
    index = build()
    b, cpu = time.perf_counter() - t, time.process_time() - c
    BUILD_CPU[id(index)] = cpu
    log(f"  built {key}: {b:.1f} s wall, {cpu:.1f} s CPU (all threads), load {os.getloadavg()[0]:.1f}")
    if args.cache:
        d.mkdir(parents=True, exist_ok=True)
        saver(index)(path)
        info.write_text(json.dumps({"build_s": b, "build_cpu_s": cpu, "date": today(),
                                    "load": os.getloadavg()[0]}))
    return index, b


def bench_size(n: int, args, mix: Mixture, out: list[dict]) -> None:
    log(f"n={n:,}: generating data")
    data = mix.sample(n, seed=1000 + n)
    queries = mix.sample(args.queries, seed=7)
    ids = np.arange(1, n + 1, dtype=np.int64)  # memory ids as SQLite assigns them

    # ground truth (batch, all cores)
    build_threads()
    t = time.perf_counter()
    flat = faiss.IndexFlatIP(DIM)
    flat.add(data)
    flat_build = time.perf_counter() - t
    _, truth = flat.search(queries, K)

    # the library's choice, built as Store.rebuild_index builds it
    def build_lib():
        kind = V.choose_kind(n, EXACT_MAX)
        if hasattr(V, "open_index"):  # the HNSW-era API
            lib = V.open_index(DIM, n, EXACT_MAX)
        elif kind == "ivf":  # k-means on a sample of up to 100k stored vectors, nlist = ivf_nlist(n)
            train = data[np.random.default_rng(11).choice(n, min(n, 100_000), replace=False)]
            lib = FaissIndex(DIM, kind, nprobe=LIB_NPROBE, train=train, nlist=V.ivf_nlist(n))
        else:
            lib = FaissIndex(DIM, kind)
        for s in range(0, n, 20_000):  # as Store.rebuild_index feeds it
            lib.add(ids[s:s + 20_000], data[s:s + 20_000])
        return lib

    build_threads()
    if n > EXACT_MAX:
        lib, lib_build = cached(args, f"lib-{V.choose_kind(n, EXACT_MAX)}-n{n}-c{args.centres}", build_lib,
                                lambda ix: ix.save, lambda path: FaissIndex.load(path, nprobe=LIB_NPROBE))
    else:
        t = time.perf_counter()
        lib = build_lib()
        lib_build = time.perf_counter() - t
    log(f"  lib {lib.kind} built in {lib_build:.1f} s")
    if lib.kind == "flat":
        lib_params = "IDMap2(FlatIP)"
    elif lib.kind == "ivf":
        lib_params = f"IVFFlat nlist={lib.nlist} nprobe={LIB_NPROBE}, trained on {min(n, 100_000):,}"
    else:
        lib_params = lib.kind
    lib_search = (nothing, lambda q: lib.search(q, K)[0] - 1)

    # HNSW M=32 efC=80 (the previous library choice) for comparison
    def build_hnsw():
        h = faiss.IndexHNSWFlat(DIM, LIB_M, faiss.METRIC_INNER_PRODUCT)
        h.hnsw.efConstruction = LIB_EFC
        h.add(data)
        return h

    def load_hnsw(path):
        ix = faiss.read_index(str(path))
        HOLD.append(ix)  # a downcast view does not own the C++ index: keep the owner alive
        return faiss.downcast_index(ix.index) if hasattr(ix, "id_map") else faiss.downcast_index(ix)

    if n > EXACT_MAX:
        hnsw, hnsw_build = cached(args, f"hnsw32-80-n{n}-c{args.centres}", build_hnsw, raw_saver, load_hnsw)
        HOLD.append(hnsw)
    else:
        t = time.perf_counter()
        hnsw = build_hnsw()
        hnsw_build = time.perf_counter() - t
    log(f"  hnsw built in {hnsw_build:.1f} s")
    search_threads()

    # exact flat (slow at large n: fewer queries), interleaved with the lib when the lib is flat too
    nf = min(args.queries, args.flat_queries)
    methods = {"flat": (nothing, raw_search(flat))}
    meta = {"flat": ("faiss-flat (exact)", "IndexFlatIP", flat_build),
            "lib": (f"lib FaissIndex ({lib.kind})", lib_params + cpu_note(lib), lib_build)}
    if lib.kind == "flat":
        methods["lib"] = lib_search
    report(out, interleaved(methods, queries[:nf]), truth, n, meta)
    del flat
    gc.collect()

    # lib (IVF) vs the same IVF searched raw, and the nprobe sweep, interleaved per query
    if lib.kind == "ivf":
        ivf = faiss.extract_index_ivf(lib.index)
        methods = {"lib": (set_nprobe(ivf, LIB_NPROBE), lib_search[1]),
                   "ivf": (set_nprobe(ivf, LIB_NPROBE), lambda q: lib.index.search(q.reshape(1, -1), K)[1][0] - 1)}
        meta["ivf"] = ("faiss-ivfflat (lib's index, raw)", f"nlist={lib.nlist} nprobe={LIB_NPROBE}", None)
        for p_ in args.nprobe:
            if p_ != LIB_NPROBE:
                methods[f"np{p_}"] = (set_nprobe(ivf, p_), lambda q: lib.index.search(q.reshape(1, -1), K)[1][0] - 1)
                meta[f"np{p_}"] = ("faiss-ivfflat nprobe sweep (lib's index)", f"nlist={lib.nlist} nprobe={p_}", None)
        report(out, interleaved(methods, queries), truth, n, meta)
        ivf.nprobe = LIB_NPROBE

    # HNSW and its efSearch sweep
    methods = {"hnsw": (set_ef(hnsw, LIB_EFS), raw_search(hnsw))}
    meta["hnsw"] = ("faiss-hnsw", f"M={LIB_M} efC={LIB_EFC} efS={LIB_EFS}" + cpu_note(hnsw), hnsw_build)
    for ef in args.ef_sweep:
        if ef != LIB_EFS:
            methods[f"ef{ef}"] = (set_ef(hnsw, ef), raw_search(hnsw))
            meta[f"ef{ef}"] = ("faiss-hnsw efSearch sweep", f"M={LIB_M} efC={LIB_EFC} efS={ef}", None)
    report(out, interleaved(methods, queries), truth, n, meta)
    del hnsw
    HOLD.clear()
    gc.collect()

    # alternatives that build faster (large sizes only)
    if args.alternatives and n >= args.alternatives_min:
        for m_, efc in args.hnsw_alt:
            build_threads()

            def build_alt():
                alt = faiss.IndexHNSWFlat(DIM, m_, faiss.METRIC_INNER_PRODUCT)
                alt.hnsw.efConstruction = efc
                alt.add(data)
                return alt

            alt, b = cached(args, f"hnsw-n{n}-c{args.centres}-M{m_}-efc{efc}", build_alt, raw_saver, raw_loader)
            log(f"  alt hnsw M={m_} efC={efc} built in {b:.1f} s")
            search_threads()
            methods = {f"ef{ef}": (set_ef(alt, ef), raw_search(alt)) for ef in args.alt_ef}
            meta = {f"ef{ef}": ("faiss-hnsw alt", f"M={m_} efC={efc} efS={ef}" + cpu_note(alt), b)
                    for ef in args.alt_ef}
            report(out, interleaved(methods, queries), truth, n, meta)
            del alt
            gc.collect()

    # the full Store.dense path
    if n in args.store_sizes:
        bench_store(n, data, queries, truth, lib, args, out)
    del lib
    gc.collect()


def bench_store(n: int, data, queries, truth, lib: FaissIndex, args, out: list[dict]) -> None:
    from memory_llm.store import NewChunk, Store

    with tempfile.TemporaryDirectory(prefix="mllm-bench-store-", dir=args.tmp) as home:
        store = Store(Path(home))
        store.check_embedder("synthetic-384", DIM)
        t = time.perf_counter()
        per = 5000
        for s in range(0, n, per):
            chunks = [NewChunk(j, f"memory {s + j}", f"h{s + j}", data[s + j]) for j in range(min(per, n - s))]
            store.replace_source("default", f"synthetic:{s}", f"src{s}", chunks)
        insert = time.perf_counter() - t
        log(f"  store: inserted {n:,} rows in {insert:.1f} s")
        build_threads()
        reuse = n > args.store_rebuild_max
        if reuse:  # skip a second HNSW build: hand the store the lib index built above (same ids 1..n)
            lib.save(store.index_path)
        t = time.perf_counter()
        index = store.index()
        open_s = time.perf_counter() - t
        how = "loaded the saved lib index" if reuse else "rebuilt from SQLite"
        log(f"  store.index() {how} in {open_s:.1f} s ({index.kind})")
        search_threads()
        lib_search = (lambda q: lib.search(q, K)[0] - 1) if lib.kind == index.kind else None
        methods = {"none": (nothing, lambda q: np.array([i for i, _ in store.dense(q, K)]) - 1),
                   "ns": (nothing, lambda q: np.array([i for i, _ in store.dense(q, K, "default")]) - 1)}
        meta = {"none": (f"Store.dense ({index.kind})", f"namespace=None; build = store.index() {how}; "
                         f"insert {insert:.0f} s", open_s),
                "ns": (f"Store.dense ({index.kind})", "namespace='default' (the ask/search path)", None),
                "lib": (f"lib FaissIndex ({lib.kind}), again", "interleaved with Store.dense", None)}
        if lib_search is not None:
            methods["lib"] = (nothing, lib_search)
        report(out, interleaved(methods, queries), truth, n, meta)
        if n <= args.relearn_max:
            # re-learn one changed source (same uri, 10 chunks): what `mllm learn` does for an edited file
            build_threads()
            t = time.perf_counter()
            chunks = [NewChunk(j, f"edited memory {j}", f"e{j}", data[j]) for j in range(10)]
            store.replace_source("default", "synthetic:0", "edited", chunks)
            w = time.perf_counter() - t
            store.dense(queries[0], K)
            total = time.perf_counter() - t
            search_threads()
            log(f"  re-learn one source: replace_source {w:.3f} s, + next Store.dense {total:.3f} s")
            out.append({"n": n, "method": f"Store: re-learn 1 source ({index.kind})", "params":
                        "replace_source of a 10-chunk source + the next Store.dense (flat/IVF remove in place; "
                        "the former HNSW could not, so it rebuilt the index from SQLite)",
                        "p50_ms": 1000 * total, "p95_ms": float("nan"), "recall@10": float("nan"),
                        "build_s": total})
        store.close()


def main() -> None:
    global BUILD_THREADS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated memory counts")
    p.add_argument("--queries", type=int, default=1000, help="queries per method (latency and recall)")
    p.add_argument("--flat-queries", type=int, default=300, help="at most this many for exact flat latency")
    p.add_argument("--centres", type=int, default=4000, help="cluster centres of the mixture")
    p.add_argument("--store-sizes", default="10000,100000", help="sizes that also run the Store.dense path")
    p.add_argument("--store-rebuild-max", type=int, default=200_000,
                   help="above this the store loads the lib index from disk instead of rebuilding it")
    p.add_argument("--relearn-max", type=int, default=2_000_000,
                   help="up to this size also time re-learning one source in the store")
    p.add_argument("--ef-sweep", default="16,32,64,128,256,512,1024")
    p.add_argument("--alternatives", action="store_true", help="also build cheaper HNSW and IVF at large n")
    p.add_argument("--alternatives-min", type=int, default=1_000_000)
    p.add_argument("--hnsw-alt", default="", help="M:efConstruction pairs of extra HNSW builds, e.g. 16:40,32:200")
    p.add_argument("--alt-ef", default="32,64,128,256")
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (default 4*sqrt(n))")
    p.add_argument("--nprobe", default="8,16,32,64,128,256")
    p.add_argument("--build-threads", type=int, default=None)
    p.add_argument("--cache", default="/tmp/bench_search_cache",
                   help="keep built ANN indexes here (with their build times) so reruns skip the builds; '' = off")
    p.add_argument("--rebuild", action="store_true", help="ignore the cache (rebuild and re-time)")
    p.add_argument("--tmp", default=None, help="directory for the temporary store homes")
    p.add_argument("--json", default="/tmp/bench_search.json", help="raw results")
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    p.add_argument("--render", default=None, metavar="JSON", help="only write BENCHMARKS.md from a saved run")
    p.add_argument("--render-command", default=None, help="the command that produced --render's JSON")
    p.add_argument("--render-meta", default=None, help="JSON object of meta fields for --render")
    args = p.parse_args()
    if args.render:
        extra = json.loads(args.render_meta) if args.render_meta else {}
        saved = json.loads(Path(args.render).read_text())
        if isinstance(saved, list):
            saved = {"meta": extra, "results": saved}
            Path(args.render).write_text(json.dumps(saved, indent=1))
        render_saved(args.render, args.render_command)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    args.store_sizes = {int(s) for s in args.store_sizes.split(",") if s}
    args.ef_sweep = [int(s) for s in args.ef_sweep.split(",") if s]
    args.alt_ef = [int(s) for s in args.alt_ef.split(",") if s]
    args.nprobe = [int(s) for s in args.nprobe.split(",") if s]
    args.hnsw_alt = [tuple(int(x) for x in s.split(":")) for s in args.hnsw_alt.split(",") if s]
    BUILD_THREADS = args.build_threads
    started = time.perf_counter()
    load0 = os.getloadavg()[0]
    mix = Mixture(args.centres)
    sample = mix.sample(2000, seed=5)
    cos = sample @ sample.T
    log(f"data check: mean cosine between random points {cos[np.triu_indices(2000, 1)].mean():.3f}, "
        f"to own centre ~0.75 by construction; faiss {faiss.__version__}, build threads {BUILD_THREADS or MAX_THREADS}")
    out: list[dict] = []
    meta = {"command": command_line(), "date": today(), "load_start": load0, "centres": args.centres,
            "queries": args.queries, "flat_queries": args.flat_queries, "threads": BUILD_THREADS or MAX_THREADS}
    for n in sizes:
        bench_size(n, args, mix, out)
        meta["minutes"] = (time.perf_counter() - started) / 60
        meta["load_end"] = os.getloadavg()[0]
        Path(args.json).write_text(json.dumps({"meta": meta, "results": out}, indent=1))
    log(f"done in {meta['minutes']:.1f} min")
    body = render(meta, out)
    if not args.no_write:
        write_section("Vector search (bench_search.py)", body)
    print(body)


def render(meta: dict, out: list[dict]) -> str:
    def nan(v) -> bool:
        return isinstance(v, float) and v != v

    rows = [[f"{r['n']:,}", r["method"], r["params"], "" if nan(r["recall@10"]) else r["p50_ms"],
             "" if nan(r["p95_ms"]) else r["p95_ms"], "" if nan(r["recall@10"]) else f"{r['recall@10']:.4f}",
             "" if r["build_s"] is None else f"{r['build_s']:.1f}"] for r in out]
    lines = []
    for n in sorted({r["n"] for r in out}):
        at = [r for r in out if r["n"] == n]
        lib = next((r for r in at if r["method"].startswith("lib FaissIndex") and "again" not in r["method"]), None)
        if lib is None:
            continue
        ref_name = {"(flat)": "faiss-flat (exact)", "(ivf)": "faiss-ivfflat (lib's index, raw)",
                    "(hnsw)": "faiss-hnsw (lib's graph, raw)"}
        want = next((v for k_, v in ref_name.items() if k_ in lib["method"]), None)
        ref = next((r for r in at if r["method"] == want), None)
        line = f"- n={n:,}: the library ({lib['params']}) p50 {lib['p50_ms']:.3f} ms, recall {lib['recall@10']:.4f}"
        if ref is not None:
            d = lib["p50_ms"] - ref["p50_ms"]
            line += (f"; wrapper overhead vs raw faiss ({ref['method']}) {d * 1000:+.0f} µs "
                     f"({100 * d / ref['p50_ms']:+.0f}%)")
        ok = [r for r in at if r["recall@10"] >= 0.95 and not r["method"].startswith(("faiss-flat", "Store"))
              and "(flat)" not in r["method"]]
        if ok:
            best = min(ok, key=lambda r: r["p50_ms"])
            line += (f"; fastest ANN config with recall ≥ 0.95: {best['method']} {best['params']} "
                     f"p50 {best['p50_ms']:.3f} ms, recall {best['recall@10']:.4f}")
        lines.append(line + ".")
    return (f"Command: `{meta['command']}`  \nDate: {meta['date']}; {machine()}; load average at start/end "
            f"{meta['load_start']:.1f}/{meta['load_end']:.1f} (other jobs shared the machine); faiss "
            f"{faiss.__version__}; total run {meta['minutes']:.1f} min.\n\n"
            "384-dim synthetic clustered vectors (two-level Gaussian mixture, "
            f"{meta['centres']} centres, L2-normalised; queries are fresh draws from the same mixture), k=10, "
            f"{meta['queries']} queries per method (exact flat latency on the first {meta['flat_queries']}). "
            "Latency = one query per call with faiss.omp_set_num_threads(1) (single-threaded search); methods on "
            "the same index are interleaved query by query so noise hits them alike. Builds use all "
            f"{meta['threads']} cores. Recall@10 is against exact IndexFlatIP. `build s` is index construction "
            "(for Store.dense: `store.index()`, which rebuilds from SQLite).\n\n"
            + table(["n", "method", "params", "p50 ms", "p95 ms", "recall@10", "build s"], rows)
            + "\n\nSummary:\n\n" + "\n".join(lines) + "\n")


def render_saved(path: str, command: str | None) -> None:
    saved = json.loads(Path(path).read_text())
    if isinstance(saved, list):  # an older run saved only the results
        saved = {"meta": {}, "results": saved}
    meta = {"command": command or "?", "date": today(), "load_start": float("nan"), "load_end": float("nan"),
            "centres": 4000, "queries": 1000, "flat_queries": 300, "threads": MAX_THREADS, "minutes": float("nan"),
            **saved["meta"], **({"command": command} if command else {})}
    body = render(meta, saved["results"])
    write_section("Vector search (bench_search.py)", body)
    print(body)


if __name__ == "__main__":
    main()
