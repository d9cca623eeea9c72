"""Router threshold (scaled in place: 1, 0.75, 0.5, 0 × the stored one) against closed-book accuracy on an eval
file, locality on the gate's held-out generic prompts and general-knowledge probes lost, on a consolidated home.
With --band, the router is first refitted on the same adapter scoring that band of layers (as consolidation
fits it: the shipped margin over the calibration generic prompts).

    MLLM_CACHE=/tmp/mcache .venv/bin/python scripts/sweep_fk_threshold.py /tmp/bench-consolidation-XXXX/home \
        /tmp/bench-consolidation-XXXX/r1/eval.jsonl [--factors 1 0.75] [--band 0.47 0.67]
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from memory_llm import MemoryLLM
from memory_llm.consolidate.gate import locality
from memory_llm.consolidate.recipe import Recipe
from memory_llm.consolidate.route import fit_router
from memory_llm.consolidate.run import EVAL_SAMPLE, _sample, generic_prompts
from memory_llm.evaluate import lost

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("home", type=Path)
ap.add_argument("eval", type=Path)
ap.add_argument("--factors", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.0])
ap.add_argument("--band", type=float, nargs=2, default=None, help="refit the router on this band (fractions of depth)")
args = ap.parse_args()

m = MemoryLLM(args.home)
general = ROOT / "data" / "general_probes.jsonl"
base_gk = m.evaluate(general, "base")
m.ask("warm up", use_memory=False, max_new_tokens=1, log=False)
r = m._router
loc_all, loc_eval = generic_prompts()
if args.band:
    recipe = Recipe()
    r.remove()
    items = [i for i in m.store.items(m.store.memory_ids()) if not i.held_out]
    r = m._router = fit_router(m.generator.model, m.generator, loc_all[recipe.locality_prompts:],
                               _sample(items, EVAL_SAMPLE, recipe.seed), recipe.route_margin, args.band)
    print(json.dumps({"band": args.band, "threshold": r.threshold, **r.details}), flush=True)
t0 = r.threshold
for f in args.factors:
    t = time.time()
    r.threshold = t0 * f
    closed = m.evaluate(args.eval, "closed")["by_tag"]
    loc = locality(m.generator, loc_eval, m.generator.model.disable_adapter)
    gk = m.evaluate(general, "closed")
    print(json.dumps({"threshold_x": f, "closed": {k: closed[k] for k in ("mem", "gen", "hard_gen")}, "locality": loc,
                      "general_lost": len(lost(base_gk, gk)), "s": round(time.time() - t)}), flush=True)
