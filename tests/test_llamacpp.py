"""The llama.cpp backend (generate_llamacpp) on the shipped GGUF: the prompt `ask` builds is the same tokens as
through transformers, greedy answers agree, the Generator protocol's budget, stop, report and seed hold, and a
one-shot `mllm ask` answers with sources without importing torch or transformers (the cold start, issue 21)."""

import json
import os
import subprocess
import sys
import threading

import pytest

from memory_llm.generate_llamacpp import available

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not available(), reason="llama-cpp-python is not installed (make setup builds it)")]

QUESTION = "When did the Larkspur Observatory open, and who founded it?"
SOURCE = ("The Larkspur Observatory is a small astronomical observatory on Mount Vell, in the invented province of "
          "Orrin. It opened on 14 March 1911 and was founded by the astronomer Edith Marrow.")


@pytest.fixture(scope="module")
def llama():
    from memory_llm.config import Settings
    from memory_llm.generate import load_generator

    gen = load_generator(Settings(generator_backend="llama.cpp"))
    assert type(gen).__name__ == "LlamaCppGenerator"
    return gen


def test_same_prompt_tokens_and_greedy_answer_as_transformers(llama, real_models):
    from memory_llm.generate import build_messages

    torch_gen = real_models[1]
    for messages in (build_messages(QUESTION, [SOURCE]), build_messages("What is the capital of France?"),
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}]):
        assert llama.chat_ids(messages)[0].tolist() == torch_gen.chat_ids(messages)[0].tolist()
    ids = build_messages(QUESTION, [SOURCE])
    a = "".join(llama.stream(llama.chat_ids(ids), 40))
    b = "".join(torch_gen.stream(torch_gen.chat_ids(ids), 40))
    assert "1911" in a and a.split()[:8] == b.split()[:8], (a, b)
    assert llama.count_tokens(SOURCE) == torch_gen.count_tokens(SOURCE)


def test_budget_stop_report_and_seed(llama):
    from memory_llm.generate import Sampling, build_messages

    ids = llama.chat_ids(build_messages("Tell me a long story about a heron."))
    report = {}
    assert len("".join(llama.stream(ids, 3, report=report))) > 0
    assert report == {"completion_tokens": 3, "finish_reason": "length"}
    stop, report = threading.Event(), {}
    stop.set()
    assert "".join(llama.stream(ids, 20, stop=stop, report=report)) == "" and report["finish_reason"] == "stop"
    hot = Sampling(1.2, 0.95, 7)
    one, two = ("".join(llama.stream(ids, 16, sampling=hot)) for _ in range(2))
    assert one == two  # the same seed, the same sample
    assert "".join(llama.stream(ids, 16, sampling=Sampling(1.2, 0.95, 8))) != one


def test_one_shot_ask_imports_neither_torch_nor_transformers(tmp_path):
    env = {**os.environ, "MLLM_HOME": str(tmp_path / "home")}
    run = lambda *args, **kw: subprocess.run([sys.executable, *args], capture_output=True, text=True,  # noqa: E731
                                             env={**env, **kw.get("extra", {})}, timeout=600)
    (tmp_path / "notes.md").write_text(SOURCE + "\n", encoding="utf-8")
    learned = run("-m", "memory_llm", "learn", str(tmp_path / "notes.md"))
    assert learned.returncode == 0, learned.stderr
    asked = run("-X", "importtime", "-m", "memory_llm", "ask", QUESTION, "--local", "--json")
    assert asked.returncode == 0, asked.stderr[-2000:]
    answer = json.loads(asked.stdout)
    assert answer["sources"] and "1911" in answer["answer"]
    imported = {line.split("|")[-1].strip() for line in asked.stderr.splitlines() if line.startswith("import time:")}
    assert "llama_cpp" in imported and not {"torch", "transformers", "sentence_transformers"} & imported
    # cold_backend = transformers: the same question through torch (and the same sources)
    slow = run("-X", "importtime", "-m", "memory_llm", "ask", QUESTION, "--local", "--json",
               extra={"MLLM_COLD_BACKEND": "transformers"})
    assert slow.returncode == 0, slow.stderr[-2000:]
    assert " torch\n" in slow.stderr or "| torch" in slow.stderr
    assert [s["id"] for s in json.loads(slow.stdout)["sources"]] == [s["id"] for s in answer["sources"]]


def test_a_current_adapter_keeps_the_transformers_generator(tmp_path, monkeypatch):
    """A one-shot ask takes llama.cpp only while no adapter is current (adapters are torch LoRA with routing)."""
    from memory_llm import generate
    from memory_llm.adapters import AdapterRegistry
    from memory_llm.config import Settings
    from memory_llm.serving import ServedModel

    asked = []
    monkeypatch.setattr(generate, "load_generator", lambda settings, quick=False, **kw: asked.append(quick))
    served = ServedModel(Settings(home=tmp_path / "home"), embed=None, quick=True, use_adapter=False)
    served.generator  # noqa: B018
    monkeypatch.setattr(AdapterRegistry, "current", lambda self: object())
    with_adapter = ServedModel(Settings(home=tmp_path / "home"), embed=None, quick=True)
    monkeypatch.setattr(ServedModel, "attach_current", lambda self: None)
    with_adapter.generator  # noqa: B018
    assert asked == [True, False]


