"""The OpenAI-compatible generator backend (generate_openai) and adapters on an engine (adapters.remote), against a
fake engine that serves the tiny model over HTTP (tests/fake_engine.py): what comes back through HTTP equals the
same model in-process, adapters are published as mem-vNNNN and routed by content, errors are one line."""

from __future__ import annotations

import copy
import json
import socket

import numpy as np
import pytest

from fake_engine import FakeEngine
from conftest import run_cli
from memory_llm.errors import InputError, ModelError

QUESTIONS = ["When did the Larkspur Observatory open?", "Who founded the Larkspur Observatory?",
             "What colour is a ripe banana?", "Name a large ocean."]


def fresh(tiny):
    """A private copy of the tiny generator (adapters attached to it stay in the test)."""
    from memory_llm.generate import TransformersGenerator

    return TransformersGenerator(copy.deepcopy(tiny.model), tiny.tokenizer, tiny.name)


def remote(engine, tiny, **kw):
    from memory_llm.generate_openai import EngineClient, OpenAIGenerator

    return OpenAIGenerator(EngineClient(engine.url, kw.pop("api_key", None)), tiny.tokenizer, tiny.name, **kw)


def chat(gen, question: str) -> list[int]:
    return gen.chat_ids([{"role": "user", "content": question}])[0].tolist()


def make_version(home, name: str, tiny, seed: int, *, stack=(), router: dict | None = None, keys=None,
                 base: str = "smollm2"):
    """An adapter version as consolidation writes it: a peft LoRA (non-zero: it changes the output), manifest,
    and optionally router.json and keys.npy."""
    import torch
    from peft import LoraConfig, get_peft_model

    from memory_llm.adapters import save_keys

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(tiny.model), LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                                                 target_modules=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(20.0)  # strong enough to change greedy output of a random tiny model
    path = home / "adapters" / name
    model.save_pretrained(path)
    if router is not None:
        (path / "router.json").write_text(json.dumps(router))
    if keys is not None:
        save_keys(path, keys)
    (path / "manifest.json").write_text(json.dumps({"base_model": base, "version": name, "memories": [],
                                                    "stack": list(stack)}))
    return path


def promote(home, name: str) -> None:
    from memory_llm.adapters import AdapterRegistry

    AdapterRegistry(home).promote(name)


def chat_head(gen) -> list[int]:
    from memory_llm.adapters.routing import common_prefix

    return common_prefix([chat(gen, "a b c"), chat(gen, "x y z")])


# ---- the generator over HTTP ----------------------------------------------------------------------------
def test_generation_through_http_equals_in_process(tiny_generator):
    base = fresh(tiny_generator)
    prompts = [chat(base, q) for q in QUESTIONS]
    with FakeEngine(base) as engine:
        gen = remote(engine, tiny_generator)
        assert gen.model.id == "base-model" and gen.model.config.max_position_embeddings == 4096
        assert gen.generate_batch(prompts, 10) == base.generate_batch(prompts, 10)
        assert gen.generate_batch(prompts, 10, return_ids=True) == base.generate_batch(prompts, 10, return_ids=True)
        ids = gen.chat_ids([{"role": "user", "content": QUESTIONS[0]}])
        assert ids.tolist() == base.chat_ids([{"role": "user", "content": QUESTIONS[0]}]).tolist()
        streamed = "".join(gen.stream(ids, 10))
        assert streamed == "".join(base.stream(ids, 10)) and streamed
        remote_sure = gen.generate_batch(prompts, 4, confidence=True)
        local_sure = base.generate_batch(prompts, 4, confidence=True)
        assert [t for t, _ in remote_sure] == [t for t, _ in local_sure]
        assert np.allclose([s for _, s in remote_sure], [s for _, s in local_sure], atol=1e-4)
        # a prompt batch goes out as one request per engine model, token ids as the prompt
        body = [b for p, b in engine.requests if p == "/v1/completions"][0]
        assert body["prompt"] == prompts and body["temperature"] == 0.0 and body["max_tokens"] == 10


