"""Per-probe data for choosing among stacked adapters (BENCHMARKS.md, "Choosing the stacked adapter"): each
router's activation score (its adapter alone) and closed-book correctness with each adapter forced alone and with
none, on round-1 (WORK/r1) and round-2 (WORK/r2) probes of a two-round home (WORK/home, from bench_round2.py).
Usage: MLLM_CACHE=... python scripts/probe_stack_oracle.py WORK OUT.json"""
import json, sys, time
from pathlib import Path
import torch
from memory_llm import MemoryLLM
from memory_llm import evaluate as ev
import memory_llm.adapters.routing as R
import memory_llm.adapters.stack as S

FORCE = {"k": None}
orig = S.RouterStack._route

def patched(self, mod, args, kwargs):
    if FORCE["k"] is None:
        return orig(self, mod, args, kwargs)
    if any(r.busy for r in self.routers) or R._decoding(kwargs):
        return None
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    n = input_ids.shape[0]
    for k, r in enumerate(self.routers):
        r.gate = R.Router.gate_of([k == FORCE["k"]] * n, input_ids.device)
    return None

S.RouterStack._route = patched
work, out_path = Path(sys.argv[1]), sys.argv[2]
m = MemoryLLM(work / "home")
m.generator  # load
stack = m.served.router
routers = stack.routers
print("routers", [r._name for r in routers], [r.threshold for r in routers], flush=True)
data = {"names": [r._name for r in routers], "thresholds": [r.threshold for r in routers], "sets": {}}
tok = m.generator.tokenizer
for rnd in ("r1", "r2"):
    probes = ev.load_probes(work / rnd / "eval.jsonl")
    rec = {"ids": [p.id for p in probes], "tags": [p.tags[0] for p in probes], "scores": [], "correct": {}}
    for p in probes:
        ids = torch.tensor([tok(p.input, add_special_tokens=False)["input_ids"]])
        row = []
        for r in routers:
            for o in routers:
                o.gate = R.Router.gate_of([False], ids.device)
            row.append(r.scores([ids[0].tolist()], batch_size=1)[0])
        rec["scores"].append(row)
    for k in list(range(len(routers))) + [-1]:
        FORCE["k"] = k
        t = time.time()
        res = m.evaluate(work / rnd / "eval.jsonl", "closed")
        rec["correct"][str(k)] = [r["correct"] for r in res["probes"]]
        print(rnd, k, {t: res["by_tag"][t] for t in ("mem", "gen", "hard_gen")}, round(time.time() - t), flush=True)
    FORCE["k"] = None
    data["sets"][rnd] = rec
    Path(out_path).write_text(json.dumps(data))
print("done", flush=True)
