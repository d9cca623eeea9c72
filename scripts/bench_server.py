#!/usr/bin/env python
"""`mllm serve` vs the library in-process: time to the first streamed token and total for one request, and
throughput with concurrent clients.

A fresh home learns data/sample. The server is a real `mllm serve` process on a free localhost port, called over
HTTP (httpx; streamed as server-sent events); in-process is MemoryLLM.chat in this process (models loaded and
warmed). Same question, same greedy decoding, same max tokens, so both produce the same tokens.
  single: --runs interleaved runs each; first token = first content delta (server) / first text piece
          (in-process); medians.
  throughput: --clients concurrent clients, each sending --per-client non-streamed requests, vs the same number
          of requests one after another in-process. The server serializes generation (one worker), so the
          expected ratio is ~1: the figure shows the HTTP + queueing overhead and the latency clients see.

    MLLM_CACHE=/tmp/mcache .venv/bin/python scripts/bench_server.py --write
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchmd import command_line, free_port, log, machine, median, table, today, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
QUESTION = "When did the Larkspur Observatory open, and who founded it?"
SECTION = "Server: mllm serve vs the library in-process"


def body(max_tokens: int, stream: bool) -> dict:
    return {"model": "mllm", "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": QUESTION}]}


def server_stream(client, base: str, max_tokens: int) -> tuple[float, float, str]:
    import json

    t0 = time.perf_counter()
    first, parts = None, []
    with client.stream("POST", base + "/v1/chat/completions", json=body(max_tokens, True)) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            piece = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if piece:
                first = first or time.perf_counter()
                parts.append(piece)
    end = time.perf_counter()
    return (first or end) - t0, end - t0, "".join(parts).strip()


def inproc_stream(m, max_tokens: int) -> tuple[float, float, str]:
    t0 = time.perf_counter()
    first = None
    stream = m.chat([{"role": "user", "content": QUESTION}], max_new_tokens=max_tokens)
    for _ in stream:
        first = first or time.perf_counter()
    end = time.perf_counter()
    return (first or end) - t0, end - t0, stream.answer.text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="single-request runs each (default 3)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    ap.add_argument("--per-client", type=int, default=2, help="requests per client (default 2)")
    ap.add_argument("--max-tokens", type=int, default=24, help="max new tokens per answer (default 24)")
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLLM_CACHE", "/tmp/mcache")
    import httpx

    from memory_llm import MemoryLLM

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mllm-bench-server-") as tmp:
        home = Path(tmp) / "home"
        m = MemoryLLM(home)
        m.learn([SAMPLE])
        m.chat([{"role": "user", "content": QUESTION}], max_new_tokens=4).result()  # warm up
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "memory_llm", "serve", "--home", str(home), "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            client = httpx.Client(timeout=600)
            t0 = time.perf_counter()
            while True:
                try:
                    if client.get(base + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None:
                    raise SystemExit("the server exited")
                if time.perf_counter() - t0 > 300:
                    raise SystemExit("the server did not answer /health within 300 s")
                time.sleep(0.3)
            log(f"server up in {time.perf_counter() - t0:.1f} s")
            server_stream(client, base, 4)  # warm up

            single = {"server": [], "inproc": []}
            texts = set()
            for run in range(args.runs):
                for name, fn in (("server", lambda: server_stream(client, base, args.max_tokens)),
                                 ("inproc", lambda: inproc_stream(m, args.max_tokens))):
                    first, total, text = fn()
                    single[name].append((first, total))
                    texts.add(text)
                    log(f"single {name} run {run}: first {first:.2f} s, total {total:.2f} s")
            n_tokens = m.generator.count_tokens(next(iter(texts)))

            n = args.clients * args.per_client
            latencies: list[float] = []
            tokens = [0]
            lock = threading.Lock()

            def client_loop() -> None:
                with httpx.Client(timeout=900) as c:
                    for _ in range(args.per_client):
                        t = time.perf_counter()
                        r = c.post(base + "/v1/chat/completions", json=body(args.max_tokens, False))
                        r.raise_for_status()
                        with lock:
                            latencies.append(time.perf_counter() - t)
                            tokens[0] += r.json()["usage"]["completion_tokens"]

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            server_wall = time.perf_counter() - t0
            log(f"throughput server: {n} requests in {server_wall:.1f} s")
            t0 = time.perf_counter()
            inproc_lat = []
            for _ in range(n):
                t = time.perf_counter()
                m.chat([{"role": "user", "content": QUESTION}], max_new_tokens=args.max_tokens).result()
                inproc_lat.append(time.perf_counter() - t)
            inproc_wall = time.perf_counter() - t0
            log(f"throughput in-process: {n} requests in {inproc_wall:.1f} s")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        m.close()
    load_end = os.getloadavg()

    sf, st = median([f for f, _ in single["server"]]), median([t for _, t in single["server"]])
    pf, pt = median([f for f, _ in single["inproc"]]), median([t for _, t in single["inproc"]])
    rows = [["one request: first token (s)", sf, pf, sf / pf],
            ["one request: total (s)", st, pt, st / pt],
            [f"{n} requests, {args.clients} concurrent clients vs sequential: wall (s)", server_wall, inproc_wall,
             server_wall / inproc_wall],
            ["  requests per minute", 60 * n / server_wall, 60 * n / inproc_wall, inproc_wall / server_wall],
            ["  completion tokens per second", tokens[0] / server_wall, n * n_tokens / inproc_wall,
             (tokens[0] / server_wall) / (n * n_tokens / inproc_wall)],
            ["  latency a client sees, median (s)", median(latencies), median(inproc_lat),
             median(latencies) / median(inproc_lat)],
            ["  latency a client sees, max (s)", max(latencies), max(inproc_lat), max(latencies) / max(inproc_lat)]]
    text = "\n".join([
        f"Command: `MLLM_CACHE=<cache> {command_line()}`  ",
        f"Date: {today()}. Machine: {machine()}, shared: load average {load_start[0]:.1f} at the start and "
        f"{load_end[0]:.1f} at the end (another engineer's training run), so absolute times are inflated and noisy; "
        "the ratios are the figures to read.  ",
        f"Request: \"{QUESTION}\" on a home that learned data/sample; greedy, max {args.max_tokens} new tokens "
        f"({n_tokens} generated, identical text {'in every run' if len(texts) == 1 else 'NOT in every run'}). "
        f"Single request: {args.runs} interleaved runs each, medians. Server: `mllm serve` in its own process, "
        "httpx client, streamed (SSE) for the single request, non-streamed for throughput. In-process: "
        "MemoryLLM.chat in the benchmark process.",
        "",
        table(["", "server", "in-process", "server / in-process"], rows),
        "",
        "The server runs one generation at a time (a single worker thread; see memory_llm/server.py), so with "
        f"{args.clients} concurrent clients requests queue: throughput stays that of one generation stream and the "
        "latency a client sees grows with its place in the queue. Two generations at once on 2 cores would only "
        "slow each other down, and the model is not safe for concurrent `generate`.",
    ])
    print(text)
    if args.write:
        write_section(SECTION, text)
        log("wrote BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
