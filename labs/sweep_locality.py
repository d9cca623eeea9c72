"""The locality lab: how far a recipe moves the model on generic prompts against how much of one memory it
injects. Items for the three invented Pelloria facts of tests/test_e2e_consolidate.py are synthesized once
(kept in --work), teacher targets are computed once per temperature; then each configuration trains a fresh
LoRA from the base model and reports, on the gate's 60 held-out generic prompts, locality (teacher-forced
agreement) and the strict 16-token share; closed-book hits on the 4 fact probes; reliability/generalization
on the items; which of the first 40 general-knowledge probes (data/general_probes.jsonl) the base model
answered and the adapter no longer does. About 3-5 minutes per configuration on 2 quiet CPU cores.

    MLLM_CACHE=/tmp/mcache .venv/bin/python labs/sweep_locality.py --work /tmp/locality \
        '{"lr": 1e-3, "epochs": 4, "null_space_energy": 0}' '{"lr": 1e-3, "epochs": 4}'

Configuration keys are Recipe fields, plus "cloze_only" (train on the cloze items alone), "layers" ([lo, hi):
LoRA on those layers only), "cov_tokens" (null-space covariance from the generic prompts with base
continuations this long, instead of the locality examples), "output_energy" (also project every LoRA B's
output off the directions holding this share of the base layer's output energy on the generic prompts) and
"route" (a margin: report the run with activation routing instead, memory_llm.adapters.routing, calibrated
with that margin over the highest training generic prompt's score, after printing every prompt set's scores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_e2e_consolidate import FACTS, PROBES  # noqa: E402


def lab_data(m) -> tuple:
    """The lab's prompt sets from a home: (trained items, held-out items, memory texts by id, training generic
    prompts, held-out generic prompts, the first 40 general-knowledge probes)."""
    from memory_llm.consolidate.steps import generic_prompts

    items = m.store.items(m.store.memory_ids())
    train_items, held = [i for i in items if not i.held_out], [i for i in items if i.held_out]
    contexts = {i: mem.text for i, mem in m.store.get(m.store.memory_ids()).items()}
    general = [json.loads(line) for line in (ROOT / "data" / "general_probes.jsonl").read_text().splitlines()[:40]]
    return (train_items, held, contexts, *generic_prompts(), general)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the home (items are reused from it)")
    ap.add_argument("configs", nargs="+", help="JSON objects of Recipe fields (and the lab keys above)")
    args = ap.parse_args()

    from memory_llm import MemoryLLM
    from memory_llm.consolidate import examples as E
    from memory_llm.consolidate import recipe as R
    from memory_llm.consolidate import train as T
    from memory_llm.consolidate.gate import Floors, item_accuracy, locality

    home = args.work / "home"
    fresh = not home.exists()
    m = MemoryLLM(home)
    if fresh:  # synthesize and store the items once (a zero-epoch round trains nothing and promotes nothing)
        m.learn(text=FACTS, source="pelloria")
        m.consolidate(full=True, recipe=R.Recipe(questions=4, epochs=0), floors=Floors(1.01, 1.01, 1.01, 0))
    train_items, held, contexts, loc_train, loc_eval, general = lab_data(m)

    gen = m.new_generator()

    def closed_hits() -> int:
        outs = gen.generate_batch([gen.tokenizer(q, add_special_tokens=False)["input_ids"] for q, _ in PROBES], 10)
        return sum(a.lower() in o.lower() for (_, a), o in zip(PROBES, outs))

    def general_correct() -> list[bool]:
        outs = []
        for i in range(0, len(general), 8):
            outs += gen.generate_batch([E.closed_prompt_ids(gen, p["input"])
                                        for p in general[i:i + 8]], 32)
        return [all(any(a.lower() in o.lower() for a in g) for g in p["answers"]) for p, o in zip(general, outs)]

    base_general = general_correct()
    print(json.dumps({"items": len(train_items), "held_out": len(held), "base_closed": closed_hits(),
                      "base_general": sum(base_general), "base_reliability": item_accuracy(gen, train_items)}),
          flush=True)
    base, cache = gen.model, {}
    for cfg in args.configs:
        fields = json.loads(cfg)
        lab = {k: fields.pop(k) for k in ("cloze_only", "layers", "cov_tokens", "output_energy", "route")
               if k in fields}
        recipe = R.Recipe(**fields)
        gen.model, started = base, time.time()
        key = ("items", recipe.top_k, recipe.temperature)
        if key not in cache:
            cache[key] = E.prepare_items(gen, train_items, contexts, recipe)
        examples = [e for e, it in zip(cache[key], train_items) if it.kind == "cloze" or not lab.get("cloze_only")]
        key = ("loc", recipe.top_k, recipe.temperature, recipe.locality_tokens, recipe.locality_prompts)
        if key not in cache:
            cache[key] = E.prepare_locality(gen, loc_train[:recipe.locality_prompts], recipe)
        loc = cache[key]
        if lab.get("layers"):
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(base, LoraConfig(
                r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0, target_modules=list(recipe.target_modules),
                layers_to_transform=list(range(*lab["layers"])), task_type="CAUSAL_LM"))
        else:
            model = T.attach_lora(base, recipe)
        gen.model = model
        constrain = None
        if recipe.null_space_energy:
            sequences = [e.ids for e in loc]
            if lab.get("cov_tokens"):
                key = ("cov", lab["cov_tokens"])
                if key not in cache:
                    with model.disable_adapter():
                        chats = [E.closed_prompt_ids(gen, p) for p in loc_train]
                        cache[key] = [a + b for a, b in zip(chats, gen.generate_batch(chats, lab["cov_tokens"],
                                                                                      return_ids=True))]
                sequences = cache[key]
            constrain = T.null_space_constraint(model, sequences, recipe.null_space_energy)
        if lab.get("output_energy"):
            constrain = _with_output_projection(model, [e.ids for e in loc], lab["output_energy"], constrain)
        stats = T.train(model, examples + (loc if recipe.locality_weight > 0 else []), recipe,
                        constrain=constrain)
        def report(**extra) -> None:
            near = locality(gen, loc_eval, model.disable_adapter)
            after = general_correct()
            print(json.dumps({
                "config": json.loads(cfg), **extra, "locality": round(near["agreement"], 3),
                "strict": round(near["strict"], 3),
                "closed": f"{closed_hits()}/{len(PROBES)}", "reliability": round(item_accuracy(gen, train_items), 3),
                "generalization": round(item_accuracy(gen, held), 3),
                "general_lost": [p["id"] for p, b, a in zip(general, base_general, after) if b and not a],
                "steps": stats["steps"], "tokens_per_s": stats["tokens_per_s"], "loss_last": stats["loss_last"],
                "seconds": round(time.time() - started)}), flush=True)

        if lab.get("route") is None:
            report()
        else:
            router = _route(gen, model, recipe, loc_train, loc_eval, general, train_items, held, lab["route"])
            report(routed=True, threshold=router.threshold)
            router.remove()
        base = model.unload()


def _route(gen, model, recipe, loc_train, loc_eval, general, train_items, held, margin):
    """Fit the product's router (consolidate.calibrate.fit_router), print every prompt set's scores against its threshold."""
    from memory_llm.consolidate.examples import closed_prompt_ids, student_prompt_ids
    from memory_llm.consolidate.calibrate import fit_router
    from memory_llm.consolidate.steps import calibration_prompts

    router = fit_router(model, gen, calibration_prompts(recipe), train_items, margin, recipe.route_band,
                        recipe.route_pool, recipe.route_per_form)
    sets = {
        "generic_eval": [closed_prompt_ids(gen, p) for p in loc_eval],
        "general_probes": [closed_prompt_ids(gen, p["input"]) for p in general],
        "probes": [gen.tokenizer(q, add_special_tokens=False)["input_ids"] for q, _ in PROBES],
        "trained": [student_prompt_ids(gen, it) for it in train_items],
        "held_out": [student_prompt_ids(gen, it) for it in held],
    }
    summary = {}
    for k, v in sets.items():
        scores = router.scores(v)
        summary[k] = {"median": f"{sorted(scores)[len(scores) // 2]:.2e}", "max": f"{max(scores):.2e}",
                      "routed": f"{sum(s >= router.threshold for s in scores)}/{len(scores)}"}
    print(json.dumps({"threshold": f"{router.threshold:.2e}", **router.details, "scores": summary}), flush=True)
    return router


def _with_output_projection(model, sequences, energy, inner):
    """Also keep each LoRA B's output off the top output directions of its base layer on generic text."""
    import torch
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and "default" in m.lora_B]
    covs, hooks = {}, []

    def accumulate(mod, args, out):
        y = out.detach().reshape(-1, out.shape[-1]).float()
        covs[mod] = covs.get(mod, 0) + y.T @ y

    with torch.inference_mode(), model.disable_adapter():
        hooks = [m.base_layer.register_forward_hook(accumulate) for m in layers]
        try:
            for s in sequences:
                model(input_ids=torch.as_tensor([s]))
        finally:
            for h in hooks:
                h.remove()
    from memory_llm.consolidate.train import top_directions

    bases = [(m.lora_B["default"].weight, top_directions(covs[m.base_layer], energy)) for m in layers]

    def project() -> None:
        if inner:
            inner()
        with torch.no_grad():
            for weight, u in bases:  # B: (out, r); remove the top output directions
                weight -= u @ (u.T @ weight)

    project()
    return project


if __name__ == "__main__":
    main()
