"""Which routing signal separates prompts about consolidated memories from generic ones? One adapter is trained
on the locality lab's items (run labs/sweep_locality.py --work DIR first), then every candidate score is
computed for generic prompts (the 60 covariance prompts, the gate's 60 held-out ones, 40 general-knowledge
probes) and for the memory's prompts (trained items, held-out paraphrases, the 4 fact probes). Per score: the
separation margin min(memory held-out) / max(generic held-out) (above 1 means a threshold exists) and the AUC.

    MLLM_CACHE=/tmp/mcache .venv/bin/python labs/probe_routing.py --work /tmp/locality '{"lr": 1e-2, "epochs": 8}'
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_e2e_consolidate import PROBES  # noqa: E402

sys.path.insert(0, str(ROOT / "labs"))
from sweep_locality import lab_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("config", help="JSON object of Recipe fields")
    ap.add_argument("--bands", type=json.loads, default=[], help='extra layer bands [[lo, hi], ...] to score')
    ap.add_argument("--keys", action="store_true", help="also score residual-stream key cosines")
    args = ap.parse_args()

    import torch
    from peft.tuners.lora import LoraLayer

    from memory_llm import MemoryLLM
    from memory_llm.consolidate import examples as E
    from memory_llm.consolidate import recipe as R
    from memory_llm.consolidate import train as T
    from memory_llm.adapters.routing import common_prefix

    m = MemoryLLM(args.work / "home")
    train_items, held, contexts, loc_train, loc_eval, general = lab_data(m)
    gen = m.new_generator()
    recipe = R.Recipe.from_dict(json.loads(args.config))
    examples = E.prepare_items(gen, train_items, contexts, recipe)
    loc = E.prepare_locality(gen, loc_train, recipe)
    saved = args.work / ("adapter-" + hashlib.sha1(args.config.encode()).hexdigest()[:10])
    if saved.is_dir():  # trained before with this configuration: reuse it
        from peft import PeftModel

        model = PeftModel.from_pretrained(gen.model, str(saved))
    else:
        model = T.attach_lora(gen.model, recipe)
        constrain = T.null_space_constraint(model, [e.ids for e in loc], recipe.null_space_energy) \
            if recipe.null_space_energy else None
        T.train(model, examples + loc, recipe, constrain=constrain)
        model.save_pretrained(saved)

    def chat(p):
        return E.closed_prompt_ids(gen, p)

    sets = {"generic_train": [chat(p) for p in loc_train], "generic_eval": [chat(p) for p in loc_eval],
            "general": [chat(p["input"]) for p in general],
            "trained": [E.student_prompt_ids(gen, it) for it in train_items],
            "held_out": [E.student_prompt_ids(gen, it) for it in held],
            "probes": [gen.tokenizer(q, add_special_tokens=False)["input_ids"] for q, _ in PROBES]}
    prefix = common_prefix(sets["generic_train"])  # the chat template's shared head: skipped when pooling
    layers = [mm for mm in model.modules() if isinstance(mm, LoraLayer) and "default" in mm.lora_B]
    index = {mm: int(n.split(".layers.")[1].split(".")[0]) for n, mm in model.named_modules() if mm in layers}
    n_layers = max(index.values()) + 1

    def features(seq):
        """Per token: per decoder layer, ‖ΔW x‖², ‖W x‖², ‖A x‖², ‖x‖²; and the residual stream per layer."""
        rec = {k: torch.zeros(n_layers, len(seq)) for k in ("d", "y", "a", "x")}
        rec["dm"] = torch.zeros(len(layers), len(seq))
        hooks = []
        for j, mm in enumerate(layers):
            i = index[mm]

            def hook(mod, a, out, i=i, j=j):
                rec["dm"][j] = (mod.lora_B["default"](mod.lora_A["default"](a[0]))[0].float()).norm(dim=-1)
                x = a[0][0].float()
                rec["x"][i] += x.pow(2).sum(-1)
                rec["a"][i] += mod.lora_A["default"](a[0])[0].float().pow(2).sum(-1)
                rec["d"][i] += (mod.lora_B["default"](mod.lora_A["default"](a[0]))[0].float()
                                * mod.scaling["default"]).pow(2).sum(-1)
                rec["y"][i] += mod.base_layer(a[0])[0].float().pow(2).sum(-1)
            hooks.append(mm.register_forward_hook(hook))
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([seq]), output_hidden_states=True)
        for h in hooks:
            h.remove()
        rec["h"] = torch.stack([h[0].float() for h in out.hidden_states])  # (layers+1, T, d)
        return rec

    feats = {k: [features(s) for s in v] for k, v in sets.items()}
    skip = lambda r: slice(len(prefix) if r["x"].shape[1] > len(prefix) else 0, None)  # noqa: E731
    scores: dict[str, dict[str, list[float]]] = {}

    def add(name, fn):
        scores[name] = {k: [float(fn(r)) for r in v] for k, v in feats.items()}

    add("delta/out all layers, max token", lambda r: (r["d"].sum(0) / r["y"].sum(0))[skip(r)].max())
    add("delta/out all layers, mean token", lambda r: (r["d"].sum(0) / r["y"].sum(0))[skip(r)].mean())
    add("A/x all layers, max token", lambda r: (r["a"].sum(0) / r["x"].sum(0))[skip(r)].max())
    bands = [(lo, lo + 6) for lo in range(0, n_layers, 6)] + [tuple(b) for b in args.bands]
    for lo, hi in bands:
        add(f"delta/out layers {lo}-{hi - 1}, max token",
            lambda r, lo=lo, hi=hi: (r["d"][lo:hi].sum(0) / r["y"][lo:hi].sum(0))[skip(r)].max())
        add(f"delta/out layers {lo}-{hi - 1}, max token, template head kept",
            lambda r, lo=lo, hi=hi: (r["d"][lo:hi].sum(0) / r["y"][lo:hi].sum(0)).max())
    # keys: the base model's residual stream at a layer, mean over the prompt's own tokens, nearest trained key
    # novelty: each LoRA module's ‖ΔW x‖ over its own highest value on the covariance prompts' tokens
    for q in (1.0, 0.99):
        ref = torch.quantile(torch.cat([r["dm"][:, skip(r)] for r in feats["generic_train"]], 1), q, dim=1)
        for agg in ("mean", "median"):
            def novelty(r, ref=ref, agg=agg):
                z = r["dm"][:, skip(r)] / ref[:, None]
                return (z.mean(0) if agg == "mean" else z.median(0).values).max()
            add(f"novelty q{q} {agg} over modules, max token", novelty)
    if args.keys:
        with model.disable_adapter():
            base_feats = {k: [features(s)["h"] for s in v] for k, v in sets.items()}
        for layer in (4, 8, 12, 16, 20, 24):
            def pooled(h, layer=layer):
                start = len(prefix) if h.shape[1] > len(prefix) else 0
                v = h[layer, start:].mean(0)
                return v / v.norm()
            keys = torch.stack([pooled(h) for h in base_feats["trained"]])
            scores[f"key cosine layer {layer}"] = {
                k: [float((keys @ pooled(h)).max()) for h in v] for k, v in base_feats.items()}

    rows = []
    for name, s in scores.items():
        neg = s["generic_eval"] + s["general"]
        pos = s["held_out"] + s["probes"]
        auc = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
        rows.append({"score": name, "margin_heldout": round(min(pos) / max(neg), 3),
                     "margin_trained": round(min(s["trained"]) / max(s["generic_train"]), 3), "auc": round(auc, 3),
                     "generic_max": f"{max(neg):.3g}", "memory_min": f"{min(pos):.3g}",
                     "trained_min": f"{min(s['trained']):.3g}",
                     # routed shares (generic held-out, general probes, memory held-out + probes, trained) at
                     # thresholds of k × the highest covariance-prompt score
                     "routed_at": {k: [round(sum(x >= k * max(s["generic_train"]) for x in xs) / len(xs), 2)
                                       for xs in (s["generic_eval"], s["general"], pos, s["trained"])]
                                   for k in (1.0, 1.2, 1.5, 2.0)}})
    for r in sorted(rows, key=lambda r: -r["auc"]):
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
