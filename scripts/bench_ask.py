#!/usr/bin/env python
"""`ask` latency: a new `mllm ask` process (time to first token, total, peak RSS), the in-process overhead of
MemoryLLM.ask over raw model.generate, and where a new process's first-token time goes.

(a) CLI, new process each run, on a home that learned data/sample (`mllm learn data/sample`, untimed):
    plain   `mllm ask Q --max-new-tokens N`: wall time from Popen to the first stdout byte (read unbuffered)
            and to exit
    --json  `mllm ask Q --json ...`: the library's own timings (first_token is measured from the start of
            retrieval, which in a new process includes loading the embedder and the LLM) and process wall
    One warm-up run of each (OS page cache), then --runs runs each, interleaved; medians.
(c) Peak RSS of each `mllm ask` child: os.wait4's ru_maxrss (that process alone).
(b) In process, models loaded and warmed: MemoryLLM.ask(Q, max_new_tokens=N) vs raw model.generate on the very
    prompt ids ask builds (Answerer.prepare), greedy, same max_new_tokens, plain generate (no streamer). Greedy
    decoding of the same ids is deterministic, so both produce the same tokens: the script checks the texts are
    equal and reports per-token times too. Interleaved, median of --inproc-runs.
Stages: a fresh child process (this script with --child-stages) times each step in the CLI's order with the
    imports done up front; plus `python -X importtime` of one real `mllm ask` for the heaviest imports.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchmd import command_line, machine, median, table, today, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
SAMPLE = ROOT / "data" / "sample"
QUESTION = "When did the Larkspur Observatory open, and who founded it?"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("MLLM_CACHE", "/tmp/mcache")
    env.pop("MLLM_HOME", None)
    return env


# ---- (a) + (c): the CLI in a new process ----------------------------------------------------------------
def run_cli(home: Path, args, as_json: bool, extra: tuple[str, ...] = ("--local",)) -> dict:
    cmd = [str(BIN / "mllm"), "ask", args.question, "--home", str(home), "--max-new-tokens", str(args.max_new_tokens),
           *extra]
    if as_json:
        cmd.append("--json")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), bufsize=0)
    first = None
    chunks = []
    fd = proc.stdout.fileno()
    while True:
        b = os.read(fd, 65536)
        if not b:
            break
        if first is None:
            first = time.perf_counter() - t0
        chunks.append(b)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    out = b"".join(chunks).decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-2000:]}")
    res = {"wall": wall, "first_byte": first, "rss_mb": usage.ru_maxrss / 1024, "stdout": out,
           "cpu": usage.ru_utime + usage.ru_stime}
    if as_json:
        res["timings"] = json.loads(out)["timings"]
    return res


def import_profile(home: Path, args) -> list[tuple[str, float, int]]:
    """Packages by cumulative import time (s) in one `python -X importtime mllm ask`, at their first import at
    any depth (so they overlap: sentence_transformers includes torch, sklearn, ...). (name, seconds, depth)."""
    cmd = [str(BIN / "python"), "-X", "importtime", str(BIN / "mllm"), "ask", args.question, "--home", str(home),
           "--max-new-tokens", "8", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    tops: dict[str, tuple[float, int]] = {}
    for line in p.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m and "." not in m.group(4):
            tops.setdefault(m.group(4), (int(m.group(2)) / 1e6, (len(m.group(3)) - 1) // 2))
    return sorted(((k, v[0], v[1]) for k, v in tops.items()), key=lambda kv: -kv[1])


def stage_profile(home: Path, args) -> dict:
    cmd = [str(BIN / "python"), __file__, "--child-stages", "--home", str(home), "--question", args.question,
           "--max-new-tokens", str(args.max_new_tokens), "--spawned-at", repr(time.time())]
    p = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    if p.returncode != 0:
        raise SystemExit(f"stage child failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def child_stages(args) -> None:
    """Run in a fresh process: each step of `mllm ask`, in the CLI's order, with imports done up front."""
    stages: dict[str, list] = {"interpreter start (spawn → main)": [time.time() - float(args.spawned_at),
                                                                      time.process_time()]}
    t, c = time.perf_counter(), time.process_time()

    def mark(name: str) -> None:  # [wall s, CPU s of this process, all threads]
        nonlocal t, c
        now, cnow = time.perf_counter(), time.process_time()
        stages[name] = [now - t, cnow - c]
        t, c = now, cnow

    import memory_llm.cli as cli  # noqa: F401  (typer, the facade; what `mllm` imports first)

    mark("import memory_llm.cli (typer, numpy, ...)")
    import torch  # noqa: F401

    mark("import torch")
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer  # noqa: F401

    mark("import transformers (+ AutoModel classes)")
    import sentence_transformers  # noqa: F401

    mark("import sentence_transformers")
    import faiss  # noqa: F401

    mark("import faiss")
    from memory_llm.cli_common import quiet_libraries

    quiet_libraries()
    from memory_llm.assistant import MemoryLLM
    from memory_llm.generate import build_messages
    from memory_llm.retrieve import pack

    m = MemoryLLM(Path(args.home))
    m.store.meta("dim")
    mark("Settings + open store (SQLite)")
    m.embedder
    mark("load embedder (SentenceTransformer)")
    hits = m.search(args.question)
    mark("retrieve (embed query, index load, dense + FTS, fuse)")
    gen = m.generator
    mark("load LLM (converted checkpoint)")
    hits = pack(hits, gen.count_tokens, m.settings.context_tokens)
    ids = gen.chat_ids(build_messages(args.question, [h.memory.text for h in hits]))
    mark("prompt (pack + chat template + tokenize)")
    stream = iter(gen.stream(ids, args.max_new_tokens))
    next(stream)
    mark("first token (prefill + 1 decode step, streamer thread)")
    for _ in stream:  # drain: exiting while the generate thread runs aborts the process
        pass
    print(json.dumps({"stages": stages, "prompt_tokens": int(ids.shape[1])}))


