"""Facts that change (issue "What is true now"): stale and current answers at each stage, the detector's precision
and recall, and what supersession costs.

Facts: data/updates_facts.jsonl (invented; each a first value, a later one, some a third), arriving as users change
facts: a restated `learn --text` with no key (channel "text"), an edited notes file learned again ("file"), a chat
statement with `remember` ("chat"), a correction of a wrong answer with feedback ("correction"). Each fact is asked
directly and paraphrased, in chat form. Split by fact: tuning and held-out; each split is its own home.

Stages: v1 (the first values learned), v1+c (after a consolidation), v2 (the later values learned, before the next
consolidation), v2+c (after it). In each stage, for rag (retrieval, the base model reading), closed (`--no-memory`:
the adapter alone) and served (exactly `ask`): the stale rate (answers holding an old value) and the current rate
(answers holding the current value), with 95% intervals from resampling facts. Beside them: rag on a home where only
the current values were ever learned (the served target's reference).

Also: the detector on data/supersession_pairs.jsonl at the shipped weights (pair-level precision and recall,
confusions by kind); `learn` with and without supersession checks (documents and short notes, medians of 3, fresh
homes, interleaved); and a consolidation after one fact of an earlier round changes (the stale round retrained)
against a full rebuild of the same home.

    MLLM_CACHE=/tmp/mcache .venv/bin/python scripts/bench_updates.py --write
    (--splits tuning for a quick look; --no-cost / --no-stages for parts; --json-out FILE keeps every figure)
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchmd import command_line, log, machine, table, today, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FACTS = ROOT / "data" / "updates_facts.jsonl"
PAIRS = ROOT / "data" / "supersession_pairs.jsonl"
FK = ROOT.parent / "shared" / "data" / "fictional_knowledge" / "fictional_knowledge.json"
MODES = ("rag", "closed", "served")


# ---- the detector on the labelled pairs -----------------------------------------------------------------------
def pair_candidates(rows: list[dict], similarity) -> list[dict]:
    """Every candidate of every pair with its features and probability, whether it is the labelled stale sentence
    (ok), and one marker row per pair (ok None) so that pairs without a candidate still count."""
    from memory_llm import supersede as S

    out = []
    for r in rows:
        for x in S.candidates(r["old"], r["new"], similarity):
            out.append({"id": r["id"], "label": r["label"], "kind": r["kind"], "probability": x.probability,
                        "ok": r["label"] == "supersedes" and x.sentence == r["old_sentence"], **x.features})
        out.append({"id": r["id"], "label": r["label"], "kind": r["kind"], "ok": None})
    return out


def pair_figures(recs: list[dict], scores, threshold: float) -> dict:
    """Pair-level precision and recall: a pair is found when its stale sentence scores at least the threshold, and
    a false positive when another candidate of a pair does (a distinct pair's, or the wrong sentence of a note);
    "same" pairs (the same value in other words) are left out. Confusions: false positives and misses by kind."""
    labels = {r["id"]: (r["label"], r["kind"]) for r in recs}
    scored = [r for r in recs if r["ok"] is not None and r["label"] != "same"]
    tp = {r["id"] for r, s in zip(scored, scores) if r["ok"] and s >= threshold}
    fp = {r["id"] for r, s in zip(scored, scores) if not r["ok"] and s >= threshold}
    positives = {i for i, (label, _) in labels.items() if label == "supersedes"}
    wrong: dict[str, int] = {}
    for i in fp:
        wrong[labels[i][1]] = wrong.get(labels[i][1], 0) + 1
    missed: dict[str, int] = {}
    for i in positives - tp:
        missed[labels[i][1]] = missed.get(labels[i][1], 0) + 1
    return {"precision": len(tp) / max(len(tp) + len(fp), 1), "recall": len(tp) / max(len(positives), 1),
            "true_positives": len(tp), "false_positives": len(fp), "restatements": len(positives),
            "distinct": sum(label == "distinct" for label, _ in labels.values()),
            "wrong_by_kind": dict(sorted(wrong.items())), "missed_by_kind": dict(sorted(missed.items()))}


def detector(embed) -> dict:
    """The shipped detector's figures on each split of the labelled pairs (and the conflict tier's)."""
    from memory_llm import supersede as S

    rows = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = {}
    for split in ("tuning", "heldout"):
        part = [r for r in rows if r["split"] == split]
        recs = pair_candidates(part, S.pair_similarities(embed))
        scores = [r["probability"] for r in recs if r["ok"] is not None and r["label"] != "same"]
        out[split] = {"pairs": len(part), "supersede": pair_figures(recs, scores, S.PROBABILITY),
                      "conflict": pair_figures(recs, scores, S.CONFLICT_PROBABILITY)}
        log(f"detector {split}: {out[split]['supersede']}")
    return out


# ---- stages ---------------------------------------------------------------------------------------------------
def versions(fact: dict) -> list[str]:
    return [v for v in ("v1", "v2", "v3") if fact.get(v)]


def probes_file(path: Path, facts: list[dict], stage: str) -> Path:
    """Both questions of each fact, their answer the fact's current value (at `stage`)."""
    lines = []
    for f in facts:
        now = "v1" if stage.startswith("v1") else versions(f)[-1]
        for form in ("question", "paraphrase"):
            lines.append(json.dumps({"id": f"{f['id']}:{form}", "kind": "qa", "input": f[form],
                                     "answers": [f["values"][now]], "tags": [f["id"], f["channel"], form]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def stale_of(fact: dict, stage: str) -> list[str]:
    """The values an answer must not hold at a stage (every earlier version's)."""
    if stage.startswith("v1"):
        return []
    done = versions(fact)
    return [v for name in done[:-1] for v in fact["values"][name]]


def bootstrap(rows: dict[str, list[bool]], facts: list[str], draws: int = 2000, seed: int = 0) -> dict:
    """Each rate with a 95% interval from resampling facts (both questions of a fact together)."""
    rng = random.Random(seed)
    by_fact: dict[str, list[int]] = {}
    for i, f in enumerate(facts):
        by_fact.setdefault(f, []).append(i)
    keys = sorted(by_fact)
    out = {}
    for name, values in rows.items():
        point = sum(values) / len(values)
        samples = []
        for _ in range(draws):
            idx = [i for k in (rng.choice(keys) for _ in keys) for i in by_fact[k]]
            samples.append(sum(values[i] for i in idx) / len(idx))
        samples.sort()
        out[name] = {"value": round(point, 4), "lo": round(samples[int(0.025 * draws)], 4),
                     "hi": round(samples[int(0.975 * draws) - 1], 4)}
    return out


def measure(m, facts: list[dict], stage: str, work: Path, modes=MODES) -> dict:
    """Stale and current rates of each mode at a stage (closed only once an adapter is current)."""
    path = probes_file(work / f"probes-{stage}.jsonl", facts, stage)
    by_id = {f["id"]: f for f in facts}
    out = {}
    for mode in modes:
        if mode == "closed" and m.adapter_version is None:
            continue
        result = m.evaluate(path, mode, qa_new_tokens=48)
        current, stale, ids = [], [], []
        for p in result["probes"]:
            fact = by_id[p["id"].split(":")[0]]
            text = p["output"].lower()
            current.append(p["correct"])
            stale.append(any(v.lower() in text for v in stale_of(fact, stage)))
            ids.append(fact["id"])
        figures = bootstrap({"current": current, "stale": stale}, ids)
        out[mode] = {**figures, "n": len(current), "paths": result.get("paths"),
                     "stale_probes": [p["id"] for p, s in zip(result["probes"], stale) if s]}
        log(f"  {stage} {mode}: current {figures['current']['value']:.3f} stale {figures['stale']['value']:.3f}"
            + (f" paths {result.get('paths')}" if result.get("paths") else ""))
    return out


def learn_first(m, facts: list[dict], files: Path) -> None:
    """Every fact's first value: a text each, or their notes file."""
    notes: dict[str, list[dict]] = {}
    for f in facts:
        if f["channel"] == "file":
            notes.setdefault(f["file"], []).append(f)
        else:
            m.learn(text=f["v1"])
    for name, group in notes.items():
        (files / name).write_text("\n\n".join(f["v1"] for f in group) + "\n", encoding="utf-8")
        m.learn([files / name])


def change(m, fact: dict, version: str, files: Path) -> dict:
    """A later value, as its channel brings it. Returns what the learn (or feedback) superseded."""
    text = fact[version]
    if fact["channel"] == "text":
        return {"superseded": m.learn(text=text).superseded}
    if fact["channel"] == "file":
        path = files / fact["file"]
        before = versions(fact)[versions(fact).index(version) - 1]
        path.write_text(path.read_text(encoding="utf-8").replace(fact[before], text), encoding="utf-8")
        return {"superseded": m.learn([path]).superseded}
    if fact["channel"] == "chat":
        answer = m.chat([{"role": "user", "content": text}], remember=True, max_new_tokens=8).result()
        made = [e for i in answer.remembered for e in m.memory_history(i)["events"] if e["new_id"] == i]
        return {"remembered": answer.remembered, "superseded": made}
    answer = m.ask(fact["question"], max_new_tokens=32)  # a question answered (from the old value), corrected
    result = m.feedback(answer.id, correction=text)
    return {"superseded": result["superseded"], "answer": answer.text}


def run_split(split: str, facts: list[dict], work: Path, args) -> dict:
    from memory_llm import MemoryLLM

    work.mkdir(parents=True, exist_ok=True)
    files = work / "files"
    files.mkdir(exist_ok=True)
    overrides = {"stale_similarity": args.stale_similarity} if args.stale_similarity is not None else {}
    m = MemoryLLM(work / "home", **overrides)
    out = {"facts": len(facts), "channels": {c: sum(f["channel"] == c for f in facts)
                                             for c in ("text", "file", "chat", "correction")}}
    learn_first(m, facts, files)
    log(f"{split}: {len(facts)} facts learned; stage v1")
    out["v1"] = measure(m, facts, "v1", work)
    t = time.time()
    first = m.consolidate()
    out["consolidation_v1"] = {"status": first.status, "seconds": round(time.time() - t, 1),
                               "metrics": first.metrics, "reasons": first.reasons}
    log(f"{split}: consolidation 1 {first.status} in {time.time() - t:.0f} s; stage v1+c")
    out["v1+c"] = measure(m, facts, "v1+c", work)
    changes = {}
    for version in ("v2", "v3"):
        for f in facts:
            if f.get(version):
                changes[f"{f['id']}:{version}"] = change(m, f, version, files)
    missed = [k for k, c in changes.items() if not c["superseded"]]
    out["changes"] = {"n": len(changes), "superseded": sum(bool(c["superseded"]) for c in changes.values()),
                      "reasons": _count(x["reason"] for c in changes.values() for x in c["superseded"]),
                      "without_supersession": missed,
                      "chat_remembered": sum(bool(c.get("remembered")) for c in changes.values())}
    log(f"{split}: changes {out['changes']}; stage v2")
    out["v2"] = measure(m, facts, "v2", work)
    t = time.time()
    second = m.consolidate()
    out["consolidation_v2"] = {"status": second.status, "seconds": round(time.time() - t, 1),
                               "metrics": second.metrics, "reasons": second.reasons, "retrained": second.retrained}
    log(f"{split}: consolidation 2 {second.status} in {time.time() - t:.0f} s; stage v2+c")
    out["v2+c"] = measure(m, facts, "v2+c", work)
    m.close()
    only = MemoryLLM(work / "current-only")  # the reference: only the current values ever learned
    for f in facts:
        now = f[versions(f)[-1]]
        only.learn(text=f"{f['question']}\n{now}" if f["channel"] == "correction" else now)
    out["current_only"] = measure(only, facts, "v2", work, modes=("rag",))
    only.close()
    return out


def _count(items) -> dict:
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


# ---- costs ----------------------------------------------------------------------------------------------------
def learn_cost(work: Path, runs: int) -> dict:
    """`learn` with supersession checks against without: 60 FK documents (one learn), and 200 short notes learned
    one by one (the updates facts' statements, repeated under 4 names). Medians of `runs`, fresh homes."""
    from memory_llm import MemoryLLM

    docs = json.loads(FK.read_text(encoding="utf-8"))[:60]
    folder = work / "fk"
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (folder / f"doc{i:03d}.txt").write_text(d["train_context"], encoding="utf-8")
    facts = [json.loads(line) for line in FACTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    names = ["Harbor", "Quill", "Marsh", "Tolley"]
    notes = [f"{f[v]} ({n} copy)" for n in names for f in facts for v in ("v1", "v2") if f.get(v)][:200]
    probe = MemoryLLM(work / "warm")
    probe.learn(text="warm up the embedder")
    embedder = probe.embedder
    times: dict[str, list[float]] = {"documents, off": [], "documents, on": [], "notes, off": [], "notes, on": []}
    for r in range(runs):
        for detect in (False, True):
            label = "on" if detect else "off"
            m = MemoryLLM(work / f"docs-{r}-{label}", embedder=embedder)
            t = time.perf_counter()
            m.learn([folder], detect=detect)
            times[f"documents, {label}"].append(time.perf_counter() - t)
            m.close()
            m = MemoryLLM(work / f"notes-{r}-{label}", embedder=embedder)
            t = time.perf_counter()
            for note in notes:
                m.learn(text=note, detect=detect)
            times[f"notes, {label}"].append(time.perf_counter() - t)
            m.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"runs": runs, "documents": len(docs), "notes": len(notes), "seconds": {k: [round(x, 2) for x in v]
                                                                                   for k, v in times.items()},
           "median": {k: round(v, 2) for k, v in med.items()},
           "ratio_documents": round(med["documents, on"] / med["documents, off"], 3),
           "ratio_notes": round(med["notes, on"] / med["notes, off"], 3)}
    log(f"learn cost: {out['median']}")
    return out


def consolidation_cost(facts: list[dict], work: Path) -> dict:
    """Two rounds (half the facts each, both promoted whatever the gate says), then one fact of the first round
    restated: the consolidation that retrains the stale round, against a full rebuild of a copy of the same home
    (both under the default gate; the time is spent either way)."""
    from memory_llm import MemoryLLM

    from memory_llm.consolidate.gate import Floors

    half = len(facts) // 2
    m = MemoryLLM(work / "home")
    rounds = []
    setup = Floors(reliability=0.0, locality=0.0, retention=0.0, tolerance=1.0)  # the two rounds are the setting
    for part in (facts[:half], facts[half:]):  # (both promoted), not what is measured: the 135M gate may reject one
        for f in part:
            m.learn(text=f["v1"])
        t = time.time()
        s = m.consolidate(floors=setup)
        rounds.append({"status": s.status, "seconds": round(time.time() - t, 1), "memories": s.memories})
    m.learn(text=facts[0]["v2"] if facts[0]["channel"] == "text" else next(
        f["v2"] for f in facts[:half] if f["channel"] == "text"))
    m.close()
    shutil.copytree(work / "home", work / "copy")
    m = MemoryLLM(work / "home")
    t = time.time()
    partial = m.consolidate()
    partial_s = time.time() - t
    m.close()
    other = MemoryLLM(work / "copy")
    t = time.time()
    full = other.consolidate(full=True)
    full_s = time.time() - t
    other.close()
    out = {"rounds": rounds, "update": {"status": partial.status, "seconds": round(partial_s, 1),
                                       "memories": partial.memories, "retrained": partial.retrained,
                                       "message": partial.message},
           "full": {"status": full.status, "seconds": round(full_s, 1), "memories": full.memories},
           "ratio": round(partial_s / full_s, 3)}
    log(f"consolidation cost: {out}")
    return out


# ---- report ---------------------------------------------------------------------------------------------------
def _rate(f: dict | None) -> str:
    return "n/a" if f is None else f"{f['value']:.3f} [{f['lo']:.2f}, {f['hi']:.2f}]"


def report(out: dict) -> str:
    lines = [f"Command: `{out['command']}`  ", f"Date: {out['date']}; {out['machine']}.", ""]
    for split, res in out.get("stages", {}).items():
        lines.append(f"**{split}** ({res['facts']} facts, {sum(res['channels'].values()) * 2} questions; channels"
                     f" {res['channels']}). Stale rate (answers holding an old value) / current rate, 95% intervals"
                     " over facts:\n")
        rows = []
        for stage in ("v1", "v1+c", "v2", "v2+c"):
            for mode in MODES:
                f = res[stage].get(mode)
                if f is not None:
                    rows.append([stage, mode, _rate(f["stale"]), _rate(f["current"]),
                                 ", ".join(f"{k} {v}" for k, v in (f["paths"] or {}).items())])
        rows.append(["current values only", "rag", "—", _rate(res["current_only"]["rag"]["current"]), ""])
        lines += [table(["stage", "mode", "stale", "current", "answered by (served)"], rows), ""]
        c1, c2 = res["consolidation_v1"], res["consolidation_v2"]
        lines.append(f"Consolidations: v1 {c1['status']} in {c1['seconds'] / 60:.1f} min; v2 {c2['status']} in"
                     f" {c2['seconds'] / 60:.1f} min (retrained {', '.join(c2['retrained']) or 'nothing'}; stale"
                     f" answers {c2['metrics'].get('stale_answers')} of {c2['metrics'].get('stale_probes')} probes)."
                     f" Changes: {res['changes']}.\n")
    if "detector" in out:
        rows = []
        for split, d in out["detector"].items():
            for tier in ("supersede", "conflict"):
                f = d[tier]
                rows.append([split, tier, f"{f['precision']:.3f}", f"{f['recall']:.3f}",
                             f"{f['true_positives']} of {f['restatements']}", f"{f['false_positives']} of"
                             f" {f['distinct']} distinct", f["wrong_by_kind"], f["missed_by_kind"]])
        lines += ["Detector on data/supersession_pairs.jsonl (pair level, shipped weights):\n",
                  table(["split", "tier", "precision", "recall", "found", "wrong", "wrong by kind",
                         "missed by kind"], rows), ""]
    if "learn_cost" in out:
        c = out["learn_cost"]
        lines.append(f"`learn` with supersession checks ÷ without: **{c['ratio_documents']}×** on {c['documents']} FK"
                     f" documents, **{c['ratio_notes']}×** on {c['notes']} short notes learned one by one (medians of"
                     f" {c['runs']}: {c['median']}).\n")
    if "consolidation_cost" in out:
        c = out["consolidation_cost"]
        lines.append(f"Consolidation after one fact of round 1 changed: retrained {c['update']['retrained']} in"
                     f" {c['update']['seconds'] / 60:.1f} min ({c['update']['memories']} memories) vs a full rebuild"
                     f" {c['full']['seconds'] / 60:.1f} min ({c['full']['memories']} memories): **{c['ratio']}×**"
                     f" (rounds: {c['rounds']}).\n")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", default="tuning,heldout")
    ap.add_argument("--no-stages", action="store_true", help="skip the stale/current stages")
    ap.add_argument("--no-cost", action="store_true", help="skip the learn and consolidation costs")
    ap.add_argument("--no-consolidation-cost", action="store_true", help="skip the consolidation cost only")
    ap.add_argument("--no-detector", action="store_true", help="skip the detector's figures")
    ap.add_argument("--runs", type=int, default=3, help="runs of each learn in the cost figure")
    ap.add_argument("--stale-similarity", type=float, help="serve with this stale_similarity (default: setting)")
    ap.add_argument("--json-out", help="write every figure here")
    ap.add_argument("--write", action="store_true", help="replace the section of BENCHMARKS.md")
    args = ap.parse_args()
    if not args.no_cost and not FK.exists():  # say so now, not after an hour of stages
        ap.error(f"{FK} is missing (the learn cost reads Fictional Knowledge documents); --no-cost skips it")

    facts = [json.loads(line) for line in FACTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    work = Path(tempfile.mkdtemp(prefix="bench-updates-"))
    out = {"date": today(), "machine": machine(), "command": command_line()}

    def save() -> None:  # after every part: a long run that fails late keeps what it measured
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(out, indent=1, default=str), encoding="utf-8")

    if not args.no_detector:
        from memory_llm import MemoryLLM

        probe = MemoryLLM(work / "detector")
        out["detector"] = detector(probe.embedder.encode)
        probe.close()
        save()
    if not args.no_stages:
        out["stages"] = {}
        for split in args.splits.split(","):
            part = [f for f in facts if f["split"] == split]
            out["stages"][split] = run_split(split, part, work / split, args)
            save()
    if not args.no_cost:
        out["learn_cost"] = learn_cost(work / "learn-cost", args.runs)
        save()
        if not args.no_consolidation_cost:
            out["consolidation_cost"] = consolidation_cost([f for f in facts if f["split"] == "tuning"],
                                                           work / "consolidation-cost")
    print(json.dumps(out, indent=1, default=str))
    save()
    if args.write:
        write_section("Facts that change (bench_updates.py)", report(out))


if __name__ == "__main__":
    main()
