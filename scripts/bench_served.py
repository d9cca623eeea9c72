"""What `ask` serves after a consolidation, on questions asked as users ask them (issue 18's targets).

One run: learn a split's documents, measure base / rag / the passage-in-context reference, consolidate once
(the shipped recipe, open floors so the candidate is measured either way; the default gate's verdict reported),
then closed-book (adapter, no retrieval) and served (`eval --mode served`: exactly `ask`'s path), the general
probes before and after, `ask` latency (rag before, served after, same questions), and the retrieval skip.
Intervals: 95% bootstrap over documents (cluster resampling), 2,000 draws.

Sets (split by article / document; the held-out part is only measured on):
  squad  ../shared/data/squad_knowledge: articles whose sha1(title) is even are held out, the others tune
  fk     ../shared/data/fictional_knowledge, in `ask`'s chat form: documents 0-59 tune, 60-129 are held out

    MLLM_CACHE=/tmp/mcache .venv/bin/python scripts/bench_served.py --set squad --split heldout --n 40 --seed 0
    (--json-out FILE keeps every figure; --n 5 --split tuning for a quick look)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchmd import command_line, machine, today  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SQUAD = ROOT.parent / "shared" / "data" / "squad_knowledge"
FK_TUNING = 60  # FK documents [0, 60) tune, [60, 130) are held out
SKIP_AT = (("skip_retrieval_similarity", 0.8), ("skip_retrieval_similarity", 0.9),  # the retrieval skip's
           ("skip_retrieval_confidence", 0.8), ("skip_retrieval_confidence", 0.9))  # settings measured


def squad_split(split: str, n: int) -> tuple[list[dict], list[dict]]:
    """The first n passages of the split (articles by sha1 parity) and their probes."""
    passages = [json.loads(l) for l in (SQUAD / "passages.jsonl").read_text(encoding="utf-8").splitlines() if l]
    held = [p for p in passages if (int(hashlib.sha1(p["title"].encode()).hexdigest(), 16) % 2 == 0)
            == (split == "heldout")][:n]
    ids = {p["id"] for p in held}
    probes = [json.loads(l) for l in (SQUAD / "probes.jsonl").read_text(encoding="utf-8").splitlines() if l]
    return held, [p for p in probes if p["tags"][0] in ids]


def fk_split(split: str, n: int, work: Path) -> tuple[list[dict], list[dict]]:
    """FK documents of the split as passages, their probes in `ask`'s chat form (tag 0: the document)."""
    from prepare_fictional_knowledge import prepare

    made = prepare(n, FK_TUNING if split == "heldout" else 0, work / "fk")
    docs = [{"id": f.stem, "title": f.stem, "text": f.read_text(encoding="utf-8").strip()} for f in made["doc_files"]]
    probes = []
    for line in Path(made["eval_chat"]).read_text(encoding="utf-8").splitlines():
        p = json.loads(line)
        doc = next(t[4:] for t in p["tags"] if t.startswith("doc:"))
        p["tags"] = [doc] + [t for t in p["tags"] if not t.startswith("doc:")]
        probes.append(p)
    return docs, probes


def passage_reference(m, probes: list[dict], passages: dict[str, str]) -> list[bool]:
    """The base model reading the right passage as the only source (`ask`'s prompt): the reading limit."""
    from memory_llm.evaluate import is_correct
    from memory_llm.generate import build_messages

    gen = m.generator
    out = []
    with m.served.base_context():
        for b in range(0, len(probes), 8):
            batch = probes[b:b + 8]
            ids = [gen.chat_ids(build_messages(p["input"], [passages[p["tags"][0]]]))[0].tolist() for p in batch]
            texts = gen.generate_batch(ids, 64)
            out += [is_correct(t, p["answers"]) for t, p in zip(texts, batch)]
    return out


