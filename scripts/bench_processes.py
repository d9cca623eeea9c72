#!/usr/bin/env python
"""Consolidation in 2 processes vs 1, on the real default model: the same home, copied before the round.

--docs Fictional Knowledge documents are learned into one home and consolidated once (that round synthesizes the
training items, which the home keeps); the home is copied, and `mllm consolidate --full` retrains from the same
items in 1 process on one copy and `--processes 2` on the other (one after the other, alone on the machine).
Reported: status and gate metrics of both, the LoRA weights' largest relative difference per tensor
(||w2 - w1|| / ||w1||), training steps and tokens/s, and wall time of the whole command.

    MLLM_CACHE=/tmp/mcache .venv/bin/python scripts/bench_processes.py --write
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _benchmd import command_line, log, machine, table, today, write_section  # noqa: E402


def consolidate(home: Path, processes: int, extra: list[str]) -> tuple[dict, float]:
    mllm = Path(sys.executable).parent / "mllm"
    cmd = [str(mllm), "consolidate", "--json", "--home", str(home), *extra] + (
        ["--processes", str(processes)] if processes > 1 else [])
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr[-2000:]}")
    return json.loads(out.stdout), wall


def weights(home: Path) -> dict:
    from safetensors.numpy import load_file

    current = (home / "adapters" / "current").read_text().strip()
    if not current:  # rejected: the candidate is gone; nothing to compare
        return {}
    return load_file(str(home / "adapters" / current / "adapter_model.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=2, help="Fictional Knowledge documents to learn (default 2)")
    p.add_argument("--write", action="store_true", help="replace the section in BENCHMARKS.md")
    args = p.parse_args()
    from prepare_fictional_knowledge import prepare

    import numpy as np

    with tempfile.TemporaryDirectory(prefix="bench-processes-") as tmp:
        work = Path(tmp)
        prepare(args.docs, out=work / "fk")
        one, two = work / "one", work / "two"
        subprocess.run([str(Path(sys.executable).parent / "mllm"), "learn", str(work / "fk" / "docs"), "--home",
                        str(one)], check=True, capture_output=True)
        log("a first round synthesizes the training items (kept in the home)")
        first, first_wall = consolidate(one, 1, [])
        log(f"first round: {first['status']} in {first_wall:.0f}s")
        shutil.copytree(one, two)
        runs = {}
        for n, home in ((1, one), (2, two)):
            log(f"{n} process(es): consolidate --full")
            runs[n] = consolidate(home, n, ["--full"])
            log(f"{n}: {runs[n][0]['status']} in {runs[n][1]:.0f}s")
        w1, w2 = weights(one), weights(two)
        worst = max((float(np.linalg.norm(w2[k] - w1[k]) / max(np.linalg.norm(w1[k]), 1e-12)) for k in w1),
                    default=float("nan")) if w1 and w2 and w1.keys() == w2.keys() else float("nan")
    rows = []
    for n, (s, wall) in runs.items():
        t = s.get("training") or {}
        m = s.get("metrics") or {}
        rows.append([n, s["status"], t.get("steps"), t.get("tokens_per_s"), f"{t.get('loss_first')} → "
                     f"{t.get('loss_last')}", m.get("reliability"), m.get("locality"), f"{wall:.0f}"])
    headers = ["processes", "status", "steps", "tokens/s", "loss", "reliability", "locality", "wall s"]
    metrics_equal = all((runs[1][0].get("metrics") or {}).get(k) == v
                        for k, v in (runs[2][0].get("metrics") or {}).items())
    body = (f"{today()}, {machine()}. `{command_line()}`\n\n{table(headers, rows)}\n\n"
            f"LoRA weights, 2 processes vs 1: largest relative difference of a tensor **{worst:.2e}**; gate metrics"
            f" {'equal' if metrics_equal else 'differ'} ({len(runs[2][0].get('metrics') or {})} compared). "
            f"{args.docs} Fictional Knowledge documents, the default model and recipe; both rounds are `--full` rebuilds"
            f" from the items a first round synthesized ({first_wall:.0f} s); 2 processes = 2 ranks over"
            f" gloo on the same 2 cores (each rank one thread), so no speed-up is expected here: the figure is the"
            f" cost of the launch. On GPUs each rank has its own device.")
    print(body)
    if args.write:
        write_section("Consolidation in several processes (issue 20)", body)


if __name__ == "__main__":
    main()
