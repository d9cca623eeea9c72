"""Consolidation on Fictional Knowledge (CPU, SmolLM2): accuracy base / rag / closed / hybrid, gain recovered,
locality, general knowledge before/after, retention over a second round, cost, and training tokens/s against
a naive padded peft loop on the same items.

    MLLM_CACHE=/tmp/mcache .venv/bin/python scripts/bench_consolidation.py --n 10 --write
    (--n 2 --no-round2 for a quick look; --chat also asks round 1's probes as chat questions, `ask`'s form)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchmd import command_line, machine, table, today, write_section  # noqa: E402
from prepare_fictional_knowledge import prepare  # noqa: E402

from memory_llm.evaluate import lost  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODES = ("base", "rag", "closed", "hybrid")
TAGS = ("mem", "gen", "hard_gen")


def accuracies(m, eval_file, modes=MODES) -> dict:
    return {mode: m.evaluate(eval_file, mode)["by_tag"] for mode in modes}


class PhaseClock:
    """Seconds per consolidation phase, from the progress callback (a phase ends at its last report)."""

    def __init__(self):
        self.start = self.mark = time.time()
        self.phases: dict[str, float] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.time()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.mark
        self.mark = now
        print(f"  {phase} {done}/{total} {now - self.start:.0f}s", flush=True)

    def finish(self) -> dict:
        out = {k: round(v, 1) for k, v in self.phases.items()}
        out["evaluate_and_promote"] = round(time.time() - self.mark + out.pop("evaluate", 0.0), 1)
        return out


def naive_tokens_per_s(m, steps: int = 8) -> dict:
    """A naive peft loop on the same stored items: random batches padded to the longest item of the set,
    the teacher recomputed every step, KL over the full vocabulary. Versus the recipe's loop on the same
    items (teacher top-k cached once, length-bucketed batches)."""
    import torch
    import torch.nn.functional as F

    from memory_llm.consolidate.examples import answer_ids, prepare_items, student_prompt_ids, teacher_prompt_ids
    from memory_llm.consolidate.recipe import Recipe
    from memory_llm.consolidate.train import attach_lora, train

    recipe = Recipe(epochs=1)
    items = [i for i in m.store.items(m.store.memory_ids()) if not i.held_out]
    rng = random.Random(0)
    items = rng.sample(items, min(len(items), steps * recipe.batch_size))
    contexts = {i: mem.text for i, mem in m.store.get(sorted({it.memory_id for it in items})).items()}

    gen = m.new_generator()
    t0 = time.perf_counter()
    examples = prepare_items(gen, items, contexts, recipe)
    prep = time.perf_counter() - t0
    model = attach_lora(gen.model, recipe)
    ours = train(model, examples, recipe)
    ours_tps = ours["tokens"] / (ours["seconds"] + prep)

    gen2 = m.new_generator()
    model2 = attach_lora(gen2.model, recipe)
    opt = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=recipe.lr)
    seqs = []
    for it in items:
        s, t, a = student_prompt_ids(gen2, it), teacher_prompt_ids(gen2, it, contexts[it.memory_id]), answer_ids(gen2, it)
        seqs.append((s + a, len(s), t + a, len(t), len(a)))
    s_width, t_width = max(len(x[0]) for x in seqs), max(len(x[2]) for x in seqs)
    tokens, start = 0, time.perf_counter()
    model2.train()
    for b in range(0, len(seqs), recipe.batch_size):
        batch = seqs[b:b + recipe.batch_size]
        s_ids = torch.zeros((len(batch), s_width), dtype=torch.long)
        t_ids = torch.zeros((len(batch), t_width), dtype=torch.long)
        s_mask, t_mask = torch.zeros_like(s_ids), torch.zeros_like(t_ids)
        for r, (s, _, t, _, _) in enumerate(batch):
            s_ids[r, :len(s)], s_mask[r, :len(s)] = torch.tensor(s), 1
            t_ids[r, :len(t)], t_mask[r, :len(t)] = torch.tensor(t), 1
        with torch.no_grad(), model2.disable_adapter():
            t_logits = model2(input_ids=t_ids, attention_mask=t_mask).logits
        s_logits = model2(input_ids=s_ids, attention_mask=s_mask).logits
        losses = []
        for r, (s, ls, t, lt, la) in enumerate(batch):
            sp = F.log_softmax(s_logits[r, ls - 1:ls + la - 1] / 2, -1)
            tp = F.softmax(t_logits[r, lt - 1:lt + la - 1] / 2, -1)
            losses.append(F.kl_div(sp, tp, reduction="batchmean") * 4)
        loss = torch.stack(losses).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        tokens += sum(len(x[0]) for x in batch)
    naive_s = time.perf_counter() - start
    return {"items": len(items), "ours_tokens_per_s": round(ours_tps, 1), "naive_tokens_per_s": round(tokens / naive_s, 1),
            "ratio": round(ours_tps / (tokens / naive_s), 2), "ours_prepare_s": round(prep, 1),
            "ours_train_s": ours["seconds"], "naive_s": round(naive_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10, help="documents per round")
    ap.add_argument("--no-round2", action="store_true", help="skip the retention round")
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    ap.add_argument("--recipe", default="{}", help="Recipe overrides as a JSON object (default: the shipped recipe)")
    ap.add_argument("--no-speed", action="store_true", help="skip the naive-loop speed comparison")
    ap.add_argument("--chat", action="store_true", help="also ask round 1's probes in chat form (base, rag, closed)")
    args = ap.parse_args()

    from memory_llm import MemoryLLM
    from memory_llm.consolidate.gate import Floors, decide
    from memory_llm.consolidate.recipe import Recipe
    from memory_llm.consolidate.steps import generic_prompts

    OPEN = Floors(0.0, 0.0, 0.0, 1.0)  # always promote, so closed/hybrid can be measured; the default gate's
    # verdict on the same metrics is reported beside them

    recipe = Recipe.from_dict(json.loads(args.recipe))

    work = Path(tempfile.mkdtemp(prefix="bench-consolidation-"))
    r1 = prepare(args.n, 0, work / "r1")
    general = ROOT / "data" / "general_probes.jsonl"
    m = MemoryLLM(work / "home")
    m.learn([r1["docs"]])
    before_general = m.evaluate(general, "base")
    t0, clock = time.time(), PhaseClock()
    s1 = m.consolidate(recipe=recipe, floors=OPEN, progress=clock)
    round1_s, phases1 = time.time() - t0, clock.finish()
    print(json.dumps(s1.as_dict(), indent=1))
    verdict1 = decide(s1.metrics, None, Floors()) if s1.metrics else (False, [s1.message])
    acc1 = accuracies(m, r1["eval"])
    print(json.dumps({"acc1": acc1}), flush=True)
    if args.chat:
        acc1.update({f"chat {mode}": by_tag for mode, by_tag in
                     accuracies(m, r1["eval_chat"], ("base", "rag", "closed")).items()})
        print(json.dumps({"acc1_chat": {k: v for k, v in acc1.items() if k.startswith("chat")}}), flush=True)
    after_general = m.evaluate(general, "closed") if s1.status == "promoted" else None
    result = {"round1": s1.as_dict(), "verdict1": verdict1, "acc1": acc1, "round1_s": round1_s,
              "general_before": before_general["accuracy"], "general_n": before_general["n"],
              "general_after": after_general["accuracy"] if after_general else None, "phases1": phases1,
              "general_right": sum(p["correct"] for p in before_general["probes"]),
              "general_lost": lost(before_general, after_general) if after_general else None}
    if not args.no_round2 and s1.status == "promoted":
        r2 = prepare(args.n, args.n, work / "r2")
        m.learn([r2["docs"]])
        t1, clock = time.time(), PhaseClock()
        s2 = m.consolidate(recipe=recipe, floors=OPEN, progress=clock)
        result["phases2"] = clock.finish()
        result["round2"] = s2.as_dict()
        result["verdict2"] = decide(s2.metrics, s2.current_metrics, Floors()) if s2.metrics else (False, [s2.message])
        result["round2_s"] = time.time() - t1
        result["acc1_after_round2"] = accuracies(m, r1["eval"], ("closed",))
        result["acc2"] = accuracies(m, r2["eval"], ("base", "closed"))
        result["general_lost2"] = lost(before_general, m.evaluate(general, "closed"))
    if not args.no_speed:
        result["speed"] = naive_tokens_per_s(m)
    print(json.dumps(result, indent=1))

    rows = [[mode] + [round(acc1[mode].get(t, 0.0), 3) for t in TAGS] for mode in acc1]
    gain = {t: (acc1["closed"][t] - acc1["base"][t]) / (acc1["rag"][t] - acc1["base"][t])
            if acc1["rag"][t] != acc1["base"][t] else None for t in TAGS}
    rows.append(["gain recovered (closed − base)/(rag − base)"] + [None if g is None else round(g, 3) for g in gain.values()])
    met = s1.metrics or {}
    body = [f"Command: `{command_line()}`  ", f"Date: {today()}; {machine()}.  ",
            f"First {args.n} Fictional Knowledge records learned and consolidated (round 1: {s1.status}, "
            f"{s1.items} training items, {round1_s / 60:.1f} min wall).", "",
            table(["mode", *TAGS], rows), "",
            f"Recipe: `{json.dumps(recipe.as_dict())}`.  ",
            f"Gate metrics (round 1): {json.dumps(met)}.  ",
            f"The default gate on these metrics: **{'promote' if verdict1[0] else 'reject'}** ("
            + "; ".join(verdict1[1]) + "). (The bench promotes with open floors so closed and hybrid can be"
            " measured either way.)  ",
            f"Locality on {len(generic_prompts()[1])} held-out"
            f" generic prompts: teacher-forced agreement {met.get('locality')} (target ≥ 0.97), identical first 16"
            f" greedy tokens {met.get('locality_strict')}.  ",
            "Hybrid ≥ max(rag, closed): " + ", ".join(
                f"{t} {'yes' if acc1['hybrid'][t] >= max(acc1['rag'][t], acc1['closed'][t]) else 'no'}" for t in TAGS)
            + f".  Cost: round 1 {round1_s / 60:.1f} min wall for {args.n} documents (target ≤ 20 min); seconds by"
            f" phase {json.dumps(phases1)}; {s1.training.get('steps')} training steps at"
            f" {s1.training.get('tokens_per_s')} tokens/s.", "",
            f"General-knowledge probes ({result['general_n']}, data/general_probes.jsonl; the base model answers "
            f"{result['general_right']} right): accuracy {result['general_before']:.3f} → with adapter "
            f"{result['general_after']}; **right before and wrong after: "
            f"{'n/a' if result['general_lost'] is None else len(result['general_lost'])}** (target ≤ 1)"
            + (f"; after round 2: {len(result['general_lost2'])}" if result.get("general_lost2") is not None else "")
            + ".", ""]
    if "round2" in result:
        r1c = {t: acc1["closed"][t] for t in TAGS}
        r1c2 = result["acc1_after_round2"]["closed"]
        body += [f"Retention: round-1 closed accuracy after round 2 ({result['round2']['status']}): "
                 + ", ".join(f"{t} {r1c[t]:.3f} → {r1c2.get(t, 0):.3f}" for t in TAGS) + " (target ≥ 0.9 of its value); "
                 f"round 2 took {result['round2_s'] / 60:.1f} min; round-2 closed "
                 + ", ".join(f"{t} {result['acc2']['closed'].get(t, 0):.3f}" for t in TAGS) + ". Default gate on round 2: "
                 + ("promote" if result["verdict2"][0] else "reject (" + "; ".join(result["verdict2"][1]) + ")") + ".", ""]
    sp = result.get("speed")
    if sp:
        body += [f"Training speed on the same {sp['items']} items: recipe {sp['ours_tokens_per_s']} tokens/s (teacher "
                 f"top-k prepared once + length-bucketed batches) vs naive padded peft loop {sp['naive_tokens_per_s']} "
                 f"tokens/s: **{sp['ratio']}×**."]
    text = "\n".join(body)
    print(text)
    if args.write:
        write_section("Consolidation on Fictional Knowledge", text)


if __name__ == "__main__":
    main()
