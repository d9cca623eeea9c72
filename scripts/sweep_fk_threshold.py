"""Router threshold (scaled in place: 1, 0.75, 0.5, 0 × the stored one) against closed-book accuracy on an eval
file, locality on the gate's held-out generic prompts and general-knowledge probes lost, on a consolidated home.

    MLLM_CACHE=/tmp/mcache .venv/bin/python scripts/sweep_fk_threshold.py /tmp/bench-consolidation-XXXX/home \
        /tmp/bench-consolidation-XXXX/r1/eval.jsonl
"""
import json
import time
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from memory_llm.evaluate import lost
from memory_llm import MemoryLLM
from memory_llm.consolidate.gate import locality
from memory_llm.consolidate.run import generic_prompts
home, ev = Path(sys.argv[1]), Path(sys.argv[2])
m = MemoryLLM(home)
general = ROOT / "data" / "general_probes.jsonl"
base_gk = m.evaluate(general, "base")
m.ask("warm up", use_memory=False, max_new_tokens=1, log=False)
r = m._router
t0 = r.threshold
_, loc_eval = generic_prompts()
for f in (1.0, 0.75, 0.5, 0.0):
    t = time.time()
    r.threshold = t0 * f
    closed = m.evaluate(ev, "closed")["by_tag"]
    loc = locality(m.generator, loc_eval, m.generator.model.disable_adapter)
    gk = m.evaluate(general, "closed")
    print(json.dumps({"threshold_x": f, "closed": {k: closed[k] for k in ("mem", "gen", "hard_gen")}, "locality": loc,
                      "general_lost": len(lost(base_gk, gk)), "s": round(time.time() - t)}), flush=True)
