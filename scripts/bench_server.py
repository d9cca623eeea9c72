#!/usr/bin/env python
"""`mllm serve` vs the library in-process: time to the first streamed token and total for one request, and
throughput with concurrent clients.

A fresh home learns data/sample. The server is a real `mllm serve` process on a free localhost port, called over
HTTP (httpx; streamed as server-sent events); in-process is MemoryLLM.chat in this process (models loaded and
warmed). Same question, same greedy decoding, same max tokens, so both produce the same tokens.
  single: --runs interleaved runs each; first token = first content delta (server) / first text piece
          (in-process); medians.
  under load: for each of --clients (1,4,8) that many concurrent clients, each streaming --per-client requests,
          vs the same requests one after another in-process; the server batches concurrent answers
          (memory_llm.batching, continuous), so the ratio is the speed-up clients get, with the first-token and
          total times they see; the prefill floor is the limit batching cannot go under on this CPU.

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
QUESTIONS = [QUESTION,  # the requests under load cycle through these (distinct prompts: no shared-prompt shortcut)
             "Who is the current director of the Larkspur Observatory?",
             "What is the capital of Orrin?",
             "When is the weekly planning meeting, and where?",
             "Who handles expense claims, and by when?",
             "What is the local dish of Orrin?",
             "When did the railway reach Sallow Ford?",
             "What is the Marrow Refractor?"]
SECTION = "Server: mllm serve vs the library in-process"


def body(max_tokens: int, stream: bool, question: str = QUESTION) -> dict:
    return {"model": "mllm", "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": question}]}


def server_stream(client, base: str, max_tokens: int, question: str = QUESTION) -> tuple[float, float, str]:
    import json

    t0 = time.perf_counter()
    first, parts = None, []
    with client.stream("POST", base + "/v1/chat/completions", json=body(max_tokens, True, question)) as r:
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


def inproc_stream(m, max_tokens: int, question: str = QUESTION) -> tuple[float, float, str]:
    t0 = time.perf_counter()
    first = None
    stream = m.chat([{"role": "user", "content": question}], max_new_tokens=max_tokens)
    for _ in stream:
        first = first or time.perf_counter()
    end = time.perf_counter()
    return (first or end) - t0, end - t0, stream.answer.text


def prefill_seconds(m, question: str) -> float:
    """The limit for one request: a lone forward pass over its prompt (what batching cannot share on a CPU whose
    cores a single prefill already fills), on the in-process model (torch or llama.cpp), median of 3."""
    from memory_llm.config import DEFAULT_NAMESPACE

    ids = m.answerer.prepare(question, k=None, namespace=DEFAULT_NAMESPACE, use_memory=True).ids  # ask's own prompt
    gen, times = m.generator, []
    for _ in range(3):
        t0 = time.perf_counter()
        if hasattr(gen.model, "parameters"):
            import torch

            with torch.inference_mode():
                gen.model(input_ids=ids.to(gen.device))
        else:
            gen.llm.reset()
            gen.llm.eval([int(t) for t in ids[0]])
        times.append(time.perf_counter() - t0)
    return median(times)


PREFILL: dict[str, float] = {}  # question -> prefill_seconds, measured once before the load runs


def under_load(m, base: str, clients: int, per_client: int, max_tokens: int) -> dict:
    """`clients` concurrent streaming clients, `per_client` requests each (cycling through QUESTIONS), against the
    same requests in a row in-process: walls, first-token and total medians, tokens per second."""
    import httpx

    seen: list[tuple[float, float, str]] = []
    lock = threading.Lock()
    asked = [QUESTIONS[i % len(QUESTIONS)] for i in range(clients * per_client)]

    def client_loop(c_index: int) -> None:
        with httpx.Client(timeout=900) as c:
            for r in range(per_client):
                got = server_stream(c, base, max_tokens, asked[c_index * per_client + r])
                with lock:
                    seen.append(got)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    done = [inproc_stream(m, max_tokens, q) for q in asked]
    inproc_wall = time.perf_counter() - t0
    count = m.generator.count_tokens
    batches = httpx.get(base + "/health").json().get("largest_batch", "-")
    floor = sum(PREFILL[q] for q in asked)
    return {"server_wall": server_wall, "inproc_wall": inproc_wall, "floor": floor, "first_p50": median([f for f, _, _ in seen]),
            "total_p50": median([t for _, t, _ in seen]), "tokens_s": sum(count(x) for _, _, x in seen) / server_wall,
            "inproc_tokens_s": sum(count(x) for _, _, x in done) / inproc_wall, "batches": batches}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="single-request runs each (default 3)")
    ap.add_argument("--clients", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4, 8],
                    help="concurrent clients, a comma-separated list (default 1,4,8)")
    ap.add_argument("--per-client", type=int, default=2, help="requests per client (default 2)")
    ap.add_argument("--max-tokens", type=int, default=24, help="max new tokens per answer (default 24)")
    ap.add_argument("--backend", choices=["llama.cpp", "transformers"], default="llama.cpp",
                    help="what generates, in the server and in-process alike (cold_backend; default llama.cpp, what"
                         " `mllm serve` runs while no adapter is current)")
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLLM_CACHE", "/tmp/mcache")
    os.environ["MLLM_COLD_BACKEND"] = args.backend
    import httpx

    from memory_llm import MemoryLLM

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mllm-bench-server-") as tmp:
        home = Path(tmp) / "home"
        m = MemoryLLM(home, quick_start=True)  # the backend the server runs (quick_start: cold_backend applies)
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

            for q in QUESTIONS:
                PREFILL[q] = prefill_seconds(m, q)
            log("prefill s: " + ", ".join(f"{v:.2f}" for v in PREFILL.values()))
            loads = {}
            for clients in args.clients:
                loads[clients] = under_load(m, base, clients, args.per_client, args.max_tokens)
                log(f"{clients} clients: server {loads[clients]['server_wall']:.1f} s, sequential in-process"
                    f" {loads[clients]['inproc_wall']:.1f} s")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        m.close()
    load_end = os.getloadavg()

    sf, st = median([f for f, _ in single["server"]]), median([t for _, t in single["server"]])
    pf, pt = median([f for f, _ in single["inproc"]]), median([t for _, t in single["inproc"]])
    rows = [["one request: first token (s)", f"{sf:.2f}", f"{pf:.2f}", f"{sf / pf:.2f}"],
            ["one request: total (s)", f"{st:.2f}", f"{pt:.2f}", f"{st / pt:.2f}"]]
    load_rows = [[c, c * args.per_client, f"{r['server_wall']:.1f}", f"{r['inproc_wall']:.1f}",
                  f"**{r['server_wall'] / r['inproc_wall']:.2f}**", f"{r['first_p50']:.2f}", f"{r['total_p50']:.2f}",
                  f"{r['tokens_s']:.1f}", f"{r['inproc_tokens_s']:.1f}", r["batches"],
                  f"{r['floor']:.1f} ({r['floor'] / r['inproc_wall']:.2f}×)"]
                 for c, r in loads.items()]
    text = "\n".join([
        f"Command: `MLLM_CACHE=<cache> {command_line()}`  ",
        f"Date: {today()}. Machine: {machine()}; load average {load_start[0]:.1f} at the start and "
        f"{load_end[0]:.1f} at the end.  ",
        f"Request: \"{QUESTION}\" on a home that learned data/sample; greedy, max {args.max_tokens} new tokens "
        f"({n_tokens} generated, identical text {'in every run' if len(texts) == 1 else 'NOT in every run'}). "
        f"Single request: {args.runs} interleaved runs each, medians. Generator: **{args.backend}** in both "
        "(cold_backend; llama.cpp is what `mllm serve` runs while no adapter is current). Server: `mllm serve` in "
        "its own process (concurrent answers batched: memory_llm.batching / batching_llamacpp), httpx clients, "
        "streamed (SSE). In-process: MemoryLLM.chat in the benchmark process, the same requests one after another.",
        "",
        table(["", "server", "in-process", "server / in-process"], rows),
        "",
        f"Under load: N concurrent clients, {args.per_client} streamed requests each, cycling through "
        f"{len(QUESTIONS)} distinct questions, vs the same requests one after another in-process (target: 4 clients "
        "≤ 0.4× sequential); first token and total as clients see them (medians); largest batch: the most rows the "
        "server's continuous batcher ran at once. Prefill floor: the sum of the requests' lone prefill passes (the "
        "prompt through the model once, in-process, median of 3), the least any batching can take on a CPU that one "
        "prefill already keeps busy, and its share of the sequential wall.",
        "",
        table(["clients", "requests", "server wall s", "sequential wall s", "ratio", "first token p50 s",
               "total p50 s", "server tokens/s", "sequential tokens/s", "largest batch", "prefill floor s"],
              load_rows),
    ])
    print(text)
    if args.write:
        write_section(SECTION if args.backend == "llama.cpp" else f"{SECTION} ({args.backend})", text)
        log("wrote BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
