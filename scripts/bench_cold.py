#!/usr/bin/env python
"""The cold `ask`'s answers: llama.cpp (cold_backend, the default for a one-shot ask) vs transformers, on held-out
questions asked as users ask them.

The held-out passages of a set (bench_served's splits: SQuAD by article, or FK documents) are learned into one
home; every question is asked as `ask` asks it (retrieval, the source floor, the default template, greedy, at most
--max-new-tokens) by two MemoryLLMs on that home that differ only in generator_backend (llama.cpp / transformers)
and share one embedder, so both read the same sources (asserted: the same prompt tokens). Accuracy of each
(evaluate.is_correct against the gold answers) with 95% intervals from resampling documents, the paired difference
(llama.cpp − transformers) with its interval, and how often the two answers are the same text.

    MLLM_CACHE=/tmp/mcache .venv/bin/python scripts/bench_cold.py [--set squad|fk] [--n 10] [--write]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchmd import command_line, log, machine, table, today, write_section  # noqa: E402
from bench_served import bootstrap, fk_split, squad_split  # noqa: E402

SECTION = "Cold ask: llama.cpp vs transformers answers"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", choices=("squad", "fk"), default="squad")
    ap.add_argument("--n", type=int, default=10, help="held-out passages / documents (default 10)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = ap.parse_args()

    from memory_llm import MemoryLLM
    from memory_llm.config import DEFAULT_NAMESPACE
    from memory_llm.evaluate import is_correct

    with tempfile.TemporaryDirectory(prefix="mllm-bench-cold-") as tmp:
        docs, probes = squad_split("heldout", args.n) if args.set == "squad" else \
            fk_split("heldout", args.n, Path(tmp))
        torch_m = MemoryLLM(Path(tmp) / "home", generator_backend="transformers")
        for d in docs:
            torch_m.learn(text=d["text"], source=d["id"])
        llama_m = MemoryLLM(Path(tmp) / "home", generator_backend="llama.cpp", embedder=torch_m.embedder)
        correct: dict[str, list[bool]] = {"transformers": [], "llama.cpp": []}
        same, seconds = 0, {"transformers": 0.0, "llama.cpp": 0.0}
        for i, p in enumerate(probes):
            texts = {}
            for name, m in (("transformers", torch_m), ("llama.cpp", llama_m)):
                ids = m.answerer.prepare(p["input"], k=None, namespace=DEFAULT_NAMESPACE, use_memory=True).ids
                texts[name + " ids"] = [int(t) for t in ids[0].tolist()]
                t0 = time.perf_counter()
                texts[name] = m.ask(p["input"], max_new_tokens=args.max_new_tokens, log=False).text
                seconds[name] += time.perf_counter() - t0
                correct[name].append(is_correct(texts[name], p["answers"]))
            if texts["transformers ids"] != texts["llama.cpp ids"]:
                raise SystemExit(f"the two backends built different prompts for {p['input']!r}")
            same += texts["transformers"].strip() == texts["llama.cpp"].strip()
            if i % 10 == 0:
                log(f"{i + 1}/{len(probes)}: {correct['transformers'][-1]} {correct['llama.cpp'][-1]}")
        torch_m.close()
        llama_m.close()
    stats = bootstrap(correct, [p["tags"][0] for p in probes],  # intervals resampling documents
                      derived=lambda acc: {"difference": acc["llama.cpp"] - acc["transformers"]})
    fmt = lambda v: f"{v['value']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"  # noqa: E731
    rows = [[name, fmt(stats[name]), f"{seconds[name] / len(probes):.2f}"] for name in ("transformers", "llama.cpp")]
    rows.append(["llama.cpp − transformers", fmt(stats["difference"]), ""])
    body = "\n".join([
        f"Command: `MLLM_CACHE=<cache> {command_line()}`  ",
        f"Date: {today()}. Machine: {machine()}.  ",
        f"{args.set} held-out split, {len(docs)} {'passages' if args.set == 'squad' else 'documents'}, {len(probes)} "
        f"questions in chat form, each asked as `ask` asks it (same sources and prompt tokens for both), greedy, at "
        f"most {args.max_new_tokens} tokens. Intervals: 95%, resampling documents. The same answer text: "
        f"{same} of {len(probes)}.",
        "",
        table(["generator", "accuracy", "s per answer (warm)"], rows),
    ])
    print(body)
    if args.write:
        write_section(SECTION, body)
        log("wrote BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
