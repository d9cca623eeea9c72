"""Fixtures: an isolated home per test, a deterministic fake embedder and a tiny causal LM built from a config;
the real offline models (session-scoped) for end-to-end tests."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
FK_JSON = REPO.parent / "shared" / "data" / "fictional_knowledge" / "fictional_knowledge.json"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One converted-model cache for the whole run (the GGUF is converted once, ~20 s)."""
    return Path(os.environ.get("MLLM_TEST_CACHE") or tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(autouse=True)
def env_setup(tmp_path, monkeypatch, model_cache):
    monkeypatch.setenv("MLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLLM_CACHE", str(model_cache))
    for name in list(os.environ):
        if name.startswith("MLLM_") and name not in ("MLLM_HOME", "MLLM_CACHE", "MLLM_TEST_CACHE"):
            monkeypatch.delenv(name)


class FakeEmbedder:
    """Deterministic bag-of-words embedder: texts sharing words get similar vectors."""

    name = "fake-embedder"

    def __init__(self, dim: int = 64):
        self.dim = dim
        self.calls = 0

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def encode(self, texts, batch_size: int = 64, progress=None) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                h = int(hashlib.md5(word.encode()).hexdigest(), 16)
                out[i, h % self.dim] += 1.0 if (h >> 8) % 2 else -1.0
            norm = np.linalg.norm(out[i])
            out[i] = out[i] / norm if norm else out[i]
            if not norm:
                out[i, 0] = 1.0
        return out


def tiny_tokenizer():
    """A character-level fast tokenizer with a chat template, built in memory (no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


def tiny_model(tok):
    """A 2-layer Llama built from a config (seeded: the same weights every time), in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_generator():
    from memory_llm.generate import TransformersGenerator

    tok = tiny_tokenizer()
    return TransformersGenerator(tiny_model(tok), tok, "tiny-llama")


@pytest.fixture
def fake_embedder():
    return FakeEmbedder()


@pytest.fixture
def mem(tmp_path, fake_embedder, tiny_generator):
    """A MemoryLLM on fakes: fast, deterministic."""
    from memory_llm import MemoryLLM

    m = MemoryLLM(tmp_path / "home", embedder=fake_embedder, generator=tiny_generator, max_new_tokens=8,
                  source_floor=0.0)  # the fake's bag-of-words cosines are not MiniLM's: no floor (test_assistant
    # tests the floor itself)
    yield m
    m.reload_adapter()  # the tiny generator is shared: an adapter this home attached must not reach other tests
    m.close()


@pytest.fixture(scope="session")
def real_models(model_cache):
    """The real offline default models, loaded once for all end-to-end tests."""
    from memory_llm.config import DEFAULT_EMBEDDER, DEFAULT_MODEL
    from memory_llm.embed import SentenceEmbedder
    from memory_llm.generate import TransformersGenerator

    return SentenceEmbedder(DEFAULT_EMBEDDER), TransformersGenerator.load(DEFAULT_MODEL, model_cache)


def run_cli(*args: str, env: dict | None = None, input: str | None = None, timeout: float = 600):
    """`mllm ...` as a real subprocess (the installed console script's module)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "memory_llm", *args], capture_output=True, text=True,
                          env=full_env, input=input, timeout=timeout)