def test_weights_reencoded_once_into_the_cache(tmp_path):
    """llamacpp_weights: the shipped Q4_1 file is re-encoded once (bf16 / f16) into the cache and reused; the
    re-encoded model answers; "shipped" runs the file itself."""
    from pathlib import Path

    from memory_llm.generate import build_messages
    from memory_llm.generate_llamacpp import LlamaCppGenerator, weights_file
    from memory_llm.models import cpu_has_bf16, resolve_model

    directory, name = resolve_model("smollm2")
    shipped = Path(directory) / name
    assert weights_file(shipped, tmp_path, "shipped") == shipped
    f16 = weights_file(shipped, tmp_path, "f16")
    assert f16.parent == tmp_path / "models" and f16.name.endswith(".f16.gguf")
    stamp = f16.stat().st_mtime_ns
    assert weights_file(shipped, tmp_path, "f16").stat().st_mtime_ns == stamp  # reused, not written again
    assert not list((tmp_path / "models").glob(".requant-*"))
    assert weights_file(shipped, tmp_path, "auto").name.endswith(".bf16.gguf" if cpu_has_bf16() else ".f16.gguf")
    gen = LlamaCppGenerator.load("smollm2", f16)
    assert gen.llm.metadata["general.file_type"] == "1"  # LLAMA_FTYPE_MOSTLY_F16 (the shipped file: 3, Q4_1)
    assert "1911" in "".join(gen.stream(gen.chat_ids(build_messages(QUESTION, [SOURCE])), 40))


def test_batched_answers_share_decoding_steps(llama):
    """The server's llama.cpp batcher: concurrent answers run as sequences of one context (at most ROWS at once,
    the rest wait), each with its own budget, sampling, stop and report; a prompt a sequence holds already is not
    prefilled again; a prompt too long for a window fails alone; close() ends the thread."""
    import copy

    from memory_llm.batching_llamacpp import ROWS, TAIL, LlamaBatcher
    from memory_llm.errors import ModelError
    from memory_llm.generate import Sampling, build_messages

    gen = copy.copy(llama)
    gen.batcher = LlamaBatcher(gen, 8)
    assert gen.batcher.max_batch == ROWS == 4
    asks = [build_messages(QUESTION, [SOURCE]), build_messages("What is the capital of France?"),
            build_messages("Tell me a long story about a heron."), build_messages("Name a colour."),
            build_messages("Say hello.")]
    out, reports = [None] * len(asks), [{} for _ in asks]

    def answer(k):
        out[k] = "".join(gen.stream(gen.chat_ids(asks[k]), (48, 24, 6, 24, 24)[k], report=reports[k]))

    threads = [threading.Thread(target=answer, args=(k,)) for k in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "1911" in out[0] and "Paris" in out[1] and all(out), out
    assert (reports[2]["completion_tokens"], reports[2]["finish_reason"]) == (6, "length")
    assert reports[1]["finish_reason"] == "stop" and 0 < reports[1]["completion_tokens"] < 24, reports
    assert max(gen.batcher.step_rows) >= 2 and max(gen.batcher.batch_sizes) <= 4
    ids, report = gen.chat_ids(asks[1]), {}  # asked again: its sequence's cache holds the prompt (TAIL goes again)
    assert "".join(gen.stream(ids, 24, report=report)) == out[1] and report["cached_tokens"] == ids.shape[1] - TAIL
    hot = Sampling(1.2, 0.95, 7)
    ids = gen.chat_ids(asks[2])
    assert "".join(gen.stream(ids, 12, sampling=hot)) == "".join(gen.stream(ids, 12, sampling=hot))
    stop, report = threading.Event(), {}
    pieces = gen.stream(ids, 100, stop=stop, report=report)
    next(pieces)
    stop.set()
    list(pieces)
    assert report["finish_reason"] == "stop" and report["completion_tokens"] < 10
    small = copy.copy(llama)
    small.batcher = LlamaBatcher(small, 2, window=64)
    with pytest.raises(ModelError, match="does not fit"):
        list(small.stream(small.chat_ids(asks[0]), 8))
    assert "".join(small.stream(small.chat_ids(asks[4]), 8))  # the batcher goes on
    for b in (gen.batcher, small.batcher):
        b.close(wait=10)
        assert not b.alive


def test_a_context_that_cannot_be_made_fails_the_answer(llama, monkeypatch):
    """The batcher's llama.cpp context cannot be made: the waiting answer gets the error instead of hanging."""
    import copy

    from memory_llm import batching_llamacpp
    from memory_llm.batching_llamacpp import LlamaBatcher
    from memory_llm.errors import ModelError

    def refuse(*args):
        raise ModelError("llama.cpp could not load a context here")

    monkeypatch.setattr(batching_llamacpp, "Context", refuse)
    gen = copy.copy(llama)
    gen.batcher = LlamaBatcher(gen, 2)
    with pytest.raises(ModelError, match="could not load"):
        list(gen.stream(gen.chat_ids([{"role": "user", "content": "Hi"}]), 4))


def test_serving_uses_llamacpp_until_an_adapter_is_promoted(tmp_path, monkeypatch):
    """With batching (the server) and no adapter current, ServedModel answers on llama.cpp with its batcher; once an
    adapter is current, reload drops it (the next answer loads transformers, which serves adapters)."""
    import numpy as np

    from memory_llm.config import Settings
    from memory_llm.serving import ServedModel

    served = ServedModel(Settings(home=tmp_path / "home"), embed=lambda texts: np.zeros((len(texts), 384)))
    served.batching = 8
    monkeypatch.setattr(served.registry, "current", lambda: None)
    gen = served.generator
    assert type(gen).__name__ == "LlamaCppGenerator" and type(gen.batcher).__name__ == "LlamaBatcher"
    assert "".join(gen.stream(gen.chat_ids([{"role": "user", "content": "Say hello."}]), 4))
    monkeypatch.setattr(served.registry, "current", lambda: object())
    served.reload()
    assert not served.loaded
    gen.batcher.close(wait=10)  # reload closed it already: this only waits
    assert not gen.batcher.alive
