"""The source floor (Settings.source_floor): which memories `ask` cites, before and after leaving out those whose
cosine similarity to the question is below the floor.

One home per set and split learns half of the split's documents (by article / document: the "known" half); every
probe of the split is asked, so half the questions have their answer in memory and half have nothing there (as a
user asking about what was never learned). For each floor of a grid, `ask`'s own retrieval (MemoryLLM.retrieve with
that floor, top_k 4) gives the sources, and:

  recall@3       a known question's right document among its first 3 sources
  irrelevant     the share of all sources cited that are not from the question's document
  none_unknown   the share of questions about unlearned documents that get no source at all
  sources        the mean number of sources of a known question

The floor is chosen on the tuning splits (the largest whose pooled recall@3 is within 0.01 of no floor) and reported
on the held-out splits with 95% intervals from resampling documents. Sets and splits as bench_served.py:
SQuAD articles by sha1(title) parity, Fictional Knowledge documents 0-59 tune and 60-129 are held out.

    MLLM_CACHE=/tmp/mcache .venv/bin/python scripts/bench_sources.py [--write]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchmd import command_line, log, machine, table, today, write_section  # noqa: E402
from bench_served import FK_TUNING, fk_split, squad_split  # noqa: E402

FLOORS = [0.0, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5]
RECALL_SLACK = 0.01  # the chosen floor may cost at most this much pooled recall@3 on the tuning splits


def article(doc: dict) -> str:
    return doc.get("title") or doc["id"]


def run_split(embedder, set_name: str, split: str, work: Path) -> list[dict]:
    """Every probe of the split with, per floor, the documents of its sources (known half learned)."""
    from memory_llm import MemoryLLM

    docs, probes = squad_split(split, 10 ** 6) if set_name == "squad" else \
        fk_split(split, FK_TUNING if split == "tuning" else 130 - FK_TUNING, work)
    known_articles = sorted({article(d) for d in docs})[::2]
    known = {d["id"] for d in docs if article(d) in known_articles}
    m = MemoryLLM(work / f"home-{set_name}-{split}", embedder=embedder)
    for d in docs:
        if d["id"] in known:
            m.learn(text=d["text"], source=d["id"])
    questions = [p["input"] for p in probes]
    vectors = embedder.encode(questions)
    doc_of = {}  # memory id → document id
    rows = []
    for p, vector in zip(probes, vectors):
        row = {"doc": p["tags"][0], "known": p["tags"][0] in known, "cited": {}}
        for floor in FLOORS:
            hits = m.retrieve([p["input"]], None, "default", vectors=lambda v=vector: v[None, :], floor=floor)
            for h in hits:
                doc_of[h.memory.id] = h.memory.source
            row["cited"][floor] = [doc_of[h.memory.id] for h in hits]
        rows.append(row)
    m.close()
    log(f"{set_name} {split}: {len(docs)} documents ({len(known)} learned), {len(rows)} probes")
    return rows


def metrics(rows: list[dict], floor: float) -> dict:
    known = [r for r in rows if r["known"]]
    unknown = [r for r in rows if not r["known"]]
    cited = [d for r in rows for d in r["cited"][floor]]
    wrong = sum(d != r["doc"] for r in rows for d in r["cited"][floor])
    return {"recall@3": sum(r["doc"] in r["cited"][floor][:3] for r in known) / max(len(known), 1),
            "irrelevant": wrong / max(len(cited), 1),
            "none_unknown": sum(not r["cited"][floor] for r in unknown) / max(len(unknown), 1),
            "sources": sum(len(r["cited"][floor]) for r in known) / max(len(known), 1)}


def interval(rows: list[dict], floor: float, draws: int = 1000, seed: int = 0) -> dict:
    """Each metric with a 95% interval from resampling documents."""
    rng = random.Random(seed)
    by_doc: dict[str, list[dict]] = {}
    for r in rows:
        by_doc.setdefault(r["doc"], []).append(r)
    keys = sorted(by_doc)
    point = metrics(rows, floor)
    samples = [metrics([r for k in (rng.choice(keys) for _ in keys) for r in by_doc[k]], floor) for _ in range(draws)]
    out = {}
    for name, value in point.items():
        vals = sorted(s[name] for s in samples)
        out[name] = (value, vals[int(0.025 * draws)], vals[int(0.975 * draws) - 1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="replace the section in BENCHMARKS.md")
    args = ap.parse_args()
    from memory_llm.config import DEFAULT_EMBEDDER
    from memory_llm.embed import SentenceEmbedder

    embedder = SentenceEmbedder(DEFAULT_EMBEDDER)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {(s, sp): run_split(embedder, s, sp, Path(tmp)) for s in ("squad", "fk") for sp in ("tuning", "heldout")}
    tuning = runs[("squad", "tuning")] + runs[("fk", "tuning")]
    base = metrics(tuning, 0.0)["recall@3"]
    chosen = max(f for f in FLOORS if metrics(tuning, f)["recall@3"] >= base - RECALL_SLACK)
    sweep = [[f"{f:g}"] + [f"{metrics(tuning, f)[k]:.3f}" for k in ("recall@3", "irrelevant", "none_unknown", "sources")]
             for f in FLOORS]
    rows = []
    for s in ("squad", "fk"):
        held = runs[(s, "heldout")]
        for f in (0.0, chosen):
            ci = interval(held, f)
            rows.append([s, f"{f:g}", len(held)] + [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in ci.values()])
    heads = ["set (held-out)", "floor", "probes", "recall@3", "irrelevant sources", "unknown: no source",
             "sources per known question"]
    body = (f"Measured {today()} on {machine()}: `{command_line()}`. Half of each split's documents learned; every"
            " probe asked (half about unlearned documents). Floor chosen on the tuning splits: the largest whose"
            f" pooled recall@3 stays within {RECALL_SLACK} of no floor (**{chosen:g}**); held-out figures with 95%"
            " intervals over documents.\n\n" + table(heads, rows) + "\n\nTuning sweep (SQuAD + FK tuning splits pooled):\n\n"
            + table(["floor", "recall@3", "irrelevant", "unknown: no source", "sources"], sweep))
    print(body)
    if args.write:
        write_section("Source floor: relevant sources only", body)


if __name__ == "__main__":
    main()
