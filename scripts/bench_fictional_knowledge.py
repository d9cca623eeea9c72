"""Fictional Knowledge benchmark: retrieval recall of the right document, and cloze accuracy base / rag /
reference (whole document before the prefix), by probe kind (mem, gen, hard_gen).

Everything runs offline in fresh temporary directories (data, memory home); the converted-model cache is
MLLM_CACHE as usual. With --write, the figures replace the section
"## Fictional Knowledge: retrieval and accuracy" of BENCHMARKS.md (appended when absent).

    MLLM_CACHE=/tmp/mcache .venv/bin/python scripts/bench_fictional_knowledge.py --n 20 --eval-records 10 --write
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_fictional_knowledge import DEFAULT_DATA, PROBE_KINDS, prepare  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Fictional Knowledge: retrieval and accuracy"
README_REFERENCE = {"mem": 0.88, "gen": 0.60, "hard_gen": 0.40}  # the data README, first 10 records
TARGETS = {"recall@3 gen": 0.95, "rag gen": 0.55}  # from the issue
CLOZE_NEW_TOKENS = 12


def probe_doc(probe) -> str:
    """The doc file stem (fk_NNN) a probe belongs to, from its doc: tag."""
    return next(t[4:] for t in probe.tags if t.startswith("doc:"))


def probe_kind(probe) -> str:
    return next(t for t in probe.tags if t in PROBE_KINDS)


def ranked_docs(hits) -> list[str]:
    """Distinct document stems in rank order of the hits."""
    docs: list[str] = []
    for h in hits:
        stem = Path(h.memory.source).stem
        if stem not in docs:
            docs.append(stem)
    return docs


def retrieval_recall(m, probes, fetch: int = 10, ks=(1, 3)) -> dict:
    """recall@k of the probe's document among the first k distinct documents of `fetch` ranked chunks."""
    found: dict[str, dict[int, list[bool]]] = {kind: {k: [] for k in ks} for kind in PROBE_KINDS}
    for p in probes:
        docs = ranked_docs(m.search(p.input, fetch))
        for k in ks:
            found[probe_kind(p)][k].append(probe_doc(p) in docs[:k])
    return {kind: {k: sum(v) / len(v) for k, v in by_k.items() if v} for kind, by_k in found.items()}


def reference_accuracy(m, probes, doc_texts: dict[str, str]) -> dict:
    """The ceiling: the probe's whole document, then the prefix; same generator, greedy, 12 new tokens."""
    from memory_llm import evaluate as ev

    gen = m.generator
    start = time.perf_counter()

    def prompt_ids(p):
        return gen.tokenizer(doc_texts[probe_doc(p)] + "\n\n" + p.input, add_special_tokens=False)["input_ids"]

    outputs = ev.run(probes, prompt_ids, gen.generate_batch, max_new_tokens={"cloze": CLOZE_NEW_TOKENS, "qa": 64})
    result = ev.score(probes, outputs, "reference")
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def write_filtered(src: Path, dst: Path, docs: set[str]) -> int:
    """Copy the probes of the given documents to dst; returns how many."""
    kept = [line for line in src.read_text(encoding="utf-8").splitlines()
            if line.strip() and any(t[4:] in docs for t in json.loads(line)["tags"] if t.startswith("doc:"))]
    dst.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return len(kept)


def run_bench(n: int = 20, eval_records: int = 10, fetch: int = 10, k: int | None = None,
              modes=("base", "rag", "reference"), workdir: str | Path | None = None, log=print,
              data: str | Path = DEFAULT_DATA, **overrides) -> dict:
    """Prepare n records, learn them into a fresh home, measure recall and accuracy. Returns the figures."""
    from memory_llm import MemoryLLM
    from memory_llm import evaluate as ev

    with tempfile.TemporaryDirectory(prefix="mllm-fk-") as tmp:
        tmp = Path(workdir) if workdir else Path(tmp)
        paths = prepare(n, 0, tmp / "data", data)
        m = MemoryLLM(home=tmp / "home", **overrides)
        try:
            t0 = time.perf_counter()
            report = m.learn([paths["docs"]])
            learn_s = time.perf_counter() - t0
            log(f"learned {report.files} docs, {report.chunks_added} chunks in {learn_s:.1f}s")
            probes = ev.load_probes(paths["eval"])
            t0 = time.perf_counter()
            recall = retrieval_recall(m, probes, fetch)
            log(f"retrieval over {len(probes)} probes in {time.perf_counter() - t0:.1f}s: {recall}")

            eval_docs = {Path(f).stem for f in paths["doc_files"][:eval_records]}
            eval_file = tmp / "eval_subset.jsonl"
            n_eval = write_filtered(paths["eval"], eval_file, eval_docs)
            accuracy: dict[str, dict] = {}
            seconds: dict[str, float] = {}
            for mode in modes:
                if mode == "reference":
                    doc_texts = {Path(f).stem: Path(f).read_text(encoding="utf-8").strip()
                                 for f in paths["doc_files"]}
                    res = reference_accuracy(m, ev.load_probes(eval_file), doc_texts)
                else:
                    res = m.evaluate(eval_file, mode, k=k)
                accuracy[mode] = {kind: res["by_tag"].get(kind) for kind in PROBE_KINDS}
                accuracy[mode]["all"] = res["accuracy"]
                seconds[mode] = res["seconds"]
                log(f"{mode}: {accuracy[mode]} ({res['seconds']}s)")
            s = m.settings
            return {"n_docs": report.files, "chunks": report.chunks_added, "learn_seconds": round(learn_s, 1),
                    "probes_retrieval": len(probes), "eval_records": len(eval_docs), "probes_eval": n_eval,
                    "recall": recall, "accuracy": accuracy, "seconds": seconds, "fetch": fetch,
                    "settings": {"top_k": k or s.top_k, "chunk_tokens": s.chunk_tokens,
                                 "chunk_overlap": s.chunk_overlap, "context_tokens": s.context_tokens,
                                 "model": s.model, "embedder": s.embedder}}
        finally:
            m.close()


