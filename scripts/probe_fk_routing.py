"""Which prompts route, on a consolidated home (e.g. the one bench_consolidation.py leaves in /tmp): the share of
synthesized qa items (in the form ask uses without retrieval), held-out cloze items, held-out generic prompts and
general-knowledge probes whose score reaches the current adapter's router threshold; and closed-book qa accuracy
routed / adapter always on / base.

    MLLM_CACHE=/tmp/mcache .venv/bin/python scripts/probe_fk_routing.py /tmp/bench-consolidation-XXXX/home
"""
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from memory_llm import MemoryLLM
from memory_llm.consolidate.gate import item_accuracy
from memory_llm.consolidate.recipe import closed_prompt_ids, student_prompt_ids
from memory_llm.consolidate.run import generic_prompts

home = Path(sys.argv[1])
m = MemoryLLM(home)
m.ask("warm up", use_memory=False, max_new_tokens=1, log=False)
r, gen = m.served.router, m.generator
items = m.store.items(m.store.memory_ids())
qa_tr = [i for i in items if i.kind == "qa" and not i.held_out][:64]
qa_ho = [i for i in items if i.kind == "qa" and i.held_out][:64]
cl_ho = [i for i in items if i.kind == "cloze" and i.held_out][:64]
_, loc_eval = generic_prompts()
gk = [json.loads(l)["input"] for l in (ROOT / "data" / "general_probes.jsonl").read_text().splitlines()]
sets = {"qa trained": [student_prompt_ids(gen, i) for i in qa_tr], "qa held-out": [student_prompt_ids(gen, i) for i in qa_ho],
        "cloze held-out (raw)": [student_prompt_ids(gen, i) for i in cl_ho],
        "generic held-out": [closed_prompt_ids(gen, p) for p in loc_eval], "general knowledge": [closed_prompt_ids(gen, p) for p in gk]}
out = {"threshold": r.threshold}
for k, seqs in sets.items():
    s = r.scores(seqs)
    out[k] = {"n": len(s), "median": statistics.median(s), "routed": round(sum(x >= r.threshold for x in s) / len(s), 3)}
out["qa_heldout_acc_routed"] = item_accuracy(gen, qa_ho)
out["qa_trained_acc_routed"] = item_accuracy(gen, qa_tr)
r.remove()
out["qa_heldout_acc_always_on"] = item_accuracy(gen, qa_ho)
out["qa_trained_acc_always_on"] = item_accuracy(gen, qa_tr)
with gen.model.disable_adapter():
    out["qa_heldout_acc_base"] = item_accuracy(gen, qa_ho)
    out["qa_trained_acc_base"] = item_accuracy(gen, qa_tr)
print(json.dumps(out, indent=1))