def test_stream_stops_when_asked(tiny_generator):
    import threading

    base = fresh(tiny_generator)
    with FakeEngine(base) as engine:
        gen = remote(engine, tiny_generator)
        stop = threading.Event()
        pieces = []
        for piece in gen.stream(gen.chat_ids([{"role": "user", "content": "hello"}]), 30, stop=stop):
            pieces.append(piece)
            stop.set()
        assert len(pieces) == 1


def test_engine_errors_are_one_line(tiny_generator):
    from memory_llm.generate_openai import EngineClient, api_root

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ModelError, match="cannot reach the generator at http://127.0.0.1:.*connection refused"):
        EngineClient(f"http://127.0.0.1:{port}").get("/models")
    for bad in ("127.0.0.1:8001", "ftp://x/v1", "http://", "http://h:port/v1"):
        with pytest.raises(InputError, match="generator base URL"):
            api_root(bad)
    assert api_root("http://h:8001/") == "http://h:8001/v1" == api_root("http://h:8001/v1")
    with FakeEngine(fresh(tiny_generator), api_key="sekret") as engine:
        with pytest.raises(ModelError, match="HTTP 401.*generator_api_key") as info:
            remote(engine, tiny_generator)
        assert "\n" not in str(info.value)
        gen = remote(engine, tiny_generator, api_key="sekret")
        with pytest.raises(ModelError, match="does not serve 'other'"):
            remote(engine, tiny_generator, api_key="sekret", model_id="other")
        gen.model.id = "gone"  # the engine answers 404 for an unknown model
        with pytest.raises(ModelError, match="HTTP 404.*does not exist"):
            gen.generate_batch([[5, 6, 7]], 3)


def test_settings_choose_the_backend(tmp_path, tiny_generator, fake_embedder, caplog):
    """generator_backend = openai: ask loads the tokenizer locally and generates on the engine."""
    from memory_llm import MemoryLLM
    from memory_llm.config import Settings
    from memory_llm.generate_openai import OpenAIGenerator

    with pytest.raises(InputError, match="generator_backend='bogus'"):
        Settings(generator_backend="bogus")
    with pytest.raises(InputError, match="needs generator_base_url"):
        Settings(generator_backend="openai")
    model_dir = tmp_path / "tiny"
    tiny_generator.model.save_pretrained(model_dir)
    tiny_generator.tokenizer.save_pretrained(model_dir)
    base = fresh(tiny_generator)
    with FakeEngine(base) as engine:
        m = MemoryLLM(tmp_path / "home", embedder=fake_embedder, model=str(model_dir), generator_backend="openai",
                      generator_base_url=engine.url, max_new_tokens=8)
        answer = m.ask(QUESTIONS[0], use_memory=False)
        assert isinstance(m.generator, OpenAIGenerator)
        local = MemoryLLM(tmp_path / "home2", embedder=fake_embedder, generator=base, max_new_tokens=8)
        assert answer.text == local.ask(QUESTIONS[0], use_memory=False).text
        assert engine.models_used() == ["base-model"]
        # consolidation still gets a torch model, loaded in-process
        assert type(m.new_generator()).__name__ == "TransformersGenerator"
        m.close()
        local.close()
        # a promotion in a process that has not generated yet (`mllm consolidate`) is published at once
        make_version(tmp_path / "home3", "v0001", tiny_generator, seed=8, base=str(model_dir))
        promote(tmp_path / "home3", "v0001")
        c = MemoryLLM(tmp_path / "home3", embedder=fake_embedder, model=str(model_dir), generator_backend="openai",
                      generator_base_url=engine.url)
        c.reload_adapter()
        assert set(engine.adapters) == {"mem-v0001"}
        c.close()
    # the engine gone: the promotion stands, a warning says the engine did not take it
    c = MemoryLLM(tmp_path / "home3", embedder=fake_embedder, model=str(model_dir), generator_backend="openai",
                  generator_base_url=engine.url)
    with caplog.at_level("WARNING", logger="memory_llm.serving"):
        c.reload_adapter()
    assert "the engine did not take the current adapter: cannot reach the generator" in caplog.text
    assert c.adapters.current_name() == "v0001"
    c.close()