def _f(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def markdown(r: dict) -> str:
    rows = ["| | mem | gen | hard_gen |", "|---|---|---|---|"]
    for kk in (1, 3):
        rows.append(f"| retrieval recall@{kk} (right document, {r['probes_retrieval'] // 3} probes per kind) | "
                    + " | ".join(_f(r["recall"][kind].get(kk)) for kind in PROBE_KINDS) + " |")
    names = {"base": "base (closed-book)", "rag": f"rag (top_k={r['settings']['top_k']})",
             "reference": "reference (whole document before the prefix)"}
    for mode, acc in r["accuracy"].items():
        rows.append(f"| accuracy: {names.get(mode, mode)} | " + " | ".join(_f(acc[kind]) for kind in PROBE_KINDS)
                    + " |")
    rows.append("| accuracy: README reference (same model, first 10 records) | "
                + " | ".join(_f(README_REFERENCE[kind]) for kind in PROBE_KINDS) + " |")
    return "\n".join(rows)


def section(r: dict, command: str) -> str:
    s = r["settings"]
    gen_r3 = r["recall"]["gen"].get(3)
    rag_gen = r["accuracy"].get("rag", {}).get("gen")
    checks = [f"recall@3 gen {_f(gen_r3)} (target ≥ {TARGETS['recall@3 gen']:.2f}: "
              f"{'met' if gen_r3 is not None and gen_r3 >= TARGETS['recall@3 gen'] else 'NOT met'})"]
    if rag_gen is not None:
        checks.append(f"rag gen {_f(rag_gen)} (target ≥ {TARGETS['rag gen']:.2f}: "
                      f"{'met' if rag_gen >= TARGETS['rag gen'] else 'NOT met'})")
    secs = ", ".join(f"{m} {v:.0f}s" for m, v in r["seconds"].items())
    return "\n".join([
        SECTION, "",
        f"Command: `{command}`  ",
        f"Date: {dt.date.today().isoformat()}. Machine: shared, 2 CPU cores, CPU only "
        f"({platform.machine()}, Python {platform.python_version()}); times are indicative only.  ",
        f"Data: Fictional Knowledge (Chang et al., 2024), first {r['n_docs']} records learned "
        f"({r['chunks']} chunks, {r['learn_seconds']}s); accuracy on the {r['probes_eval']} cloze probes of the first "
        f"{r['eval_records']} records (greedy, {CLOZE_NEW_TOKENS} new tokens, correct = target in the continuation).  ",
        f"Settings: model {s['model']}, embedder {s['embedder']}, chunk_tokens {s['chunk_tokens']}, "
        f"chunk_overlap {s['chunk_overlap']}, top_k {s['top_k']}, context_tokens {s['context_tokens']}. "
        f"Recall: distinct documents in rank order among the top {r['fetch']} chunks.  ",
        f"Eval time: {secs}.", "",
        markdown(r), "",
        "Targets: " + "; ".join(checks) + ".", ""])


def write_benchmarks(text: str, path: Path = REPO / "BENCHMARKS.md") -> None:
    """Replace the section in BENCHMARKS.md (up to the next '## ' heading), or append it; under the shared
    lock of scripts/_benchmd.py, so concurrent benchmark scripts do not clobber each other."""
    from _benchmd import write_section

    body = text.split("\n", 1)[1] if text.startswith(SECTION) else text
    write_section(SECTION[3:], body, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20, help="records (documents) to learn (default 20)")
    ap.add_argument("--eval-records", type=int, default=10,
                    help="accuracy is measured on the probes of the first this many records (default 10)")
    ap.add_argument("--fetch", type=int, default=10, help="chunks fetched to rank documents for recall (default 10)")
    ap.add_argument("--modes", default="base,rag,reference", help="accuracy modes (default base,rag,reference)")
    ap.add_argument("--top-k", type=int, default=None, help="memories retrieved in rag mode (default: the setting)")
    ap.add_argument("--chunk-tokens", type=int, default=None, help="override the chunk_tokens setting")
    ap.add_argument("--chunk-overlap", type=int, default=None, help="override the chunk_overlap setting")
    ap.add_argument("--context-tokens", type=int, default=None, help="override the context_tokens setting")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="the dataset JSON (default: ../shared/data/...)")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    ap.add_argument("--write", action="store_true", help=f"replace/append the section in {REPO / 'BENCHMARKS.md'}")
    args = ap.parse_args(argv)
    overrides = {k: v for k, v in (("chunk_tokens", args.chunk_tokens), ("chunk_overlap", args.chunk_overlap),
                                   ("context_tokens", args.context_tokens)) if v is not None}
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    r = run_bench(args.n, args.eval_records, args.fetch, args.top_k, modes,
                  log=lambda s: print(s, file=sys.stderr), data=args.data, **overrides)
    command = "MLLM_CACHE=<cache> .venv/bin/python scripts/bench_fictional_knowledge.py " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    text = section(r, command.strip())
    print(text)
    if args.json:
        print(json.dumps(r, indent=2))
    if args.write:
        write_benchmarks(text)
        print(f"wrote {REPO / 'BENCHMARKS.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
