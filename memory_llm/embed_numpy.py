"""The default embedder's query path without torch: all-MiniLM-L6-v2 (a 6-layer BERT, mean pooling, L2
normalisation) in numpy, for the few texts of a question. A cold `ask` then imports neither torch nor transformers
when llama.cpp generates (generate_llamacpp); learning and large batches stay on PlainEmbedder (torch).

Written out (about 40 lines of arithmetic) because the torch-free alternatives need more than they give: an ONNX
export (onnx, onnxruntime and an export step at set-up) or a model hub (fastembed). The vectors equal
PlainEmbedder's to a cosine above 0.99999 (tests/test_embed_plain.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np


class NumpyBert:
    """A BertModel's forward (absolute positions, token type 0, exact GELU) over float32 numpy arrays."""

    def __init__(self, path: Path):
        from safetensors.numpy import load_file

        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if config.get("model_type") != "bert" or config.get("position_embedding_type", "absolute") != "absolute" \
                or config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path} is not a plain BERT model")
        self.w = load_file(str(path / "model.safetensors"))
        self.w = {k.removeprefix("bert."): v for k, v in self.w.items()}
        self.layers, self.heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + self.eps) * self.w[name + ".weight"] + self.w[name + ".bias"]

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def hidden(self, ids: Sequence[int]) -> np.ndarray:
        """The last hidden states (n × hidden) of one sequence of token ids (no padding)."""
        w, n = self.w, len(ids)
        x = w["embeddings.word_embeddings.weight"][list(ids)] + w["embeddings.position_embeddings.weight"][:n] \
            + w["embeddings.token_type_embeddings.weight"][0]
        x = self._norm(x, "embeddings.LayerNorm")
        d = x.shape[-1] // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            q, k, v = (self._linear(x, p + "attention.self." + s).reshape(n, self.heads, d).transpose(1, 0, 2)
                       for s in ("query", "key", "value"))
            scores = q @ k.transpose(0, 2, 1) / np.sqrt(d)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            context = (scores / scores.sum(-1, keepdims=True)) @ v
            x = self._norm(x + self._linear(context.transpose(1, 0, 2).reshape(n, -1), p + "attention.output.dense"),
                           p + "attention.output.LayerNorm")
            h = self._linear(x, p + "intermediate.dense")
            x = self._norm(x + self._linear(0.5 * h * (1.0 + erf(h / np.sqrt(2.0))), p + "output.dense"),
                           p + "output.LayerNorm")
        return x


def erf(x: np.ndarray) -> np.ndarray:
    """erf to about 1e-7 (Abramowitz and Stegun 7.1.26), vectorised: numpy has none, scipy takes 0.5 s to import."""
    sign, a = np.sign(x), np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


class QueryEmbedder:
    """Embeds a question or two in numpy (NumpyBert, mean pooling, L2 normalisation), tokenized with the model's
    tokenizer.json by `tokenizers` (no transformers). For more texts it loads and hands them to `full` (a
    PlainEmbedder, torch), so learning embeds as fast as before."""

    FEW = 4

    def __init__(self, name: str, path: Path, full):
        from tokenizers import Tokenizer

        self.name, self.path, self._full_factory, self._full = name, path, full, None
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._counter = Tokenizer.from_file(str(path / "tokenizer.json"))  # counts whole texts: no truncation
        self._counter.no_truncation()
        self._counter.no_padding()
        config = json.loads((path / "sentence_bert_config.json").read_text(encoding="utf-8"))
        self.max_tokens = int(config.get("max_seq_length") or 256)
        self.tokenizer.enable_truncation(self.max_tokens)
        self.tokenizer.no_padding()
        self.bert = NumpyBert(path)
        self.dim = int(self.bert.w["embeddings.word_embeddings.weight"].shape[1])

    @property
    def full_loaded(self) -> bool:
        """Whether the transformers embedder was needed (more than a few texts) and loaded."""
        return self._full is not None

    @property
    def full(self):
        if self._full is None:
            self._full = self._full_factory()
        return self._full

    def count_tokens(self, text: str) -> int:
        return len(self._counter.encode(text, add_special_tokens=False).ids)

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress=None) -> np.ndarray:
        if len(texts) > self.FEW:
            return self.full.encode(texts, batch_size, progress)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for r, text in enumerate(texts):
            vec = self.bert.hidden(self.tokenizer.encode(text).ids).mean(0)
            out[r] = vec / max(float(np.linalg.norm(vec)), 1e-12)
        return out