@pytest.mark.parametrize("args,message", [
    (["--generator", "bogus"], "generator_backend='bogus' must be transformers, llama.cpp or openai"),
    (["--generator", "openai"], "needs generator_base_url"),
    (["--generator", "openai", "--base-url", "localhost:8001"], "is not an http(s) URL"),
    (["--generator", "openai", "--base-url", "http://127.0.0.1:9/v1"], "cannot reach the generator"),
])
def test_serve_generator_options_fail_in_one_line(args, message):
    result = run_cli("serve", "--port", "8765", *args, timeout=120)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


# ---- adapters on the engine -----------------------------------------------------------------------------
def test_adapter_is_published_and_answers_as_in_process(tmp_path, tiny_generator, fake_embedder):
    """A version without a router is always on: through the engine the answer is the in-process adapter's."""
    from memory_llm import MemoryLLM

    home = tmp_path / "home"
    path = make_version(home, "v0001", tiny_generator, seed=1)
    promote(home, "v0001")
    with FakeEngine(fresh(tiny_generator)) as engine:
        m = MemoryLLM(home, embedder=fake_embedder, generator=remote(engine, tiny_generator), max_new_tokens=8)
        local = MemoryLLM(home, embedder=fake_embedder, generator=fresh(tiny_generator), max_new_tokens=8)
        plain = MemoryLLM(home, embedder=fake_embedder, generator=fresh(tiny_generator), max_new_tokens=8,
                          use_adapter=False)
        differs = 0
        for q in QUESTIONS:
            a, b = m.ask(q, use_memory=False, log=False), local.ask(q, use_memory=False, log=False)
            assert a.text == b.text and a.adapter == b.adapter == "v0001"
            assert a.adapter_used == b.adapter_used == "v0001" and a.path == b.path == "adapter"
            differs += a.text != plain.ask(q, use_memory=False, log=False).text
        assert differs  # the adapter changes answers: the comparison means something
        assert ("/v1/load_lora_adapter", {"lora_name": "mem-v0001", "lora_path": str(path.resolve())}) \
            in engine.requests
        assert set(engine.models_used()) == {"mem-v0001"}
        # a second process on the same home finds it loaded and does not load it again
        again = MemoryLLM(home, embedder=fake_embedder, generator=remote(engine, tiny_generator), max_new_tokens=8)
        again.ask(QUESTIONS[0], use_memory=False, log=False)
        assert [p for p, _ in engine.requests].count("/v1/load_lora_adapter") == 1
        for x in (m, local, plain, again):
            x.close()


def test_routing_by_content_matches_in_process(tmp_path, tiny_generator, fake_embedder):
    """With a router whose activation threshold is out of reach, in-process an adapter acts only by content (a
    question near its keys); on the engine it acts on exactly the same questions, and answers alike."""
    from memory_llm import MemoryLLM

    home = tmp_path / "home"
    trained = QUESTIONS[:2]
    router = {"threshold": 1e9, "band": [0.0, 1.0], "head": chat_head(tiny_generator), "pool": "mean",
              "similarity": 0.9}
    make_version(home, "v0001", tiny_generator, seed=2, router=router, keys=fake_embedder.encode(trained))
    promote(home, "v0001")
    with FakeEngine(fresh(tiny_generator)) as engine:
        m = MemoryLLM(home, embedder=fake_embedder, generator=remote(engine, tiny_generator), max_new_tokens=8)
        local = MemoryLLM(home, embedder=fake_embedder, generator=fresh(tiny_generator), max_new_tokens=8)
        for q in QUESTIONS:
            a, b = m.ask(q, use_memory=False, log=False), local.ask(q, use_memory=False, log=False)
            assert (a.text, a.adapter_active, a.adapter_used) == (b.text, b.adapter_active, b.adapter_used), q
            assert a.adapter_active == (q in trained)
        assert engine.models_used() == ["mem-v0001", "mem-v0001", "base-model", "base-model"]
        # a prompt carrying retrieved sources gets the base model (adapter_with_sources off), as in-process
        m.learn(text="The Larkspur Observatory opened in 1911.")
        a = m.ask(QUESTIONS[0], log=False)
        assert a.sources and not a.adapter_active and engine.models_used()[-1] == "base-model"
        # base_context sends everything to the base model
        with m.served.base_context():
            m.generator.generate_batch([chat(tiny_generator, QUESTIONS[0])], 3)
        assert engine.models_used()[-1] == "base-model"
        m.close()
        local.close()


