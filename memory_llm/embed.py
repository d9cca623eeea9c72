"""Embedders: a protocol, the sentence-transformers implementation, the same pipeline on plain transformers (the
default embedder's: a cold `ask` need not import sentence-transformers), and token counting for the chunker."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np

# torch.set_num_threads is process-wide: one query embed at a time may lower it, so that a concurrent one can
# never read the lowered count as "the" count and leave generation on one thread for good.
_THREADS_LOCK = threading.Lock()


class Embedder(Protocol):
    name: str
    dim: int

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress=None) -> np.ndarray:
        """L2-normalised float32 vectors, one row per text."""

    def count_tokens(self, text: str) -> int: ...


class SentenceEmbedder:
    """A sentence-transformers model; counts tokens with its own tokenizer so chunks fit its window."""

    def __init__(self, name: str, device: str = "auto"):
        from memory_llm.models import load_embedder

        self.name = name
        self.model = load_embedder(name, device)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.tokenizer = self.model.tokenizer
        self.max_tokens = int(getattr(self.model, "max_seq_length", 256) or 256)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress=None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(texts) <= 4:
            return self._encode_few(texts)
        out = []
        step = batch_size * 8  # large slices let sentence-transformers sort by length (less padding)
        for i in range(0, len(texts), step):
            batch = list(texts[i:i + step])
            out.append(self.model.encode(batch, batch_size=batch_size, normalize_embeddings=True,
                                         convert_to_numpy=True, show_progress_bar=False))
            if progress is not None:
                progress(len(batch))
        return np.vstack(out).astype(np.float32, copy=False)

    def _encode_few(self, texts: Sequence[str]) -> np.ndarray:
        """A question or two: one torch thread is faster (measured 20 ms vs 65-490 ms with 2 threads right after
        a generation, labs/probe_retrieve.py), the thread pool's wake-up dominates such small work."""
        with one_thread():
            vecs = self.model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True,
                                     show_progress_bar=False)
        return np.asarray(vecs, dtype=np.float32)


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread while inside (process-wide: under _THREADS_LOCK, restored after)."""
    import torch

    with _THREADS_LOCK:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def load(name: str, device: str = "auto", quick: bool = False, precision: str = "float32"):
    """The embedder for a name or path: on plain transformers when its sentence-transformers pipeline is a
    transformer, mean pooling and normalisation (all-MiniLM-L6-v2's; the same vectors, a faster start), else on
    sentence-transformers. With `quick` (a one-shot ask or search) and a BERT of that pipeline on the CPU, a few
    texts are embedded in numpy (embed_numpy.QueryEmbedder: no torch import) and more go to the transformers one.
    `precision` (Settings.embed_precision) is the plain-transformers embedder's for batches."""
    from memory_llm.models import resolve_embedder

    path = Path(resolve_embedder(name))
    if not PlainEmbedder.fits(path):
        return SentenceEmbedder(name, device)
    if quick and device in ("auto", "cpu"):
        from memory_llm.embed_numpy import QueryEmbedder

        try:
            return QueryEmbedder(name, path, lambda: PlainEmbedder(name, path, device, precision))
        except (ValueError, OSError, KeyError):  # not a plain BERT (or no tokenizer.json): transformers embeds
            pass
    return PlainEmbedder(name, path, device, precision)


class PlainEmbedder(SentenceEmbedder):
    """A local sentence-transformers model of the shape transformer → mean pooling → L2 normalisation, computed
    with transformers' AutoModel (no sentence-transformers import): cosine 1.000000 to SentenceTransformer.encode
    (tests/test_assistant.py)."""

    def __init__(self, name: str, path: Path, device: str = "auto", precision: str = "float32"):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from memory_llm.models import cpu_has_bf16, resolve_device

        self.name = name
        self.device = resolve_device(device)
        # batches (learning) under bf16 autocast where asked, or on auto where the CPU multiplies bf16 natively:
        # about 2x faster, cosine >= 0.99998 to float32 (tests/test_embed_plain.py); questions stay float32
        self.bf16 = precision == "bfloat16" or (precision == "auto" and self.device == "cpu" and cpu_has_bf16())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        config = json.loads((path / "sentence_bert_config.json").read_text(encoding="utf-8"))
        self.max_tokens = int(config.get("max_seq_length") or 256)
        self._torch = torch

    @staticmethod
    def fits(path: Path) -> bool:
        """Whether a model directory's pipeline is transformer → mean pooling → normalisation."""
        try:
            kinds = [m["type"].rsplit(".", 1)[-1] for m in json.loads((path / "modules.json").read_text("utf-8"))]
            pooling = json.loads((path / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
            (path / "sentence_bert_config.json").read_text(encoding="utf-8")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        modes = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
        return kinds == ["Transformer", "Pooling", "Normalize"] and modes == ["pooling_mode_mean_tokens"]

    def _batch(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
            vecs = torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
        return vecs.float().cpu().numpy()

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress=None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(texts) <= 4:
            return self._encode_few(texts)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths batch together
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        device_type = "cuda" if str(self.device).startswith("cuda") else "cpu"
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            with self._torch.autocast(device_type, dtype=self._torch.bfloat16, enabled=self.bf16):
                out[idx] = self._batch([texts[i] for i in idx])
            if progress is not None:
                progress(len(idx))
        return out

    def _encode_few(self, texts: Sequence[str]) -> np.ndarray:
        with one_thread():
            return self._batch(texts)
