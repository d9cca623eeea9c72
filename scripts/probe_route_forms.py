"""Routing by prompt form: the share of chat-form and raw-form prompts (generic, synthesized qa, FK eval) whose
router score, max- or mean-pooled over tokens (layers 12-17, every module), reaches 1.25 x the highest score of
the calibration generic prompts in chat form (as shipped) or in raw form. Lab script for BENCHMARKS.md.

    MLLM_CACHE=/tmp/mcache .venv/bin/python scripts/probe_route_forms.py HOME EVAL
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_fk_signals import band_score, token_stats

from memory_llm import MemoryLLM
from memory_llm.consolidate.recipe import closed_prompt_ids, student_prompt_ids
from memory_llm.consolidate.run import generic_prompts

home, eval_file = Path(sys.argv[1]), Path(sys.argv[2])
m = MemoryLLM(home)
m.ask("warm up", use_memory=False, max_new_tokens=1, log=False)
r, gen = m.served.router, m.generator
loc_all, loc_eval = generic_prompts()
items = m.store.items(m.store.memory_ids())
qa_tr = [i for i in items if i.kind == "qa" and not i.held_out][:64]
qa_ho = [i for i in items if i.kind == "qa" and i.held_out][:64]
fk = [json.loads(line)["input"] for line in eval_file.read_text(encoding="utf-8").splitlines() if line.strip()]


def raw(text):
    return gen.tokenizer(text, add_special_tokens=False)["input_ids"]


sets = {"calib": [closed_prompt_ids(gen, p) for p in loc_all[40:]],
        "generic held-out chat": [closed_prompt_ids(gen, p) for p in loc_eval],
        "generic held-out RAW": [raw(p) for p in loc_eval],
        "qa trained chat": [student_prompt_ids(gen, i) for i in qa_tr],
        "qa held-out chat": [student_prompt_ids(gen, i) for i in qa_ho],
        "qa held-out RAW": [raw(i.prompt) for i in qa_ho],
        "calib RAW": [raw(p) for p in loc_all[40:]],
        "FK eval RAW": [raw(p) for p in fk]}
st = {k: token_stats(r, v) for k, v in sets.items()}
for pool in ("max", "mean"):
    score = band_score(r, 12, 18, "all", pool)
    s = {k: [score(t) for t in v] for k, v in st.items()}
    for calib in ("calib", "calib RAW"):
        thr = 1.25 * max(s[calib])
        print(pool, "calibrated on", calib, json.dumps({k: round(sum(x >= thr for x in v) / len(v), 3)
                                                        for k, v in s.items()}), flush=True)