def bootstrap(correct: dict[str, list[bool]], docs: list[str], draws: int = 2000, seed: int = 0,
              derived=None) -> dict:
    """Accuracy per mode, (served − rag), (served − max(rag, closed)) and gain recovered, each with a 95% interval
    from resampling documents. `derived(acc)` adds figures of the caller's own (e.g. a difference of two modes)."""
    rng = random.Random(seed)
    by_doc: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        by_doc.setdefault(d, []).append(i)
    keys = sorted(by_doc)

    def stats(idx: list[int]) -> dict:
        acc = {k: sum(v[i] for i in idx) / len(idx) for k, v in correct.items()}
        out = dict(acc)
        if {"rag", "served"} <= acc.keys():
            out["served-rag"] = acc["served"] - acc["rag"]
        for key in [k for k in acc if k.startswith("skip_")]:
            out[f"{key}-rag"] = acc[key] - acc["rag"]
        if {"rag", "served", "closed"} <= acc.keys():
            out["served-max"] = acc["served"] - max(acc["rag"], acc["closed"])
        if {"rag", "closed", "base"} <= acc.keys():
            out["gain"] = (acc["closed"] - acc["base"]) / (acc["rag"] - acc["base"]) \
                if acc["rag"] != acc["base"] else float("nan")
        return {**out, **(derived(acc) if derived else {})}

    point = stats(list(range(len(docs))))
    samples = [stats([i for k in (rng.choice(keys) for _ in keys) for i in by_doc[k]]) for _ in range(draws)]
    result = {}
    for name, value in point.items():
        vals = sorted(s[name] for s in samples if s[name] == s[name])
        lo, hi = vals[int(0.025 * len(vals))], vals[int(0.975 * len(vals)) - 1]
        result[name] = {"value": round(value, 4), "lo": round(lo, 4), "hi": round(hi, 4)}
    return result


def latency(m, questions: list[str]) -> dict:
    """Median first-token and total seconds of `ask` (no answer log) over the questions, after one warm-up."""
    m.ask(questions[0], log=False, max_new_tokens=32)
    first, total = [], []
    for q in questions:
        a = m.ask(q, log=False, max_new_tokens=32)
        first.append(a.timings["first_token"])
        total.append(a.timings["total"])
    return {"first_token": round(statistics.median(first), 3), "total": round(statistics.median(total), 3),
            "n": len(questions)}