def test_stack_routes_each_question_to_its_rounds_adapter(tmp_path, tiny_generator, fake_embedder):
    from memory_llm import MemoryLLM

    home = tmp_path / "home"
    head = chat_head(tiny_generator)
    router = {"threshold": 1e9, "band": [0.0, 1.0], "head": head, "pool": "mean", "similarity": 0.9}
    make_version(home, "v0001", tiny_generator, seed=3, router=router, keys=fake_embedder.encode(QUESTIONS[:1]))
    make_version(home, "v0002", tiny_generator, seed=4, router=router, keys=fake_embedder.encode(QUESTIONS[1:2]),
                 stack=["v0001"])
    promote(home, "v0002")
    with FakeEngine(fresh(tiny_generator)) as engine:
        m = MemoryLLM(home, embedder=fake_embedder, generator=remote(engine, tiny_generator), max_new_tokens=8)
        local = MemoryLLM(home, embedder=fake_embedder, generator=fresh(tiny_generator), max_new_tokens=8)
        used = []
        for q in QUESTIONS[:3]:
            a, b = m.ask(q, use_memory=False, log=False), local.ask(q, use_memory=False, log=False)
            assert (a.text, a.adapter_used) == (b.text, b.adapter_used), q
            used.append(a.adapter_used)
        assert used == ["v0001", "v0002", None]
        assert engine.models_used() == ["mem-v0001", "mem-v0002", "base-model"]
        assert set(engine.adapters) == {"mem-v0001", "mem-v0002"}
        # a batch whose rows go to different adapters: one request per adapter, rows back in order
        rows = [chat(tiny_generator, q) for q in QUESTIONS[:3]]
        assert m.generator.generate_batch(rows, 6) == local.generator.generate_batch(rows, 6)
        assert m.served.acted_rows(3) == [True, True, False]

        # rollback to v0001: the engine unloads v0002 and requests go to v0001 only
        m.adapters.rollback()
        m.reload_adapter()
        assert set(engine.adapters) == {"mem-v0001"}
        assert m.ask(QUESTIONS[1], use_memory=False, log=False).adapter_used is None
        # rolled back to no adapter: everything unloaded, the base model answers
        m.adapters.rollback()
        m.reload_adapter()
        assert engine.adapters == {}
        assert m.ask(QUESTIONS[0], use_memory=False, log=False).adapter is None
        assert engine.models_used()[-1] == "base-model"
        m.close()
        local.close()


def test_unservable_versions_are_clear_errors(tmp_path, tiny_generator, fake_embedder):
    from memory_llm import MemoryLLM

    home = tmp_path / "home"
    make_version(home, "v0001", tiny_generator, seed=5)
    make_version(home, "v0002", tiny_generator, seed=6, stack=["v0001"])  # two always-on adapters together
    promote(home, "v0002")
    with FakeEngine(fresh(tiny_generator)) as engine:
        m = MemoryLLM(home, embedder=fake_embedder, generator=remote(engine, tiny_generator))
        with pytest.raises(ModelError, match="stacks 2 adapters, some without a router"):
            m.ask(QUESTIONS[0], use_memory=False)
        m.close()
        promote(home, "v0001")
        engine.adapters["mem-v0001"] = "/elsewhere/v0001"  # another home's v0001 on the same engine
        m = MemoryLLM(home, embedder=fake_embedder, generator=remote(engine, tiny_generator))
        with pytest.raises(ModelError, match="already serves an adapter named mem-v0001 from /elsewhere"):
            m.ask(QUESTIONS[0], use_memory=False)
        m.close()


