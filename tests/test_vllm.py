"""Opt-in (MLLM_TEST_VLLM=1): a real vLLM, started from its own venv (scripts/setup_vllm_cpu.sh) on 127.0.0.1 with
the converted default model, answers exactly as the model in-process: greedy, token for token, without and with a
LoRA adapter published through the runtime LoRA API, base and adapter rows mixed in one batch.

    MLLM_TEST_VLLM=1 python -m pytest -q tests/test_vllm.py     # MLLM_VLLM_PYTHON: another venv's python
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.e2e

VLLM_PYTHON = Path(os.environ.get("MLLM_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
if not os.environ.get("MLLM_TEST_VLLM"):
    pytest.skip("vLLM tests are opt-in: set MLLM_TEST_VLLM=1 (after bash scripts/setup_vllm_cpu.sh)",
                allow_module_level=True)
if not VLLM_PYTHON.exists():
    pytest.skip(f"no vLLM venv at {VLLM_PYTHON}: run bash scripts/setup_vllm_cpu.sh (or set MLLM_VLLM_PYTHON)",
                allow_module_level=True)

TRAINED = ["When did the Larkspur Observatory open?", "Who founded the Larkspur Observatory?"]
OTHER = ["What is the capital of France?", "Name three primary colours."]
NEW_TOKENS = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm(checkpoint: str, port: int, log: Path) -> subprocess.Popen:
    """vLLM's OpenAI server on the checkpoint, fp32 (as in-process on a CPU), runtime LoRA loading on."""
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_LOGGING_LEVEL": "WARNING"}
    env.pop("PYTHONPATH", None)  # vLLM's venv has its own transformers
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint,
           "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "2048", "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2"]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def vllm_url(model_cache, tmp_path_factory):
    from memory_llm.models import checkpoint_dir

    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    port = free_port()
    proc = start_vllm(checkpoint_dir("smollm2", model_cache), port, log)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 600
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited ({proc.returncode}):\n" + log.read_text()[-3000:])
            try:
                with urllib.request.urlopen(url + "/models", timeout=5) as r:
                    json.load(r)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("vLLM did not start in 600 s:\n" + log.read_text()[-3000:])
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def make_lora(base, path: Path, seed: int = 0) -> None:
    """A LoRA of the recipe's shape (r16 on the 7 projections), non-zero, small enough to keep the model sane."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base.model), LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3)
    model.save_pretrained(path)


def test_vllm_base_model_equals_in_process(vllm_url, real_models):
    from memory_llm.generate_openai import EngineClient, OpenAIGenerator

    _, local = real_models
    gen = OpenAIGenerator(EngineClient(vllm_url), local.tokenizer, "smollm2")
    prompts = [local.chat_ids([{"role": "user", "content": q}])[0].tolist() for q in TRAINED + OTHER]
    assert gen.generate_batch(prompts, NEW_TOKENS, return_ids=True) == \
        local.generate_batch(prompts, NEW_TOKENS, return_ids=True)
    ids = local.chat_ids([{"role": "user", "content": OTHER[0]}])
    assert "".join(gen.stream(ids, NEW_TOKENS)) == "".join(local.stream(ids, NEW_TOKENS))


def test_vllm_serves_the_adapter_as_in_process(vllm_url, real_models, tmp_path):
    """A version with a router (activation out of reach, similarity bar 0.9, keys of TRAINED): published as
    mem-v0001; questions near its keys get it, the others the base model, in-process and on vLLM alike."""
    from memory_llm import MemoryLLM
    from memory_llm.adapters import AdapterRegistry, save_keys
    from memory_llm.adapters.routing import common_prefix
    from memory_llm.generate import TransformersGenerator
    from memory_llm.generate_openai import EngineClient, OpenAIGenerator

    embedder, local = real_models
    home = tmp_path / "home"
    path = home / "adapters" / "v0001"
    make_lora(local, path)
    head = common_prefix([local.chat_ids([{"role": "user", "content": q}])[0].tolist() for q in ("a b", "x y")])
    (path / "router.json").write_text(json.dumps({"threshold": 1e9, "band": [0.0, 1.0], "head": head,
                                                  "pool": "mean", "similarity": 0.9}))
    save_keys(path, embedder.encode(TRAINED))
    (path / "manifest.json").write_text(json.dumps({"base_model": "smollm2", "version": "v0001", "memories": []}))
    AdapterRegistry(home).promote("v0001")

    engine = OpenAIGenerator(EngineClient(vllm_url), local.tokenizer, "smollm2")
    in_process = TransformersGenerator(copy.deepcopy(local.model), local.tokenizer, "smollm2")
    plain = MemoryLLM(home, embedder=embedder, generator=local, use_adapter=False, max_new_tokens=NEW_TOKENS)
    m = MemoryLLM(home, embedder=embedder, generator=engine, max_new_tokens=NEW_TOKENS)
    ref = MemoryLLM(home, embedder=embedder, generator=in_process, max_new_tokens=NEW_TOKENS)
    changed = 0
    for q in TRAINED + OTHER:
        a, b = m.ask(q, use_memory=False, log=False), ref.ask(q, use_memory=False, log=False)
        assert (a.text, a.adapter_used) == (b.text, b.adapter_used), q
        assert a.adapter_used == ("v0001" if q in TRAINED else None)
        changed += a.text != plain.ask(q, use_memory=False, log=False).text
    assert changed  # the adapter changes answers: equality means something
    assert engine.adapters() == {"mem-v0001": str(path.resolve())}
    rows = [local.chat_ids([{"role": "user", "content": q}])[0].tolist() for q in TRAINED + OTHER]
    assert engine.generate_batch(rows, NEW_TOKENS, return_ids=True) == \
        ref.generator.generate_batch(rows, NEW_TOKENS, return_ids=True)  # adapter and base rows in one batch
    assert m.served.acted_rows(4) == [True, True, False, False]
    m.adapters.rollback()
    m.reload_adapter()
    assert engine.adapters() == {}
    for x in (plain, m, ref):
        x.close()
