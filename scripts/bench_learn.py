#!/usr/bin/env python
"""`learn` throughput (chunks/s) vs raw SentenceTransformer.encode of the same chunks, in the same process.

Documents: train_context of the first --docs records of shared/data/fictional_knowledge/fictional_knowledge.json,
written as .txt files into a temp dir (read from shared/, never copied into the repo).

  learn  MemoryLLM(home=fresh tmp, embedder=<the loaded one>).learn([dir]): total wall time, chunks added
  raw    model.encode(texts, batch_size=64, normalize_embeddings=True) on the same SentenceTransformer, where
         texts are the chunk texts read back from the learned store (SELECT text FROM memories ORDER BY id)

The embedder is loaded before any timing; one warm-up of each, then --runs runs each, interleaved
(learn, raw, learn, raw, ...) so machine noise hits both alike. Reported: medians and the ratio of medians
(and the median of per-pair ratios). Then one cProfile'd learn (not timed) shows where learn's time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchmd import command_line, machine, median, table, today, write_section  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fictional_knowledge" / "fictional_knowledge.json"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_docs(n: int, target: Path) -> int:
    records = json.loads(DATA.read_text(encoding="utf-8"))[:n]
    for i, r in enumerate(records):
        (target / f"doc{i:03d}.txt").write_text(r["train_context"], encoding="utf-8")
    return sum(len(r["train_context"]) for r in records)


def learn_once(emb, docs: Path, tmp: Path, profile: cProfile.Profile | None = None):
    from memory_llm import MemoryLLM

    home = Path(tempfile.mkdtemp(prefix="home-", dir=tmp))
    m = MemoryLLM(home=home, embedder=emb)
    try:
        t, c = time.perf_counter(), time.process_time()
        if profile is not None:
            profile.enable()
        report = m.learn([docs])
        if profile is not None:
            profile.disable()
        wall = time.perf_counter() - t
        CPU.append(time.process_time() - c)
        m.close()
        with sqlite3.connect(home / "memory.sqlite") as db:
            texts = [r[0] for r in db.execute("SELECT text FROM memories ORDER BY id")]
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return wall, report, texts


CPU: list[float] = []  # process CPU seconds (all threads) of each timed call, in call order


def raw_once(model, texts) -> float:
    t, c = time.perf_counter(), time.process_time()
    model.encode(texts, batch_size=64, normalize_embeddings=True)
    CPU.append(time.process_time() - c)
    return time.perf_counter() - t


def overhead_probe(emb, docs: Path, tmp: Path, texts: list[str], reps: int = 3) -> list[list]:
    """Time learn's two non-embedding costs as learn does them and as a batched design would (medians of reps):
    the near-duplicate search (one Store.dense per chunk vs one batched faiss search) and token counting
    (one tokenizer call per sentence vs one call per section)."""
    import faiss

    from memory_llm import MemoryLLM
    from memory_llm.ingest.chunker import split_sentences

    home = Path(tempfile.mkdtemp(prefix="probe-", dir=tmp))
    m = MemoryLLM(home=home, embedder=emb)
    m.learn([docs])
    store = m.store
    vecs = emb.encode(texts)  # torch has just run in this process, as in learn
    index = store.index()
    rows = []

    def timed(fn) -> float:
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return median(out)

    threads = faiss.omp_get_max_threads()
    per_chunk = timed(lambda: [store.dense(v, 2, "default") for v in vecs])
    faiss.omp_set_num_threads(1)
    per_chunk_1t = timed(lambda: [store.dense(v, 2, "default") for v in vecs])
    faiss.omp_set_num_threads(threads)
    batched = timed(lambda: index.index.search(vecs, 2))
    rows += [[f"near-dup search, Store.dense per chunk (as learn does), faiss {threads} threads", len(vecs),
              1000 * per_chunk],
             ["near-dup search, Store.dense per chunk, faiss.omp_set_num_threads(1)", len(vecs), 1000 * per_chunk_1t],
             ["near-dup search, one batched index.search(all vectors, k)", len(vecs), 1000 * batched]]
    sections = [p.read_text(encoding="utf-8") for p in sorted(docs.glob("*.txt"))]
    sentences = [split_sentences(s) for s in sections]
    n_sent = sum(len(s) for s in sentences)
    tok = emb.tokenizer
    one_by_one = timed(lambda: [emb.count_tokens(x) for ss in sentences for x in ss])
    per_section = timed(lambda: [[len(ids) for ids in tok(ss, add_special_tokens=False, truncation=False,
                                                            verbose=False)["input_ids"]] for ss in sentences])
    rows += [["token counting, count_tokens per sentence (as chunk_text does)", n_sent, 1000 * one_by_one],
             ["token counting, one tokenizer call per section (batched)", n_sent, 1000 * per_section]]
    m.close()
    shutil.rmtree(home, ignore_errors=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=60, help="records of fictional_knowledge.json to learn")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as the CLI sets it
    import torch

    from memory_llm import MemoryLLM

    load0 = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="mllm-bench-learn-"))
    try:
        docs = tmp / "docs"
        docs.mkdir()
        chars = write_docs(args.docs, docs)
        t = time.perf_counter()
        emb = MemoryLLM(home=tmp / "loader").embedder  # load the embedder once, outside every timing
        log(f"embedder loaded in {time.perf_counter() - t:.1f} s; torch threads {torch.get_num_threads()}; "
            f"{args.docs} docs, {chars:,} chars")
        model = emb.model

        wall, report, texts = learn_once(emb, docs, tmp)  # warm-up
        raw_once(model, texts)
        n_chunks = report.chunks_added
        log(f"warm-up: learn {wall:.2f} s, {n_chunks} chunks ({report.files} files, "
            f"{report.duplicates_skipped + report.near_duplicates_skipped} skipped)")
        learn_t, raw_t = [], []
        CPU.clear()
        for i in range(args.runs):
            wall, report, texts_i = learn_once(emb, docs, tmp)
            assert report.chunks_added == n_chunks and texts_i == texts, "learn is not deterministic"
            learn_t.append(wall)
            raw_t.append(raw_once(model, texts))
            log(f"run {i + 1}: learn {wall:.2f} s, raw encode {raw_t[-1]:.2f} s")

        learn_cpu, raw_cpu = median(CPU[0::2]), median(CPU[1::2])
        learn_cps, raw_cps = n_chunks / median(learn_t), n_chunks / median(raw_t)
        ratio = learn_cps / raw_cps
        pair = median([r / l for l, r in zip(learn_t, raw_t)])
        tokens = sum(len(emb.tokenizer(t_, add_special_tokens=False)["input_ids"]) for t_ in texts)
        log(f"learn {learn_cps:.1f} chunks/s, raw {raw_cps:.1f} chunks/s, ratio {ratio:.3f} (pairwise {pair:.3f})")

        probe = overhead_probe(emb, docs, tmp, texts)
        for r in probe:
            log(f"probe: {r[0]}: {r[2]:.1f} ms for {r[1]}")
        prof_rows, prof_text = [], ""
        if not args.no_profile:
            prof = cProfile.Profile()
            wall, _, _ = learn_once(emb, docs, tmp, prof)
            st = pstats.Stats(prof)
            wanted = {  # (file suffix, function) -> label
                ("assistant.py", "learn"): "MemoryLLM.learn (total)",
                ("chunker.py", "chunk_text"): "chunk_text (sentence split + count_tokens)",
                ("embed.py", "count_tokens"): "  of which SentenceEmbedder.count_tokens",
                ("embed.py", "encode"): "SentenceEmbedder.encode",
                ("assistant.py", "_novel_chunks"): "_novel_chunks (dedup)",
                ("sqlite.py", "dense"): "  of which Store.dense",
                ("sqlite.py", "replace_source"): "Store.replace_source",
                ("sqlite.py", "index"): "Store.index",
                ("sqlite.py", "flush"): "Store.flush (index save)",
                ("sqlite.py", "check_embedder"): "Store.check_embedder",
                ("loaders.py", "load_file"): "load_file",
                ("sqlite.py", "__init__"): "Store.__init__ (open + migrate)",
            }
            found = {}
            for (file, _line, fn), (_cc, nc, _tt, ct, _callers) in st.stats.items():
                for (suffix, name), label in wanted.items():
                    if fn == name and file.endswith(os.sep + suffix) and "memory_llm" in file:
                        found[label] = (found.get(label, (0, 0))[0] + ct, found.get(label, (0, 0))[1] + nc)
            total = found.get("MemoryLLM.learn (total)", (wall, 1))[0]
            for label in wanted.values():
                if label in found:
                    ct, nc = found[label]
                    prof_rows.append([label, nc, f"{ct:.3f}", f"{100 * ct / total:.1f}%"])
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
            prof_text = buf.getvalue()
            print(prof_text)

        body = (f"Command: `{command_line()}`  \nDate: {today()}; {machine()}; load average at start/end "
                f"{load0:.1f}/{os.getloadavg()[0]:.1f}; torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads; embedder {emb.name}.\n\n"
                f"Input: train_context of the first {args.docs} records of fictional_knowledge.json as .txt files "
                f"({chars:,} chars) → {n_chunks} chunks ({tokens:,} embedder tokens, "
                f"{tokens / max(n_chunks, 1):.0f}/chunk). Embedder loaded before timing; one warm-up each; "
                f"{args.runs} runs each, interleaved; fresh home per learn run. raw = "
                "`model.encode(texts, batch_size=64, normalize_embeddings=True)` on the same loaded model, texts "
                "read back from the store.\n\n"
                + table(["path", "median s", "runs s", "chunks/s", "CPU s (median)"],
                        [["learn (MemoryLLM.learn, wall)", median(learn_t), " / ".join(f"{x:.2f}" for x in learn_t),
                          learn_cps, learn_cpu],
                         ["raw SentenceTransformer.encode", median(raw_t), " / ".join(f"{x:.2f}" for x in raw_t),
                          raw_cps, raw_cpu]])
                + f"\n\n**learn / raw throughput: {ratio:.3f}** (median of per-run-pair ratios {pair:.3f}; "
                  f"target ≥ 0.9). By process CPU time (less sensitive to other jobs): {raw_cpu / learn_cpu:.3f}.\n")
        if prof_rows:
            body += ("\nWhere learn's time goes (one cProfile'd run, cumulative seconds; cProfile inflates "
                     "Python-heavy parts):\n\n" + table(["function", "calls", "cum s", "share"], prof_rows) + "\n")
        body += ("\nlearn's non-embedding costs, as done now vs batched (same process, after torch ran; median of 3):"
                 "\n\n" + table(["operation", "items", "ms total"], probe) + "\n")
        print(body)
        if not args.no_write:
            write_section("Learn throughput (bench_learn.py)", body + NOTES)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


NOTES = """
"""

if __name__ == "__main__":
    main()
