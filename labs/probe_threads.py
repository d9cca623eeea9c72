#!/usr/bin/env python
"""Probe: does a faiss search in a thread slow down later torch work in that thread (two OpenMP runtimes:
faiss-cpu bundles its own libgomp, torch another)? Greedy generation of N tokens on the default LLM, timed
in the main thread and in a fresh worker thread, before and after faiss searches in the main thread, and with
faiss.omp_set_num_threads(1). Prints a JSON line; medians of --reps. Usage:

    MLLM_CACHE=/tmp/mcache .venv/bin/python labs/probe_threads.py [--tokens 16] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import faiss
import numpy as np
import torch

from memory_llm.config import Settings
from memory_llm.generate import TransformersGenerator, build_messages


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--faiss-threads", type=int, default=None, help="faiss.omp_set_num_threads before searching")
    args = p.parse_args()
    s = Settings.load()
    gen = TransformersGenerator.load(s.model, s.cache_dir, s.device, s.dtype)
    ids = gen.chat_ids(build_messages("When did the Larkspur Observatory open? " * 20, []))
    model, tok = gen.model, gen.tokenizer

    def generate() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                           min_new_tokens=args.tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        return time.perf_counter() - t

    def in_thread() -> float:
        out = []
        th = threading.Thread(target=lambda: out.append(generate()))
        th.start()
        th.join()
        return out[0]

    def med(fn) -> float:
        return statistics.median(fn() for _ in range(args.reps))

    generate()  # warm-up
    res = {"torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
           "tokens": args.tokens, "prompt_tokens": int(ids.shape[1])}
    res["main thread, no faiss yet"] = med(generate)
    res["worker thread, no faiss yet"] = med(in_thread)
    if args.faiss_threads:
        faiss.omp_set_num_threads(args.faiss_threads)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(384))
    x = np.random.default_rng(0).standard_normal((200, 384)).astype(np.float32)
    index.add_with_ids(x, np.arange(200))
    t = time.perf_counter()
    for q in x[:50]:
        index.search(q.reshape(1, -1), 4)
    res["50 single-query faiss searches (s)"] = time.perf_counter() - t
    res["main thread, after faiss in main"] = med(generate)
    res["worker thread, after faiss in main"] = med(in_thread)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
