"""Routing signals on a consolidated home, judged by what they would do to closed-book accuracy: for each
variant of the router's score (which layers, which modules, how tokens are pooled) and the shipped calibration
(margin × the highest score of the calibration generic prompts), the share of each prompt set routed and the
closed-book accuracy that routing gives on Fictional Knowledge and on the general-knowledge probes.

Routing is a per-prompt on/off choice, so closed accuracy under any variant is exact from two runs per probe
set: once with the adapter always on, once with the base model (a probe scores the first when routed, the second
when not). Scores come from one forward per prompt with hooks on every LoRA layer.

    MLLM_CACHE=/tmp/mcache .venv/bin/python scripts/probe_fk_signals.py HOME EVAL [--version vNNNN]
    (HOME: a bench_consolidation.py home, e.g. /tmp/bench-consolidation-XXXX/home; EVAL: its r1/eval.jsonl)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def token_stats(router, seqs):
    """Per prompt: (modules × tokens × 2) tensor of [LoRA Δ energy, base output energy], own tokens only."""
    import torch

    name, layers = router._name, router.layers
    out = []
    for s in seqs:
        rows: dict = {}
        hooks = []
        for k, mod in enumerate(layers):
            scale = mod.scaling[name]
            hooks.append(mod.lora_B[name].register_forward_hook(
                lambda m, a, o, k=k, sc=scale, rows=rows: rows.__setitem__((k, 0), (o.float() * sc).pow(2).sum(-1)[0])))
            hooks.append(mod.base_layer.register_forward_hook(
                lambda m, a, o, k=k, rows=rows: rows.__setitem__((k, 1), o.float().pow(2).sum(-1)[0])))
        gate, router.gate, router.busy = router.gate, None, True
        try:
            with torch.no_grad():
                router.model.get_base_model()(input_ids=torch.tensor([s]))
        finally:
            router.gate, router.busy = gate, False
            for h in hooks:
                h.remove()
        own = router.own_tokens(list(s), None)[0]
        t = torch.stack([torch.stack([rows[(k, 0)], rows[(k, 1)]], -1) for k in range(len(layers))])
        out.append(t[:, own])
    return out


ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}


def band_score(router, lo: int, hi: int, modules: str = "all", pool: str = "max"):
    """A score over token_stats: the LoRA Δ energy of decoder layers lo..hi-1 ("all", "attn" or "mlp" modules)
    relative to their outputs' energy, per token, pooled over the prompt's tokens ("max", "top3" or "mean")."""
    import torch

    from memory_llm.adapters.routing import _layer_index

    where = {mod: n for n, mod in router.model.named_modules() if mod in set(router.layers)}
    sel = torch.tensor([lo <= _layer_index(where[mod]) < hi and (modules == "all" or (
        where[mod].split(".")[-1] in ATTENTION) == (modules == "attn")) for mod in router.layers])

    def score(t) -> float:
        r = t[sel, :, 0].sum(0) / (t[sel, :, 1].sum(0) + 1e-12)
        if pool == "max":
            return float(r.max())
        if pool == "mean":
            return float(r.mean())
        return float(r.topk(min(3, r.numel())).values.mean())
    return score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("home")
    ap.add_argument("eval")
    ap.add_argument("--margin", type=float, default=None, help="calibration margin (default: the adapter's)")
    args = ap.parse_args()


    from memory_llm import MemoryLLM
    from memory_llm.config import DEFAULT_NAMESPACE
    from memory_llm.consolidate.recipe import Recipe, closed_prompt_ids
    from memory_llm.consolidate.run import calibration_prompts, generic_prompts
    from memory_llm.evaluate import load_probes

    m = MemoryLLM(Path(args.home))
    m.ask("warm up", use_memory=False, max_new_tokens=1, log=False)
    router, gen = m.served.router, m.generator
    margin = args.margin or json.loads((m.adapters.get(m.adapter_version).path / "router.json").read_text()).get(
        "margin", 1.25)
    recipe = Recipe()
    loc_eval = generic_prompts()[1]
    calib = calibration_prompts(recipe)
    fk = load_probes(Path(args.eval))
    gk_file = ROOT / "data" / "general_probes.jsonl"
    gk = load_probes(gk_file)

    # correctness per probe: adapter always on, and base
    router.remove()
    fk_on, gk_on = m.evaluate(args.eval, "closed")["probes"], m.evaluate(gk_file, "closed")["probes"]
    fk_base, gk_base = m.evaluate(args.eval, "base")["probes"], m.evaluate(gk_file, "base")["probes"]
    print(json.dumps({"fk_on": sum(p["correct"] for p in fk_on), "fk_base": sum(p["correct"] for p in fk_base),
                      "gk_on": sum(p["correct"] for p in gk_on), "gk_base": sum(p["correct"] for p in gk_base)}),
          flush=True)

    def gk_ids(p):
        return m.answerer.prepare(p.input, k=None, namespace=DEFAULT_NAMESPACE, use_memory=False)[1][0].tolist()

    sets = {"calibration generic (20)": [closed_prompt_ids(gen, p) for p in calib],
            "held-out generic (60)": [closed_prompt_ids(gen, p) for p in loc_eval],
            "general knowledge": [gk_ids(p) for p in gk],
            "FK eval (raw cloze)": [gen.tokenizer(p.input, add_special_tokens=False)["input_ids"] for p in fk]}
    stats = {k: token_stats(router, v) for k, v in sets.items()}

    variants = {f"layers {lo}-{hi - 1}, {mods}, {pool}": band_score(router, lo, hi, mods, pool)
                for lo, hi in ((12, 18), (14, 20), (10, 20), (15, 21), (0, 30)) for mods in ("all", "mlp", "attn")
                for pool in ("max", "top3", "mean")}
    rows = []
    for label, fn in variants.items():
        s = {k: [fn(t) for t in v] for k, v in stats.items()}
        thr = margin * max(s["calibration generic (20)"])
        routed = {k: [x >= thr for x in v] for k, v in s.items()}
        fk_acc: dict = {}
        for p, on, b, r in zip(fk, fk_on, fk_base, routed["FK eval (raw cloze)"]):
            for tag in p.tags:
                fk_acc.setdefault(tag, []).append(on["correct"] if r else b["correct"])
        gk_lost = sum(b["correct"] and not on["correct"] and r
                      for on, b, r in zip(gk_on, gk_base, routed["general knowledge"]))
        neg = s["held-out generic (60)"] + s["general knowledge"]
        pos = s["FK eval (raw cloze)"]
        auc = sum((x > y) + 0.5 * (x == y) for x in pos for y in neg) / (len(pos) * len(neg))
        rows.append({"variant": label, "auc": round(auc, 3),
                     **{f"routed {k}": round(sum(v) / len(v), 3) for k, v in routed.items() if "calibration" not in k},
                     **{f"closed {t}": round(sum(v) / len(v), 3) for t, v in sorted(fk_acc.items())},
                     "gk lost": gk_lost})
        print(json.dumps(rows[-1]), flush=True)
    best = sorted(rows, key=lambda r: (-r.get("closed gen", 0), r["gk lost"]))[:8]
    print("\nbest by closed gen:")
    for r in best:
        print(json.dumps(r))
    print(json.dumps({"fk_on_by_tag": {t: statistics.mean(on["correct"] for p, on in zip(fk, fk_on) if t in p.tags)
                                       for t in ("mem", "gen", "hard_gen")}}))


if __name__ == "__main__":
    main()
