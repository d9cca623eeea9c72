#!/usr/bin/env python
"""Does the prompt library help? Fictional Knowledge, rag accuracy with the default template vs with exemplars
from 20 rated answers.

The FK probes are sentence prefixes (cloze); here they are asked as questions ("Complete the sentence: <prefix>",
kind qa, so they go through the chat template and the prompt library, as `ask` does). In a fresh home that
learned --n records:
  1. rate: ask --rated questions (the first `mem` probes of the records) with the default template, no exemplars;
     rate each answer as a user would: `feedback --good` when it contains the target, else
     `feedback --correct "<prefix> <target>"` (the correction is also learned as a memory);
  2. evaluate the `gen` and `hard_gen` probes of the same records (other wordings of the same facts, never rated):
     (a) before any feedback: default template, no exemplars;
     (b) after feedback, without exemplars (what the corrections added to memory alone);
     (c) after feedback, with exemplars (the prompt library: the most similar good exemplars as few-shot turns).
Greedy, --new-tokens (24) per answer; correct = the target occurs in the answer.

    MLLM_CACHE=/tmp/mcache .venv/bin/python scripts/bench_prompts.py --n 5 --write
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchmd import command_line, machine, table, today, write_section  # noqa: E402
from prepare_fictional_knowledge import prepare  # noqa: E402

SECTION = "Prompt library: Fictional Knowledge rag accuracy, default template vs exemplars from rated answers"


def as_question(prefix: str) -> str:
    return f"Complete the sentence: {prefix}"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5, help="FK records learned and evaluated (default 5)")
    ap.add_argument("--rated", type=int, default=20, help="answers rated before the comparison (default 20)")
    ap.add_argument("--new-tokens", type=int, default=24, help="tokens generated per answer (default 24)")
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLLM_CACHE", "/tmp/mcache")
    from memory_llm import MemoryLLM

    with tempfile.TemporaryDirectory(prefix="mllm-bench-prompts-") as tmp:
        tmp = Path(tmp)
        paths = prepare(args.n, 0, tmp / "data")
        probes = [json.loads(line) for line in paths["eval"].read_text().splitlines() if line.strip()]
        mem = [p for p in probes if "mem" in p["tags"]]
        per_doc = max(1, -(-args.rated // args.n))
        rated = [p for i, p in enumerate(mem) if int(p["id"].rsplit("-", 1)[1]) < per_doc][:args.rated]
        held = [{**p, "kind": "qa", "input": as_question(p["input"])} for p in probes
                if "gen" in p["tags"] or "hard_gen" in p["tags"]]
        eval_file = tmp / "held_out_qa.jsonl"
        eval_file.write_text("\n".join(json.dumps(p) for p in held) + "\n")

        m = MemoryLLM(tmp / "home")
        report = m.learn([paths["docs"]])
        log(f"learned {report.files} docs ({report.chunks_added} chunks); {len(rated)} to rate, {len(held)} held out")
        results = {}

        def evaluate(exemplars: bool) -> dict:
            return m.evaluate(eval_file, "rag", prompt="default", exemplars=exemplars, qa_new_tokens=args.new_tokens)

        results["a"] = evaluate(False)
        log(f"(a) before feedback: {results['a']['accuracy']:.3f}")

        good = corrected = 0
        t0 = time.perf_counter()
        for p in rated:
            target = p["answers"][0][0]
            answer = m.ask(as_question(p["input"]), prompt="default", exemplars=False,
                           max_new_tokens=args.new_tokens)
            if target.lower() in answer.text.lower():
                m.feedback(answer.id, good=True)
                good += 1
            else:
                m.feedback(answer.id, correction=f"{p['input']} {target}")
                corrected += 1
        rate_s = time.perf_counter() - t0
        log(f"rated {len(rated)}: {good} good, {corrected} corrected ({rate_s:.0f} s)")

        results["b"] = evaluate(False)
        log(f"(b) after feedback, no exemplars: {results['b']['accuracy']:.3f}")
        results["c"] = evaluate(True)
        log(f"(c) after feedback, with exemplars: {results['c']['accuracy']:.3f}")
        pairs = list(zip(results["a"]["probes"], results["c"]["probes"]))
        changed = sum(x["output"] != y["output"] for x, y in pairs)
        gained = sum(y["correct"] and not x["correct"] for x, y in pairs)
        lost = sum(x["correct"] and not y["correct"] for x, y in pairs)
        used = []
        for p in held:
            choice = m.prompts.choose(lambda q=p["input"]: m.embed_texts([q])[0], "default", "default", True,
                                      m.generator.count_tokens)
            used.append(len(choice.exemplars))
        s = m.settings
        m.close()

    def row(label: str, r: dict) -> list:
        tags = r["by_tag"]
        return [label, f"{r['accuracy']:.3f}", f"{tags.get('gen', 0):.3f}", f"{tags.get('hard_gen', 0):.3f}",
                f"{r['seconds']:.0f}"]

    rows = [row("(a) default template, before feedback", results["a"]),
            row("(b) after feedback, no exemplars (corrections as memories only)", results["b"]),
            row("(c) after feedback, with exemplars (prompt library)", results["c"])]
    a, b, c = (results[k]["accuracy"] for k in "abc")
    load = os.getloadavg()
    body = "\n".join([
        f"Command: `MLLM_CACHE=<cache> {command_line()}`  ",
        f"Date: {today()}. Machine: {machine()}, shared (load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
        " while measuring: another engineer's training run).  ",
        f"Data: Fictional Knowledge, the first {args.n} records learned ({report.chunks_added} chunks). Rated: "
        f"{len(rated)} answers to `mem` probes asked as \"Complete the sentence: <prefix>\" with the default "
        f"template — {good} rated good (became exemplars), {corrected} corrected (correction = prefix + target; "
        "learned as a memory and kept as an exemplar rated 2). Held out: the "
        f"{len(held)} `gen` and `hard_gen` probes of the same records (other wordings of the same facts), asked the "
        f"same way, never rated. Greedy, {args.new_tokens} new tokens, correct = the target occurs in the answer.  ",
        f"Settings: model {s.model}, embedder {s.embedder}, top_k {s.top_k}, exemplar_k {s.exemplar_k}, "
        f"exemplar_tokens {s.exemplar_tokens}, exemplar_min_similarity {s.exemplar_min_similarity}; exemplars "
        f"used per held-out question in (c): median {sorted(used)[len(used) // 2]}, max {max(used)}.",
        "",
        table(["rag accuracy on held-out probes", "all", "gen", "hard_gen", "eval s"], rows),
        "",
        f"Does the prompt library help? With exemplars vs the default template before feedback: "
        f"{c - a:+.3f} ({c:.3f} vs {a:.3f}); the exemplars' own share (c − b): {c - b:+.3f}; the corrections "
        f"learned as memories (b − a): {b - a:+.3f}. {len(held)} probes: one probe is {1 / len(held):.3f}. "
        f"Outputs that differ between (a) and (c): {changed} of {len(held)}; probes gained {gained}, lost {lost}.",
    ])
    print(body)
    if args.write:
        write_section(SECTION, body)
        log("wrote BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