def child_plain_embedder(args) -> None:
    """Fresh process: the default embedder through plain transformers (no sentence_transformers import):
    AutoModel + mean pooling + L2 normalisation, which is what all-MiniLM-L6-v2's pipeline computes."""
    stages: dict = {}
    t, c = time.perf_counter(), time.process_time()

    def mark(name: str) -> None:
        nonlocal t, c
        now, cnow = time.perf_counter(), time.process_time()
        stages[name] = [now - t, cnow - c]
        t, c = now, cnow

    import torch

    mark("import torch")
    from transformers import AutoModel, AutoTokenizer
    from transformers.models.bert import modeling_bert  # noqa: F401  (what AutoModel would import lazily)

    mark("import transformers AutoModel/AutoTokenizer + BERT classes")
    from memory_llm.models import resolve_embedder

    path = resolve_embedder("all-MiniLM-L6-v2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    mark("load MiniLM (AutoModel + tokenizer)")
    with torch.inference_mode():
        enc = tok([args.question], padding=True, truncation=True, max_length=256, return_tensors="pt")
        out = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        vec = torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1), dim=-1)[0]
    mark("embed the question")
    print(json.dumps({"stages": stages, "vector": vec.tolist()}))


def plain_embedder_profile(args) -> dict:
    cmd = [str(BIN / "python"), __file__, "--child-plain-embedder", "--question", args.question]
    p = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    if p.returncode != 0:
        raise SystemExit(f"plain-embedder child failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---- (b): in-process overhead ---------------------------------------------------------------------------
def in_process(home: Path, args) -> dict:
    import torch

    from memory_llm import MemoryLLM

    m = MemoryLLM(home)
    gen = m.generator
    st_vec = m.embedder.encode([args.question])[0]
    _, ids, *_ = m.answerer.prepare(args.question, k=None, namespace="default", use_memory=True)  # as ask builds it
    model, tok = gen.model, gen.tokenizer

    def raw():  # in a worker thread, as ask's generation runs (see the notes: the main thread can differ)
        box = []
        th = threading.Thread(target=lambda: box.append(raw_here()))
        th.start()
        th.join()
        return box[0]

    def raw_here():
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        dt = time.perf_counter() - t
        new = out[0, ids.shape[1]:]
        return dt, int(new.shape[0]), tok.decode(new, skip_special_tokens=True).strip()

    def ask():
        t = time.perf_counter()
        a = m.ask(args.question, max_new_tokens=args.max_new_tokens)
        return time.perf_counter() - t, a

    ask()
    raw()  # warm-up
    asks, raws, ntok, same = [], [], None, True
    for _ in range(args.inproc_runs):
        dt, a = ask()
        asks.append((dt, a.timings))
        rdt, ntok, text = raw()
        raws.append(rdt)
        same = same and (text == a.text)
    ask_t = median([a for a, _ in asks])
    raw_t = median(raws)
    comp = {k: median([tm[k] for _, tm in asks]) for k in ("retrieve", "prompt", "generate", "first_token")}
    m.close()
    pairwise = median([(a - r) / r for (a, _), r in zip(asks, raws)])
    return {"ask": ask_t, "raw": raw_t, "overhead": (ask_t - raw_t) / raw_t, "pairwise": pairwise, "tokens": ntok, "same_text": same,
            "asks": [a for a, _ in asks], "raws": raws, "components": comp,
            "prompt_tokens": int(ids.shape[1]), "torch_threads": torch.get_num_threads(), "st_vec": st_vec}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3, help="timed CLI runs of each kind (after one warm-up)")
    p.add_argument("--inproc-runs", type=int, default=5)
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    p.add_argument("--child-stages", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-plain-embedder", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--home", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spawned-at", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_stages:
        child_stages(args)
        return
    if args.child_plain_embedder:
        child_plain_embedder(args)
        return
    os.environ.setdefault("MLLM_CACHE", "/tmp/mcache")
    load0 = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="mllm-bench-ask-"))
    try:
        home = tmp / "home"
        t = time.perf_counter()
        subprocess.run([str(BIN / "mllm"), "learn", str(SAMPLE), "--home", str(home)], check=True, env=child_env(),
                       capture_output=True)
        log(f"learned {SAMPLE} in {time.perf_counter() - t:.1f} s (setup, untimed)")

        run_cli(home, args, False)
        run_cli(home, args, True)  # warm-ups
        plain, js = [], []
        for i in range(args.runs):
            plain.append(run_cli(home, args, False))
            js.append(run_cli(home, args, True))
            log(f"run {i + 1}: plain first byte {plain[-1]['first_byte']:.2f} s wall {plain[-1]['wall']:.2f} s; "
                f"json first_token {js[-1]['timings']['first_token']:.2f} s wall {js[-1]['wall']:.2f} s")
        stages = stage_profile(home, args)["stages"]
        log("stages: " + json.dumps(stages))
        imports = import_profile(home, args)
        log("imports: " + json.dumps(imports[:10]))
        plain_emb = plain_embedder_profile(args)
        log("plain embedder: " + json.dumps(plain_emb["stages"]))
        ip = in_process(home, args)
        log(f"in-process: ask {ip['ask']:.3f} s raw {ip['raw']:.3f} s overhead {100 * ip['overhead']:.1f}% "
            f"tokens {ip['tokens']} same text {ip['same_text']}")

        import numpy as np

        cos = float(np.dot(np.asarray(plain_emb["vector"]), ip["st_vec"]))
        med = lambda xs, k: median([x[k] for x in xs])  # noqa: E731
        tm = lambda k: median([x["timings"][k] for x in js])  # noqa: E731
        import torch

        rows_a = [
            ["plain: wall to first stdout byte (from Popen)", med(plain, "first_byte"),
             " / ".join(f"{x['first_byte']:.2f}" for x in plain)],
            ["plain: wall to exit", med(plain, "wall"), " / ".join(f"{x['wall']:.2f}" for x in plain)],
            ["plain: CPU time of the process (user+sys, all threads)", med(plain, "cpu"),
             " / ".join(f"{x['cpu']:.2f}" for x in plain)],
            ["--json: first_token (from start of retrieval)", tm("first_token"),
             " / ".join(f"{x['timings']['first_token']:.2f}" for x in js)],
            ["--json: retrieve (includes embedder load)", tm("retrieve"), ""],
            ["--json: prompt (includes LLM load)", tm("prompt"), ""],
            ["--json: generate", tm("generate"), ""],
            ["--json: total (library)", tm("total"), ""],
            ["--json: wall to exit (from Popen)", med(js, "wall"), " / ".join(f"{x['wall']:.2f}" for x in js)],
            ["--json: before retrieval (wall − total: spawn, imports, exit)", med(js, "wall") - tm("total"), ""],
        ]
        rss = [x["rss_mb"] for x in plain + js]
        stage_rows = [[k, v[0], v[1]] for k, v in stages.items()]
        stage_sum = sum(r[1] for r in stage_rows)
        stage_cpu = sum(r[2] for r in stage_rows)
        body = (
            f"Command: `{command_line()}`  \nDate: {today()}; {machine()}; load average at start/end "
            f"{load0:.1f}/{os.getloadavg()[0]:.1f}; torch {torch.__version__} "
            f"({ip['torch_threads']} threads); MLLM_CACHE holds the converted default LLM (SmolLM2-135M).\n\n"
            f"Home: `mllm learn data/sample`. Question: \"{args.question}\", --max-new-tokens {args.max_new_tokens}, "
            f"prompt {ip['prompt_tokens']} tokens.\n\n"
            f"### (a) `mllm ask` in a new process (median of {args.runs}, after one warm-up each, interleaved)\n\n"
            + table(["measure", "median s", "runs s"], rows_a)
            + f"\n\n### (c) Peak RSS of the `mllm ask` process\n\nmedian {median(rss):.0f} MB, max {max(rss):.0f} MB "
              f"(os.wait4 ru_maxrss of the child, {len(rss)} runs).\n\n"
            + f"### Where a new process's first-token time goes (one fresh child, steps in the CLI's order)\n\n"
            + "Wall s is inflated by other jobs on a busy machine; CPU s (this process, all threads) is not, and "
              "for the single-threaded steps (imports, loads) it is what the wall time would be on an idle "
              "machine.\n\n"
            + table(["step", "wall s", "CPU s"], stage_rows)
            + f"\n| **sum** | **{stage_sum:.3g}** | **{stage_cpu:.3g}** |\n\n"
            + "Heaviest packages imported by a real `mllm ask` (`python -X importtime`, cumulative s at first "
              "import, any nesting depth; rows overlap: a package includes what it imports, e.g. "
              "sentence_transformers includes torch and sklearn):\n\n"
            + table(["package", "cumulative s", "nesting depth"], [[k, v, d] for k, v, d in imports[:12]])
            + "\n\nThe default embedder without sentence_transformers (fresh process; plain transformers AutoModel "
              "+ mean pooling + L2 norm, what all-MiniLM-L6-v2 computes): cosine to the library's query vector "
              f"{cos:.6f}.\n\n"
            + table(["step", "wall s", "CPU s"], [[k, v[0], v[1]] for k, v in plain_emb["stages"].items()])
            + f"\n| **sum** | **{sum(v[0] for v in plain_emb['stages'].values()):.3g}** | "
              f"**{sum(v[1] for v in plain_emb['stages'].values()):.3g}** |"
            + f"\n\n### (b) In-process overhead: MemoryLLM.ask vs raw model.generate (median of {args.inproc_runs}, "
              "interleaved, models loaded and warm)\n\n"
            + table(["path", "median s", "runs s", "ms / new token"],
                    [["MemoryLLM.ask(Q, max_new_tokens)", ip["ask"], " / ".join(f"{x:.3f}" for x in ip["asks"]),
                      1000 * ip["ask"] / ip["tokens"]],
                     ["  of which retrieve", ip["components"]["retrieve"], "", ""],
                     ["  of which prompt", ip["components"]["prompt"], "", ""],
                     ["  of which generate (streamed)", ip["components"]["generate"], "", ""],
                     ["raw model.generate (same ids, greedy, no streamer, in a worker thread)", ip["raw"],
                      " / ".join(f"{x:.3f}" for x in ip["raws"]), 1000 * ip["raw"] / ip["tokens"]]])
            + f"\n\nBoth generated {ip['tokens']} new tokens (greedy on identical ids; texts identical: "
              f"{ip['same_text']}). **Overhead (ask − raw) / raw = {100 * ip['overhead']:.1f}%** (target ≤ 5%; "
              f"median of per-pair overheads {100 * ip['pairwise']:.1f}%).\n")
        print(body)
        if not args.no_write:
            write_section("Ask latency (bench_ask.py)", body + NOTES)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


NOTES = """
Method notes: (b) runs raw generate in a worker thread because ask's generation runs in one (the streamer's);
on this shared, overloaded machine generation in the main thread measured 6-10x slower than in a worker thread
(labs/probe_threads.py), which would make the comparison meaningless. Greedy decoding of identical ids yields
identical tokens, so the token counts match without forcing min_new_tokens (the script checks the texts).
"""

if __name__ == "__main__":
    main()
