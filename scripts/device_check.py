"""The GPU check: one short run on a CUDA machine that prints one table (≤ 8 minutes on one GPU).

    .venv/bin/python scripts/device_check.py                 # CUDA, the offline default models
    python3 scripts/device_check.py --random-weights .device  # models of the defaults' shapes, random weights
    .venv/bin/python scripts/device_check.py --cpu --quick    # the same steps on CPU (a rehearsal of the script)

Steps: CUDA and bf16 support; the model loaded in bf16 on the GPU; `learn` the sample and `ask` it (first and
warm); a 2-document consolidation with training tokens/s and the precision it trained in; FAISS search on the GPU
when faiss-gpu is installed (versus the CPU index on the same vectors).

A machine that cannot fetch the default models (no network, and the defaults' weights are larger than what can be
carried) runs with `--random-weights DIR`: DIR holds the defaults' configs and tokenizers (`scripts/device_bundle.sh`
writes it); the models are built from the configs with random weights, so speeds and memory are the real
architecture's while answers are noise (the consolidation gate may then reject; its tokens/s still count).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTION = "When did the Larkspur Observatory open, and who founded it?"
TWO_DOCUMENTS = ("larkspur_observatory.md", "orrin_notes.txt")


def random_models(bundle: Path, work: Path, dtype) -> tuple[str, str]:
    """Directories of the defaults' shapes with random weights, from the configs and tokenizers in `bundle`."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    torch.manual_seed(0)
    lm, emb = work / "lm", work / "embedder"
    shutil.copytree(bundle / "lm", lm)
    shutil.copytree(bundle / "embedder", emb)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(lm)).to(dtype).save_pretrained(lm)
    AutoModel.from_config(AutoConfig.from_pretrained(emb)).save_pretrained(emb)
    return str(lm), str(emb)


def faiss_rows(n: int, dim: int = 384, queries: int = 200) -> list[tuple[str, str]]:
    """Flat inner-product search of `queries` vectors over n random ones: GPU (if faiss-gpu) vs CPU, p50 ms."""
    import numpy as np

    try:
        import faiss
    except ImportError:
        return [("faiss", "not installed")]
    rng = np.random.default_rng(0)
    base = rng.standard_normal((n, dim), dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    q = base[rng.choice(n, queries, replace=False)]

    def p50(index) -> float:
        index.add(base)
        times = []
        for row in q:
            t = time.perf_counter()
            index.search(row[None], 10)
            times.append((time.perf_counter() - t) * 1000)
        return float(np.median(times))

    cpu = p50(faiss.IndexFlatIP(dim))
    rows = [(f"faiss CPU flat, {n:,} × {dim}: search p50", f"{cpu:.2f} ms")]
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        rows.append(("faiss GPU", "faiss-gpu not installed (faiss-cpu only)"))
        return rows
    res = faiss.StandardGpuResources()
    gpu = p50(faiss.index_cpu_to_gpu(res, 0, faiss.IndexFlatIP(dim)))
    rows.append(("faiss GPU flat, same vectors: search p50", f"{gpu:.2f} ms ({cpu / gpu:.1f}× CPU)"))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run on CPU (a rehearsal; the figures are not the GPU's)")
    ap.add_argument("--random-weights", type=Path, metavar="DIR", help="models of the defaults' shapes from DIR")
    ap.add_argument("--quick", action="store_true", help="a shorter consolidation (2 minutes at most)")
    ap.add_argument("--faiss-n", type=int, default=100_000, help="vectors in the FAISS search check")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = ap.parse_args()

    import torch

    from memory_llm import MemoryLLM
    from memory_llm.config import Settings
    from memory_llm.consolidate.recipe import Recipe

    rows: list[tuple[str, str]] = []
    started = time.time()
    cuda = torch.cuda.is_available()
    rows.append(("torch / CUDA", f"{torch.__version__} / {torch.version.cuda or '-'}"))
    if not cuda and not args.cpu:
        print("device_check: no CUDA device is visible (pass --cpu to rehearse the script on CPU)", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda":
        rows.append(("GPU", f"{torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}"))
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32

    with tempfile.TemporaryDirectory(prefix="mllm-device-") as tmp:
        work = Path(tmp)
        names = {}
        if args.random_weights:
            t = time.time()
            names["model"], names["embedder"] = random_models(args.random_weights, work / "models", dtype)
            rows.append(("models", f"random weights of the defaults' shapes ({time.time() - t:.1f} s to build)"))
            names["dedup_threshold"] = 1.0  # a random embedder finds every chunk a near-duplicate of the first
        settings = Settings.load(work / "home", device=device, cache_dir=work / "cache" if args.random_weights
                                 else None, **names)

        t = time.time()
        m = MemoryLLM(work / "home", settings=settings)
        model = m.generator.model
        param = next(model.parameters())
        rows.append(("model load", f"{time.time() - t:.1f} s, {param.dtype} on {param.device}"))

        t = time.time()
        m.learn([ROOT / "data" / "sample"])
        rows.append(("learn data/sample", f"{time.time() - t:.1f} s, {m.stats()['memories']} memories"))
        t = time.time()
        answer = m.ask(QUESTION, max_new_tokens=48)
        first = time.time() - t
        t = time.time()
        answer = m.ask(QUESTION, max_new_tokens=48)
        rows.append(("ask (48 tokens at most)", f"first {first:.2f} s, warm {time.time() - t:.2f} s, "
                     f"{len(answer.sources)} sources"))
        rows.append(("answer", " ".join(answer.text.split())[:70] or "(empty)"))
        if device == "cuda":
            rows.append(("GPU memory after ask", f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB peak"))
        m.close()

        home2 = work / "home2"
        m2 = MemoryLLM(home2, settings=Settings.load(home2, device=device, cache_dir=settings.cache_dir, **names),
                       generator=m.generator)  # the same loaded model (the first home has no adapter)
        m2.learn([ROOT / "data" / "sample" / name for name in TWO_DOCUMENTS])
        t = time.time()
        summary = m2.consolidate(max_minutes=2 if args.quick else 5, recipe=Recipe())
        training = summary.training or {}
        rows.append(("consolidate 2 documents", f"{summary.status} in {time.time() - t:.0f} s; "
                     f"{summary.items} items, {training.get('steps', 0)} steps"))
        rows.append(("training speed", f"{training.get('tokens_per_s', 0)} tokens/s, "
                     f"precision {training.get('precision', '?')}"))
        if summary.metrics:
            rows.append(("gate metrics", ", ".join(f"{k} {v:.3f}" for k, v in summary.metrics.items()
                                                   if isinstance(v, (int, float)))[:90]))
        m2.close()

    rows += faiss_rows(args.faiss_n)
    rows.append(("total", f"{time.time() - started:.0f} s"))
    width = max(len(k) for k, _ in rows)
    print(f"| {'check'.ljust(width)} | result |\n| {'-' * width} | --- |")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    if args.json:
        print(json.dumps(dict(rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
