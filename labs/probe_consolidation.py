"""A quick consolidation probe on the three invented facts of tests/test_e2e_consolidate.py (one memory):
for each recipe, the gate's metrics, closed-book accuracy on 4 cloze probes of the facts, and which of 16
general-knowledge questions the adapter gets wrong that the base model answered. Minutes, not hours: the
first look at a recipe before labs/sweep_consolidation.py.

    MLLM_CACHE=/tmp/mcache .venv/bin/python labs/probe_consolidation.py '{"lr": 3e-4, "epochs": 8}'
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_e2e_consolidate import FACTS, PROBES  # noqa: E402


def main() -> None:
    from memory_llm import MemoryLLM
    from memory_llm.consolidate.gate import Floors
    from memory_llm.consolidate.recipe import Recipe

    configs = sys.argv[1:] or ["{}"]
    work = Path(tempfile.mkdtemp(prefix="probe-consolidation-"))
    facts, gk = work / "facts.jsonl", work / "gk.jsonl"
    facts.write_text("\n".join(json.dumps({"id": f"f{i}", "kind": "cloze", "input": q, "answers": [[a]],
                                           "tags": ["mem"]}) for i, (q, a) in enumerate(PROBES)))
    gk.write_text("\n".join((ROOT / "data" / "general_probes.jsonl").read_text().splitlines()[:16]))
    m = MemoryLLM(work / "home")
    m.learn(text=FACTS, source="pelloria")
    base = m.evaluate(facts, "base")["accuracy"]
    general = m.evaluate(gk, "base")
    print(json.dumps({"base": base, "general": general["accuracy"]}), flush=True)
    for cfg in configs:
        t = time.time()
        s = m.consolidate(full=True, recipe=Recipe.from_dict(json.loads(cfg)), floors=Floors(0, 0, 0, 1))
        closed = m.evaluate(facts, "closed")["accuracy"]
        after = m.evaluate(gk, "closed")
        lost = [b["id"] for b, a in zip(general["probes"], after["probes"]) if b["correct"] and not a["correct"]]
        print(json.dumps({"config": json.loads(cfg), "metrics": s.metrics, "closed": closed, "general_lost": lost,
                          "training": {k: s.training.get(k) for k in ("steps", "tokens_per_s", "loss_last")},
                          "seconds": round(time.time() - t)}), flush=True)


if __name__ == "__main__":
    main()