def test_content_route_rules(tiny_generator, fake_embedder):
    """ContentRoute on its own: nearest key over the bar wins, veto and the sources marker, always-on, stale keys."""
    import numpy as np

    from memory_llm.adapters import ContentRoute, prompt_embedder
    from memory_llm.adapters.keys import unit
    from memory_llm.adapters.remote import RemoteAdapter

    tok = tiny_generator.tokenizer
    embed = prompt_embedder(tok, fake_embedder.encode)
    a = RemoteAdapter("v0001", "mem-v0001", unit(fake_embedder.encode(QUESTIONS[:1])), 0.9)
    b = RemoteAdapter("v0002", "mem-v0002", unit(fake_embedder.encode(QUESTIONS[2:3])), 0.9)
    silent = RemoteAdapter("v0003", "mem-v0003", None, None)  # routes by activation only: never on an engine
    route = ContentRoute([a, b, silent], embed, chat_head(tiny_generator))
    rows = [chat(tiny_generator, q) for q in QUESTIONS]
    assert route.choose(rows) == ["mem-v0001", None, "mem-v0002", None]
    assert route.last_adapter == ["v0001", None, "v0002", None] and route.last_on == [True, False, True, False]
    route.veto = tok("</sources>", add_special_tokens=False)["input_ids"]
    with_sources = chat(tiny_generator, "<sources> [1] x </sources> Question: " + QUESTIONS[0])  # (the tiny
    # tokenizer has no newline token)
    assert route.choose([with_sources]) == [None]
    route.veto, route.after = [], tok("</sources>", add_special_tokens=False)["input_ids"]
    assert route.choose([with_sources]) == ["mem-v0001"]  # routed on the question after the sources
    always = ContentRoute([RemoteAdapter("v0001", "mem-v0001", routed=False)], embed)
    assert always.choose(rows) == ["mem-v0001"] * 4 and always.always is not None
    # a key whose memory is no longer true keeps its adapter off the questions near it; the others serve on
    route.veto = route.after = []
    a.owners, b.owners = np.array([7]), np.array([8])
    route.update_stale(lambda ids: {7} & ids, bar=0.5)
    assert route.choose(rows) == [None, None, "mem-v0002", None] and route.blocks(fake_embedder.encode(QUESTIONS[:1])[0])
    route.update_stale(lambda ids: set(), bar=0.5)
    assert route.choose(rows) == ["mem-v0001", None, "mem-v0002", None]
    always.adapters[0].holds = (3,)
    always.update_stale(lambda ids: {3}, bar=0.5)
    assert always.choose(rows) == [None] * 4


def test_server_generates_concurrently_on_an_engine(tmp_path, tiny_generator, fake_embedder):
    """`mllm serve` over an engine runs chat completions at once (the engine batches them); each answer, and the
    adapter chosen for it, is the one in-process gives when asked alone."""
    import threading
    import time
    import urllib.request

    import uvicorn

    from memory_llm import MemoryLLM
    from memory_llm.server import create_app

    home = tmp_path / "home"
    router = {"threshold": 1e9, "band": [0.0, 1.0], "head": chat_head(tiny_generator), "pool": "mean",
              "similarity": 0.9}
    make_version(home, "v0001", tiny_generator, seed=7, router=router, keys=fake_embedder.encode(QUESTIONS[:2]))
    promote(home, "v0001")
    local = MemoryLLM(home, embedder=fake_embedder, generator=fresh(tiny_generator), max_new_tokens=8)
    expected = [local.ask(q, use_memory=False, log=False).text for q in QUESTIONS]
    with FakeEngine(fresh(tiny_generator), delay=0.3) as engine:
        m = MemoryLLM(home, embedder=fake_embedder, generator=remote(engine, tiny_generator), max_new_tokens=8)
        m.generator  # loaded (and the adapter published) before serving, as `run` does
        app = create_app(m)
        assert app.state.worker.workers > 1
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        answers: list = [None] * len(QUESTIONS)

        def ask(i: int) -> None:
            body = {"model": "mllm", "use_memory": False, "messages": [{"role": "user", "content": QUESTIONS[i]}]}
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                             data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as r:
                answers[i] = json.load(r)["choices"][0]["message"]["content"]

        try:
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUESTIONS))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            server.should_exit = True
            thread.join(10)
        assert answers == expected
        assert engine.max_inflight > 1  # generated at once, not one after another
        assert sorted(engine.models_used()) == ["base-model", "base-model", "mem-v0001", "mem-v0001"]
        m.close()
    local.close()
