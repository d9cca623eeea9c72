#!/usr/bin/env python
"""`mllm ask` cold and with a resident `mllm serve` of the home (issue 21: cold first byte ≤ 3 s; with the server
up, first byte ≤ 0.3× cold).

On a home that learned data/sample, --runs runs of each, after one warm-up each, interleaved; run i asks
question i of bench_server's 8 distinct questions in every variant:
  cold, llama.cpp      `mllm ask Q --local`: a new process; no adapter is current, so it embeds the question in
                       numpy and generates with llama.cpp (cold_backend = llama.cpp, the default)
  cold, transformers   the same with MLLM_COLD_BACKEND=transformers: torch, transformers and the dense checkpoint
  resident server      `mllm serve` up for the home: the CLI finds server.json and streams the answer from it; the
                       question is new to the server: only what its prompt shares with earlier ones (the system
                       prompt; sources in the same order) is not computed again (batching_llamacpp)
  resident, asked again  the same question once more: the server's llama.cpp sequence holds its prompt (all but
                       the last 16 tokens are not computed again)
Wall time from Popen to the first stdout byte and to exit (bench_ask.run_cli); medians.

    MLLM_CACHE=/tmp/mcache .venv/bin/python scripts/bench_resident.py [--runs 5] [--write]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchmd import command_line, free_port, log, machine, median, table, today, write_section  # noqa: E402
from bench_ask import BIN, SAMPLE, child_env, run_cli  # noqa: E402
from bench_server import QUESTIONS  # noqa: E402


def serve(home: Path) -> subprocess.Popen:
    """`mllm serve` of the home, once it answers /health."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "mllm"), "serve", "--home", str(home), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env())
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"mllm serve failed: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("mllm serve did not start in 300 s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--write", action="store_true", help="replace the section in BENCHMARKS.md")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        subprocess.run([str(BIN / "mllm"), "learn", str(SAMPLE), "--home", str(home)], check=True,
                       capture_output=True, env=child_env())
        server = serve(home)
        try:
            variants = {"cold, llama.cpp (--local)": (("--local",), "llama.cpp"),
                        "cold, transformers (--local, MLLM_COLD_BACKEND=transformers)": (("--local",), "transformers"),
                        "resident server": ((), "llama.cpp"),
                        "resident server, the question asked again": ((), "llama.cpp")}
            runs: dict[str, list[dict]] = {name: [] for name in variants}
            for i in range(args.runs + 1):  # the first of each is a warm-up
                for name, (extra, backend) in variants.items():
                    os.environ["MLLM_COLD_BACKEND"] = backend  # child_env() copies it to the CLI
                    r = run_cli(home, argparse.Namespace(**vars(args), question=QUESTIONS[i % len(QUESTIONS)]), False,
                                extra)
                    if i:
                        runs[name].append(r)
                if i:
                    log("run %d: %s" % (i, ", ".join(f"{n.split(' (')[0]} {rs[-1]['first_byte']:.2f} s"
                                                     for n, rs in runs.items())))
        finally:
            os.environ.pop("MLLM_COLD_BACKEND", None)
            server.terminate()
            server.wait(30)
    first = {name: median([r["first_byte"] for r in rs]) for name, rs in runs.items()}
    llama, torch_cold = first["cold, llama.cpp (--local)"], first[list(variants)[1]]
    rows = [[name, len(rs), f"{first[name]:.2f}", f"{median([r['wall'] for r in rs]):.2f}",
             f"{median([r['rss_mb'] for r in rs]):.0f}", f"{first[name] / llama:.2f}", f"{first[name] / torch_cold:.2f}"]
            for name, rs in runs.items()]
    body = (f"Measured {today()} on {machine()}: `{command_line()}`; `mllm ask` with --max-new-tokens"
            f" {args.max_new_tokens} on a home that learned data/sample (no adapter), a new process each run, run i"
            " asking question i of bench_server's 8 distinct questions in every variant, medians.\n\n"
            + table(["mllm ask", "runs", "first byte s", "total s", "CLI peak RSS MB", "÷ cold llama.cpp",
                     "÷ cold transformers"], rows))
    print(body)
    if args.write:
        write_section("ask through a resident server", body)


if __name__ == "__main__":
    main()
