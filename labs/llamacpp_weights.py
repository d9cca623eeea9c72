#!/usr/bin/env python
"""Which weights llama.cpp should run on this CPU: the shipped Q4_1 GGUF beside its re-encodings (bf16, f16, q8_0,
q4_0 via llama_model_quantize), reading `ask`'s prompt for the sample question (prefill) and decoding greedy tokens.

A home learns data/sample; the prompt is `ask`'s own (MemoryLLM.answerer.prepare). For each file, in a fresh
Llama with flash attention (as generate_llamacpp loads it): prefill = one eval of the prompt, median of --runs;
decode = ms per token over 32 greedy tokens after the first. Settings.llamacpp_weights ("auto": bf16 where the CPU
multiplies it natively, else f16) was chosen from this table (docs/lab-notes.md, session 21).

    MLLM_CACHE=/tmp/mcache .venv/bin/python labs/llamacpp_weights.py [--runs 3]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from _benchmd import machine, table  # noqa: E402

QUESTION = "When did the Larkspur Observatory open, and who founded it?"
KINDS = {"bf16": "LLAMA_FTYPE_MOSTLY_BF16", "f16": "LLAMA_FTYPE_MOSTLY_F16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
         "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    import llama_cpp

    from memory_llm import MemoryLLM
    from memory_llm.config import DEFAULT_NAMESPACE
    from memory_llm.models import resolve_model

    with tempfile.TemporaryDirectory() as tmp:
        m = MemoryLLM(Path(tmp) / "home", quick_start=True)
        m.learn([ROOT / "data" / "sample"])
        tokens = [int(t) for t in m.answerer.prepare(QUESTION, k=None, namespace=DEFAULT_NAMESPACE,
                                                     use_memory=True).ids[0]]
        m.close()
        directory, name = resolve_model("smollm2")
        files = {"shipped (Q4_1)": Path(directory) / name}
        for kind, ftype in KINDS.items():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.allow_requantize = getattr(llama_cpp, ftype), True
            out = Path(tmp) / f"{kind}.gguf"
            if llama_cpp.llama_model_quantize(str(files["shipped (Q4_1)"]).encode(), str(out).encode(),
                                              ctypes.byref(params)) == 0:
                files[kind] = out
        rows = []
        for kind, path in files.items():
            llm = llama_cpp.Llama(str(path), n_ctx=4096, n_threads=2, flash_attn=True, verbose=False)
            prefill = []
            for _ in range(args.runs):
                llm.reset()
                t0 = time.perf_counter()
                llm.eval(tokens)
                prefill.append(time.perf_counter() - t0)
            llm.reset()
            made, first = [], None
            for token in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
                made.append(token)
                first = first or time.perf_counter()
                if len(made) > 32:
                    break
            decode_ms = (time.perf_counter() - first) / 32 * 1000
            text = llm.detokenize(made[:16]).decode("utf-8", "replace").replace("\n", " ")
            rows.append([kind, f"{path.stat().st_size / 1e6:.0f}", f"{statistics.median(prefill):.2f}",
                         f"{decode_ms:.1f}", text])
            del llm
    print(f"{machine()}; prompt {len(tokens)} tokens, prefill median of {args.runs}\n")
    print(table(["weights", "MB", "prefill s", "decode ms/token", "first 16 tokens"], rows))


if __name__ == "__main__":
    main()
