#!/usr/bin/env python
"""Probe: where in-process retrieval time goes in MemoryLLM.ask (models warm), and the effect of running faiss
single-threaded. Needs a learned home:

    MLLM_CACHE=/tmp/mcache .venv/bin/mllm learn data/sample --home /tmp/probe-home
    MLLM_CACHE=/tmp/mcache .venv/bin/python labs/probe_retrieve.py /tmp/probe-home [--reps 7]

Each rep first runs a short generation (as ask does between two questions), then times each retrieval step.
Prints a JSON line of medians in ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import faiss

from memory_llm import MemoryLLM
from memory_llm.retrieve import rrf

Q = "When did the Larkspur Observatory open, and who founded it?"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("home")
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    m = MemoryLLM(args.home)
    m.ask(Q, max_new_tokens=4)  # load and warm everything
    store, emb = m.store, m.embedder
    out = {}
    for label, threads in (("faiss default threads", faiss.omp_get_max_threads()), ("faiss 1 thread", 1)):
        faiss.omp_set_num_threads(threads)
        steps: dict[str, list[float]] = {}

        def t(name, fn):
            s = time.perf_counter()
            r = fn()
            steps.setdefault(name, []).append(1000 * (time.perf_counter() - s))
            return r

        for _ in range(args.reps):
            m.ask(Q, max_new_tokens=4, use_memory=False)  # torch ran just before, as between two questions
            v = t("embed query (SentenceEmbedder.encode)", lambda: emb.encode([Q])[0])
            t("store.index() (cached)", store.index)
            d = t("Store.dense(k=20, namespace)", lambda: store.dense(v, 20, "default"))
            lx = t("Store.lexical (FTS5)", lambda: store.lexical(Q, 20, "default"))
            fused = rrf([d, lx])[:4]
            t("Store.get", lambda: store.get([i for i, _, _ in fused]))
            t("whole MemoryLLM.search", lambda: m.search(Q))
        out[label] = {k: round(statistics.median(v), 2) for k, v in steps.items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
