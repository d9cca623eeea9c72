"""Hyper-parameter sweep for the consolidation recipe on Fictional Knowledge records. Items are synthesized
once and kept in the work folder's home, so every configuration (and a later rerun with --work) trains on the
same items, each from the base model.

    MLLM_CACHE=/tmp/mcache .venv/bin/python labs/sweep_consolidation.py --n 2 --work /tmp/sweep \
        --configs '{"lr": 3e-4}' '{"lr": 1e-3, "locality_weight": 5}'
Prints one JSON line per configuration: gate metrics, closed-book accuracy on the records' probes, and
general-knowledge accuracy on data/general_probes.jsonl (the base model answers all 80).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from prepare_fictional_knowledge import prepare  # noqa: E402

GENERAL = Path(__file__).resolve().parents[1] / "data" / "general_probes.jsonl"


def _progress(phase: str, done: int, total: int) -> None:
    if done == total or done % 10 == 0:
        print(f"  {time.strftime('%H:%M:%S')} {phase} {done}/{total}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1, help="Fictional Knowledge records")
    ap.add_argument("--work", type=Path, default=None, help="folder kept between runs (items are reused)")
    ap.add_argument("--configs", nargs="+", default=['{}'], help="Recipe overrides as JSON objects")
    args = ap.parse_args()

    from memory_llm import MemoryLLM
    from memory_llm.consolidate.gate import Floors
    from memory_llm.consolidate.recipe import Recipe

    work = args.work or Path(tempfile.mkdtemp(prefix="sweep-"))
    data = prepare(args.n, 0, work / "fk")
    m = MemoryLLM(work / "home")
    if not m.store.memory_ids():
        m.learn([data["docs"]])
    base = m.evaluate(data["eval"], "base")["by_tag"]
    print(json.dumps({"config": "base", "by_tag": base, "memories": len(m.store.memory_ids())}), flush=True)
    open_floors = Floors(reliability=0, locality=0, retention=0, tolerance=1)
    for cfg in args.configs:
        overrides = json.loads(cfg)
        t = time.time()
        s = m.consolidate(full=True, recipe=Recipe(**overrides), floors=open_floors, progress=_progress)
        row = {"config": overrides, "status": s.status, "metrics": s.metrics, "training": s.training,
               "seconds": round(time.time() - t)}
        if s.status == "promoted":
            row["closed"] = m.evaluate(data["eval"], "closed")["by_tag"]
            row["general"] = m.evaluate(GENERAL, "closed")["accuracy"]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
