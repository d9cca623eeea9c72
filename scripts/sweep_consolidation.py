"""Hyper-parameter sweep for the consolidation recipe on Fictional Knowledge records (items synthesized once,
reused by every configuration; each configuration trains from the base model).

    MLLM_CACHE=/tmp/mcache .venv/bin/python scripts/sweep_consolidation.py --n 1 \
        --configs '{"lr": 3e-4}' '{"lr": 1e-3, "locality_weight": 5}'
Prints one JSON line per configuration: gate metrics and closed-book accuracy on the records' probes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_fictional_knowledge import prepare  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--configs", nargs="+", default=['{}'], help="Recipe overrides as JSON objects")
    args = ap.parse_args()

    from memory_llm import MemoryLLM
    from memory_llm.consolidate.gate import Floors
    from memory_llm.consolidate.recipe import Recipe

    work = Path(tempfile.mkdtemp(prefix="sweep-"))
    data = prepare(args.n, 0, work / "fk")
    m = MemoryLLM(work / "home")
    m.learn([data["docs"]])
    base = m.evaluate(data["eval"], "base")["by_tag"]
    print(json.dumps({"config": "base", "by_tag": base}), flush=True)
    open_floors = Floors(reliability=0, locality=0, retention=0, tolerance=1)
    for cfg in args.configs:
        overrides = json.loads(cfg)
        t = time.time()
        s = m.consolidate(full=True, recipe=Recipe(**overrides), floors=open_floors)
        closed = m.evaluate(data["eval"], "closed")["by_tag"] if s.status == "promoted" else None
        print(json.dumps({"config": overrides, "status": s.status, "metrics": s.metrics, "closed": closed,
                          "training": s.training, "seconds": round(time.time() - t)}), flush=True)


if __name__ == "__main__":
    main()