def oracle_items(m, recipe, probes: list[dict]) -> None:
    """The items the recipe synthesizes plus, as trained qa items, every probe's question with its first gold
    answer, on the memory of its document that holds the answer (else the document's first): perfect question
    coverage, the ceiling of "train in the form questions arrive". Stored before the round, which reuses them."""
    from memory_llm.consolidate.synth import Item, synthesize

    memories = m.store.get(m.store.memory_ids())
    by_doc: dict[str, list] = {}
    for mem in sorted(memories.values(), key=lambda x: x.id):
        by_doc.setdefault(mem.source.split(":")[1], []).append(mem)
    gen = m.new_generator()
    made = synthesize(gen, list(memories.values()), rewrites=recipe.rewrites, questions=recipe.questions,
                      seed=recipe.seed, cuts=recipe.cloze_cuts, answer_words=recipe.cloze_answer_words,
                      held_out_rewrite=recipe.held_out_rewrite, sentence_questions=recipe.sentence_questions,
                      sentence_answers=recipe.sentence_answers)
    for p in probes:
        mems = by_doc[p["tags"][0]]
        gold = ", ".join(group[0] for group in p["answers"])
        home = next((x for x in mems if p["answers"][0][0].lower() in x.text.lower()), mems[0])
        made[home.id].append(Item(home.id, "qa", p["input"], gold))
    for mid, items in made.items():
        m.store.add_items(mid, memories[mid].namespace, items)
    print(f"oracle: {len(probes)} gold questions added to the synthesized items", flush=True)
    del gen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=("squad", "fk"), default="squad")
    ap.add_argument("--split", choices=("tuning", "heldout"), default="heldout")
    ap.add_argument("--n", type=int, default=40, help="documents (passages) to learn and consolidate")
    ap.add_argument("--seed", type=int, default=0, help="the recipe's seed")
    ap.add_argument("--recipe", default="{}", help="Recipe overrides as a JSON object")
    ap.add_argument("--json-out", help="write every figure here")
    ap.add_argument("--adapter-with-sources", action="store_true", help="serve with adapter_with_sources on")
    ap.add_argument("--quick", action="store_true", help="no general probes with retrieval, no latency")
    ap.add_argument("--oracle", action="store_true",
                    help="a ceiling, not a result: also train on the split's own questions with their gold answers")
    args = ap.parse_args()

    from memory_llm import MemoryLLM
    from memory_llm.consolidate.gate import Floors, decide
    from memory_llm.consolidate.recipe import Recipe
    from memory_llm.evaluate import lost

    work = Path(tempfile.mkdtemp(prefix="bench-served-"))
    docs, probes = squad_split(args.split, args.n) if args.set == "squad" else fk_split(args.split, args.n, work)
    eval_file = work / "eval.jsonl"
    eval_file.write_text("\n".join(json.dumps(p) for p in probes) + "\n", encoding="utf-8")
    general = ROOT / "data" / "general_probes.jsonl"
    recipe = Recipe.from_dict({**json.loads(args.recipe), "seed": args.seed})
    m = MemoryLLM(work / "home", adapter_with_sources=args.adapter_with_sources)
    t = time.time()
    for d in docs:
        m.learn(text=d["text"], source=f"{args.set}:{d['id']}:{d['title']}")
    print(f"learned {len(docs)} documents in {time.time() - t:.0f}s; {len(probes)} probes", flush=True)
    if args.oracle:
        oracle_items(m, recipe, probes)

    correct, results = {}, {}
    for mode in ("base", "rag"):
        results[mode] = m.evaluate(eval_file, mode)
        correct[mode] = [p["correct"] for p in results[mode]["probes"]]
        print(mode, round(results[mode]["accuracy"], 3), flush=True)
    correct["passage"] = passage_reference(m, probes, {d["id"]: d["text"] for d in docs})
    general_before = m.evaluate(general, "base")
    general_rag = None if args.quick else m.evaluate(general, "rag")
    rag_latency = None if args.quick else latency(m, [p["input"] for p in probes[:6]])

    t = time.time()
    summary = m.consolidate(recipe=recipe, floors=Floors(0.0, 0.0, 0.0, 1.0),
                            progress=lambda phase, done, total: print(f"  {phase} {done}/{total} "
                                                                      f"{time.time() - t:.0f}s", flush=True))
    round_s = time.time() - t
    verdict = decide(summary.metrics, None, Floors()) if summary.metrics else (False, [summary.message])
    print(json.dumps(summary.as_dict()), flush=True)
    for mode in ("closed", "served"):
        results[mode] = m.evaluate(eval_file, mode)
        correct[mode] = [p["correct"] for p in results[mode]["probes"]]
        print(mode, round(results[mode]["accuracy"], 3), results[mode].get("paths"), flush=True)
    general_closed = m.evaluate(general, "closed")
    general_served = None if args.quick else m.evaluate(general, "served")
    served_latency = None if args.quick else latency(m, [p["input"] for p in probes[:6]])

    # the retrieval skip, each setting alone, without generating again: a skipped question gets exactly closed
    # mode's prompt and routing, so its answer is the closed one, and the others rag's (sources → base model);
    # which questions skip is what `ask` decides (similarity, router, the adapter's confidence)
    skip = {}
    shipped = {setting: getattr(m.settings, setting) for setting, _ in SKIP_AT}
    for setting, at in SKIP_AT:
        for name in shipped:
            setattr(m.settings, name, 0.0)  # each setting measured alone
        setattr(m.settings, setting, at)
        chosen, saved = [], []
        for i, p in enumerate(probes):
            prepared = m.answerer.prepare(p["input"], k=None, namespace="default", use_memory=True)
            if prepared[-1] is not None:
                chosen.append(i)
                setattr(m.settings, setting, 0.0)
                full = m.answerer.prepare(p["input"], k=None, namespace="default", use_memory=True)[3]["prompt_tokens"]
                setattr(m.settings, setting, at)
                saved.append(full - prepared[3]["prompt_tokens"])
        with_skip = [c if i in chosen else r for i, (c, r) in enumerate(zip(correct["closed"], correct["rag"]))]
        correct[f"{setting}={at}"] = with_skip
        skip[f"{setting}={at}"] = {
            "skipped": len(chosen), "n": len(probes),
            "accuracy_on_skipped": sum(correct["closed"][i] for i in chosen) / len(chosen) if chosen else None,
            "rag_accuracy_on_them": sum(correct["rag"][i] for i in chosen) / len(chosen) if chosen else None,
            "accuracy_with_skip": sum(with_skip) / len(probes),
            "prompt_tokens_saved_median": statistics.median(saved) if saved else None}
        print("skip", setting, at, skip[f"{setting}={at}"], flush=True)
    for name, value in shipped.items():
        setattr(m.settings, name, value)

    doc_of = [p["tags"][0] for p in probes]
    ci = bootstrap(correct, doc_of, seed=args.seed)
    out = {"set": args.set, "split": args.split, "n_docs": len(docs), "n_probes": len(probes), "seed": args.seed,
           "date": today(), "machine": machine(), "command": command_line(), "recipe": recipe.as_dict(),
           "summary": summary.as_dict(), "default_gate": verdict, "round_minutes": round(round_s / 60, 2),
           "ci": ci, "paths": results["served"].get("paths"),
           "general": {"n": general_before["n"], "base": general_before["accuracy"],
                       "closed": general_closed["accuracy"], "lost_closed": lost(general_before, general_closed),
                       **({"served": general_served["accuracy"], "rag": general_rag["accuracy"],
                           "lost_served_vs_rag": lost(general_rag, general_served)} if general_served else {})},
           "latency": {"rag": rag_latency, "served": served_latency}, "skip": skip}
    print(json.dumps(out, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
