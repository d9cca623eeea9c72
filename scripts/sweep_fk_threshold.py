"""Router threshold (scaled in place: 1, 0.75, 0.5, 0 × the stored one) against closed-book accuracy on an eval
file, locality on the gate's held-out generic prompts and general-knowledge probes lost, on a consolidated home.
With --refit, the same rows follow for the router refitted on the same adapter as consolidation now fits it
(the shipped recipe's margin, band and pooling, with one threshold per prompt form); --band refits it on another band
of layers. With --chat, the eval file's probes are also asked as chat questions
(prepare_fictional_knowledge.chat_probes, `ask`'s form): base and rag once, closed at each row. Each row also
has the gate's reliability on the trained items (run.py's sample). A router with a raw-text threshold is then
tried with its chat threshold for raw prompts too, as the shipped recipe fits it (Recipe.route_per_form is off):
raw closed accuracy and reliability only, since chat prompts route as before.

    MLLM_CACHE=/tmp/mcache .venv/bin/python scripts/sweep_fk_threshold.py /tmp/bench-consolidation-XXXX/home \
        /tmp/bench-consolidation-XXXX/r1/eval.jsonl [--factors 1 0.75] [--refit] [--band 0.47 0.67] [--chat]
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from prepare_fictional_knowledge import chat_probes

from memory_llm import MemoryLLM
from memory_llm.consolidate.gate import item_accuracy, locality
from memory_llm.consolidate.recipe import Recipe
from memory_llm.consolidate.calibrate import fit_router
from memory_llm.consolidate.run import EVAL_SAMPLE, _cap_per_memory, _sample, calibration_prompts, generic_prompts
from memory_llm.evaluate import lost
from memory_llm.generate import sources_marker

TAGS = ("mem", "gen", "hard_gen")

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("home", type=Path)
ap.add_argument("eval", type=Path)
ap.add_argument("--factors", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.0])
ap.add_argument("--refit", action="store_true", help="refit the router as consolidation now fits it")
ap.add_argument("--band", type=float, nargs=2, default=None, help="refit the router on this band (fractions of depth)")
ap.add_argument("--chat", action="store_true", help="also ask the probes in chat form")
args = ap.parse_args()

m = MemoryLLM(args.home)
general = ROOT / "data" / "general_probes.jsonl"
base_gk = m.evaluate(general, "base")
m.ask("warm up", use_memory=False, max_new_tokens=1, log=False)
r = m.served.router
loc_eval = generic_prompts()[1]
recipe = Recipe()
items = _cap_per_memory([i for i in m.store.items(m.store.memory_ids()) if not i.held_out],
                        recipe.max_items_per_memory, recipe.seed)
sample = _sample(items, EVAL_SAMPLE, recipe.seed)  # the gate's reliability sample, as run.py draws it
chat = chat_probes(args.eval) if args.chat else None


def sweep_row(router: str, f: float, t: float) -> None:
    closed = m.evaluate(args.eval, "closed")["by_tag"]
    loc = locality(m.generator, loc_eval, m.generator.model.disable_adapter)
    gk = m.evaluate(general, "closed")
    row = {"router": router, "threshold_x": f, "closed": {k: closed[k] for k in TAGS}, "locality": loc,
           "general_lost": len(lost(base_gk, gk)), "reliability": item_accuracy(m.generator, sample)}
    if chat:
        row["chat_closed"] = {k: v for k, v in m.evaluate(chat, "closed")["by_tag"].items() if k in TAGS}
    print(json.dumps({**row, "s": round(time.time() - t)}), flush=True)


if chat:
    print(json.dumps({f"chat_{mode}": {k: v for k, v in m.evaluate(chat, mode)["by_tag"].items() if k in TAGS}
                      for mode in ("base", "rag")}), flush=True)


def refit():
    """The stored router replaced by one fitted as consolidation now fits it (on --band if given)."""
    m.served.router.remove()
    r = m.served.router = fit_router(m.generator.model, m.generator, calibration_prompts(recipe), sample,
                               recipe.route_margin, args.band or recipe.route_band, recipe.route_pool,
                               per_form=True)
    r.veto = sources_marker(m.generator.tokenizer)
    print(json.dumps({"refit": True, "band": args.band or recipe.route_band, "pool": r.pool,
                      "threshold": r.threshold, "raw_threshold": r.raw_threshold, **r.details}), flush=True)
    return r


routers = [("stored", lambda: r)] + ([("refit", refit)] if args.band or args.refit else [])
for name, make in routers:
    router = make()
    t0, raw0 = router.threshold, router.raw_threshold
    for f in args.factors:
        t = time.time()
        router.threshold, router.raw_threshold = t0 * f, None if raw0 is None else raw0 * f
        sweep_row(name, f, t)
    if raw0 is not None:  # the refitted router with the chat threshold for raw prompts too (the eval file's form)
        t = time.time()
        router.threshold, router.raw_threshold = t0, None
        closed = m.evaluate(args.eval, "closed")["by_tag"]
        print(json.dumps({"router": f"{name}, one threshold", "closed": {k: closed[k] for k in TAGS},
                          "reliability": item_accuracy(m.generator, sample), "s": round(time.time() - t)}), flush=True)

