"""Retention on its own: the second round of bench_consolidation.py on a work folder whose first round is done
(e.g. one whose run was stopped in round 2). Learns the next N Fictional Knowledge documents (unless they are
already learned), consolidates them with the shipped recipe (or --recipe), and reports round-1 closed-book
accuracy before and after, round-2 accuracy base / closed, general-knowledge probes lost, and the round's cost.

    MLLM_CACHE=/tmp/mcache .venv/bin/python scripts/bench_round2.py /tmp/bench-consolidation-XXXX --n 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_consolidation import TAGS, PhaseClock, accuracies
from prepare_fictional_knowledge import prepare

from memory_llm.evaluate import lost

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, help="a bench_consolidation.py work folder (home/, r1/) after round 1")
    ap.add_argument("--n", type=int, default=10, help="documents in round 2 (records n..2n-1)")
    ap.add_argument("--recipe", default="{}", help="Recipe overrides as a JSON object (default: the shipped recipe)")
    args = ap.parse_args()

    from memory_llm import MemoryLLM
    from memory_llm.consolidate.gate import Floors, decide
    from memory_llm.consolidate.recipe import Recipe

    recipe = Recipe.from_dict(json.loads(args.recipe))
    m = MemoryLLM(args.work / "home")
    if m.adapters.current_name() is None:
        sys.exit(f"{args.work}: no consolidated adapter; run round 1 first (bench_consolidation.py)")
    general = ROOT / "data" / "general_probes.jsonl"
    r1_eval = args.work / "r1" / "eval.jsonl"
    result: dict = {"adapter_before": m.adapters.current_name(), "general_base": m.evaluate(general, "base")}
    result["acc1_before"] = accuracies(m, r1_eval, ("closed",))["closed"]
    print(json.dumps({"acc1_before": result["acc1_before"]}), flush=True)
    r2_eval = args.work / "r2" / "eval.jsonl"
    dry = m.consolidate(dry_run=True, recipe=recipe)
    if dry.memories == 0:  # round 2 not learned yet
        r2 = prepare(args.n, args.n, args.work / "r2")
        m.learn([r2["docs"]])
    t0, clock = time.time(), PhaseClock()
    s2 = m.consolidate(recipe=recipe, floors=Floors(0.0, 0.0, 0.0, 1.0), progress=clock)
    result.update(round2=s2.as_dict(), round2_s=round(time.time() - t0, 1), phases2=clock.finish(),
                  verdict2=decide(s2.metrics, s2.current_metrics, Floors()) if s2.metrics else (False, [s2.message]))
    m.reload_adapter()
    result["acc1_after"] = accuracies(m, r1_eval, ("closed",))["closed"]
    result["acc2"] = accuracies(m, r2_eval, ("base", "closed"))
    result["general_lost_after_round2"] = lost(result["general_base"], m.evaluate(general, "closed"))
    result["retention_ratio"] = {t: round(result["acc1_after"][t] / result["acc1_before"][t], 3)
                                 if result["acc1_before"].get(t) else None for t in TAGS}
    result.pop("general_base")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
