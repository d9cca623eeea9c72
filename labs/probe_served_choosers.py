"""Lab probe (issue 18): can the adapter's closed-book answer improve what `ask` serves beside retrieval?

On the work folder bench_served.py leaves (`/tmp/bench-served-*`: eval.jsonl and a consolidated home), per
question: the closed-book answer with the adapter (its recitation of what it holds), the rag answer (base model,
retrieved sources), then where the router let the adapter act

- recite, then answer (MEGa arXiv 2504.21239, RECITE arXiv 2210.01296): the base model reads the recitation as a
  source, first or last beside the retrieved ones, or alone;
- a grounded chooser: serve the closed-book answer when the share of its words (not in the question, no stop
  words) found in the retrieved sources reaches a threshold, rag otherwise.

Prints accuracies against rag and writes every answer to --out. Not part of the product: a diagnostic.

    MLLM_CACHE=/tmp/mcache .venv/bin/python labs/probe_served_choosers.py /tmp/bench-served-XXXX --out F.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from memory_llm import MemoryLLM
from memory_llm.evaluate import is_correct
from memory_llm.generate import build_messages
from memory_llm.retrieve import pack

NEW_TOKENS = 64
STOP = set("the a an of in on at to is are was were be by for with and or as that this it its from which who what "
           "when where how why did does do answer question".split())


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def grounding(answer: str, question: str, sources: list[str]) -> float:
    """The share of the answer's own words (not the question's, no stop words) that the sources hold."""
    new = words(answer) - words(question) - STOP
    return len(new & words(" ".join(sources))) / len(new) if new else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, help="a bench_served.py work folder (eval.jsonl, home/)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--no-recite", action="store_true", help="only the grounded chooser (no recitation reads)")
    args = ap.parse_args()
    probes = [json.loads(line) for line in (args.work / "eval.jsonl").read_text().splitlines() if line]
    m = MemoryLLM(args.work / "home")
    gen = m.generator

    def prompt(question: str, context: list[str]) -> list[int]:
        return gen.chat_ids(build_messages(question, context))[0].tolist()

    def answers(prompts: list[list[int]], base: bool) -> list[tuple[str, bool]]:
        out = []
        for b in range(0, len(prompts), 8):
            if base:
                with m.served.base_context():
                    out += [(t, False) for t in gen.generate_batch(prompts[b:b + 8], NEW_TOKENS)]
            else:
                texts = gen.generate_batch(prompts[b:b + 8], NEW_TOKENS)
                on = list(m.served.router.last_on) if m.served.router is not None else [True] * len(texts)
                out += list(zip(texts, map(bool, on)))
        return out

    closed = answers([prompt(p["input"], []) for p in probes], base=False)
    hits = [[h.memory.text for h in pack(m.retrieve([p["input"]], None, "default"), gen.count_tokens,
                                         m.settings.context_tokens)] for p in probes]
    rag = answers([prompt(p["input"], h) for p, h in zip(probes, hits)], base=True)
    on = [i for i, (_, acted) in enumerate(closed) if acted]
    variants = {} if args.no_recite else {"recite_first": lambda i: [closed[i][0]] + hits[i],
                                          "recite_last": lambda i: hits[i] + [closed[i][0]],
                                          "recite_only": lambda i: [closed[i][0]]}
    read = {name: dict(zip(on, answers([prompt(probes[i]["input"], ctx(i)) for i in on], base=True)))
            for name, ctx in variants.items()}
    rows = []
    for i, p in enumerate(probes):
        row = {"id": p["id"], "on": closed[i][1], "closed": is_correct(closed[i][0], p["answers"]),
               "rag": is_correct(rag[i][0], p["answers"]), "closed_answer": closed[i][0], "rag_answer": rag[i][0],
               "grounding": grounding(closed[i][0], p["input"], hits[i])}
        for name in variants:
            text = read[name][i][0] if i in read[name] else None
            row[name] = is_correct(text, p["answers"]) if text is not None else row["rag"]
            row[name + "_answer"] = text
        rows.append(row)
    args.out.write_text(json.dumps(rows, indent=1))
    n = len(rows)
    print(f"{n} questions, router on {len(on)}; closed {sum(r['closed'] for r in rows) / n:.3f}, rag"
          f" {sum(r['rag'] for r in rows) / n:.3f}, either right {sum(r['closed'] or r['rag'] for r in rows) / n:.3f}")
    for name in variants:
        print(f"{name}: {sum(r[name] for r in rows) / n:.3f}")
    for t in (0.6, 0.8, 1.0):
        pick = [r for r in rows if r["on"] and r["grounding"] >= t]
        acc = sum(r["closed"] if r["on"] and r["grounding"] >= t else r["rag"] for r in rows) / n
        print(f"grounded chooser at {t}: {acc:.3f} ({len(pick)} closed-book answers served, {sum(r['closed'] for r in pick)}"
              f" right where rag was right on {sum(r['rag'] for r in pick)})")


if __name__ == "__main__":
    main()
