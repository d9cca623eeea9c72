"""A generator backend on llama.cpp (llama-cpp-python): the shipped GGUF generates in-process without torch or
transformers, so a cold `ask` starts in about a second instead of five (BENCHMARKS.md, "Cold ask").

It serves a one-shot `mllm ask` in a new process and `mllm serve` (batched: memory_llm.batching_llamacpp) while no
adapter is current (adapters are torch LoRA with per-row routing: with one, the transformers generator serves):
Settings.cold_backend, ServedModel.generator. The weights are the GGUF's re-encoded once as bf16 / f16
(weights_file: the shipped Q4_1 has no fast CPU kernel). The prompt is the same chat template (read from the GGUF,
rendered with jinja2 as transformers renders it) tokenized by llama.cpp; the numbers are llama.cpp's (its
kernels, bf16 weights), so an answer can differ from the transformers generator's in later tokens: quality is
measured for both (scripts/bench_cold.py)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import numpy as np

from memory_llm.errors import ModelError

logger = logging.getLogger(__name__)

CONTEXT = 4096  # tokens of context llama.cpp allocates: ask reads at most context_tokens (1024) of sources + the question


SMALL = 512 * 2**20  # llamacpp_weights "auto" re-encodes a GGUF up to this size (a small model: prefill-bound on CPU)


def weights_file(path: Path, cache_dir: Path, weights: str = "auto") -> Path:
    """The GGUF llama.cpp runs for the model file `path` (Settings.llamacpp_weights): the file itself ("shipped", or
    "auto" for one over SMALL), or its weights re-encoded once into the cache as bf16 / f16 ("auto": bf16 on a CPU
    that multiplies it natively, else f16). On this 2-core CPU the shipped Q4_1 reads a 484-token prompt in 1.9 s,
    bf16 in 0.70 s, f16 in 0.92 s (no fast matrix kernel for Q4_1; BENCHMARKS.md, "Cold ask"); decoding stays
    about 10 ms a token. A file that cannot be re-encoded is run as shipped, with a warning."""
    if weights == "shipped" or (weights == "auto" and path.stat().st_size > SMALL):
        return path
    from memory_llm.models import converted_dir, cpu_has_bf16

    kind = weights if weights != "auto" else ("bf16" if cpu_has_bf16() else "f16")
    target = Path(f"{converted_dir(cache_dir, str(path.parent), path.name)}.{kind}.gguf")
    if target.is_file():
        return target
    import ctypes
    import os
    import tempfile

    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's loader prints every tensor
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_BF16 if kind == "bf16" else llama_cpp.LLAMA_FTYPE_MOSTLY_F16
    params.allow_requantize = True
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".requant-", suffix=".gguf", dir=target.parent)
    os.close(fd)
    try:
        if llama_cpp.llama_model_quantize(str(path).encode(), tmp.encode(), ctypes.byref(params)) != 0:
            logger.warning("llama.cpp could not re-encode %s as %s; running it as shipped", path.name, kind)
            return path
        os.replace(tmp, target)  # atomic: a half-written file is never run
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def available() -> bool:
    """Whether llama-cpp-python is installed (make setup builds it; a machine without a compiler goes without)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCppGenerator:
    """The Generator protocol (memory_llm.generate) over a llama.cpp model. `model.config` carries the context
    window the answerer checks prompts against; there is no torch model (consolidation and routing need one)."""

    remote = False

    def __init__(self, llm, name: str, template: str | None, eos: str, bos: str, threads: int = 1):
        self.llm, self.name, self.threads = llm, name, threads
        self.batcher = None  # a batching_llamacpp.LlamaBatcher (ServedModel.batching): concurrent answers share steps
        self.model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=llm.n_ctx()))
        self.tokenizer = None
        self._template, self._eos, self._bos = template, eos, bos
        self._lock = threading.Lock()  # one llama.cpp context: one generation at a time

    @classmethod
    def load(cls, name: str, path: str | Path, threads: int | None = None) -> "LlamaCppGenerator":
        try:
            import llama_cpp
        except ImportError:
            raise ModelError("llama-cpp-python is not installed (make setup builds it)") from None
        import os

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        try:
            llm = llama_cpp.Llama(str(path), n_ctx=CONTEXT, n_threads=threads or cores, flash_attn=True,
                                  verbose=False)  # flash attention: ~10% faster here, as the server's batcher
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"llama.cpp could not load {path}: {exc}") from None
        meta = llm.metadata
        template = meta.get("tokenizer.chat_template")
        piece = lambda key: llm.detokenize([int(meta[key])], special=True).decode("utf-8", "replace") \
            if key in meta else ""  # noqa: E731
        return cls(llm, name, template, piece("tokenizer.ggml.eos_token_id"), piece("tokenizer.ggml.bos_token_id"),
                   threads or cores)

    @property
    def device(self) -> str:
        return "cpu"

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def chat_text(self, messages: list[dict]) -> str:
        """The prompt text: the model's chat template rendered as transformers' apply_chat_template renders it
        (jinja2, trim_blocks and lstrip_blocks, add_generation_prompt), else the plain concatenation."""
        if not self._template:
            return "\n\n".join(m["content"] for m in messages) + "\n\nAnswer:"
        return _compiled(self._template).render(messages=messages, add_generation_prompt=True,
                                                eos_token=self._eos, bos_token=self._bos)

    def chat_ids(self, messages: list[dict]) -> np.ndarray:
        """Token ids of messages through the chat template, a 1 × n array (as the other backends' 1 × n tensor)."""
        ids = self.llm.tokenize(self.chat_text(messages).encode("utf-8"), add_bos=False, special=True)
        return np.asarray([ids], dtype=np.int64)

    def _tokens(self, input_ids) -> list[int]:
        return [int(t) for t in (input_ids[0].tolist() if hasattr(input_ids[0], "tolist") else input_ids[0])]

    def stream(self, input_ids, max_new_tokens: int = 200, temperature: float = 0.0,
               stop: threading.Event | None = None, sampling=None, report: dict | None = None) -> Iterator[str]:
        """Yield text pieces as llama.cpp generates them (Generator.stream): greedy at temperature 0, else sampled
        from the nucleus top_p (seeded when the sampling has a seed); `stop` ends it at the next token."""
        if sampling is not None:  # a generate.Sampling (not imported: generate imports this module)
            temperature, top_p, seed = sampling.temperature, sampling.top_p, sampling.seed
        else:
            top_p, seed = (0.95 if temperature > 0 else 1.0), None
        if self.batcher is not None:
            yield from self.batcher.stream(input_ids, max_new_tokens, stop, sampling, report, temperature)
            return
        greedy = temperature <= 0
        tokens = self._tokens(input_ids)
        eos = {self.llm.token_eos()}
        made: list[int] = []
        text, reason = "", "length"
        with self._lock:
            if seed is not None:
                self.llm.set_seed(seed)
            steps = self.llm.generate(tokens, temp=0.0 if greedy else temperature,
                                      top_p=1.0 if greedy else top_p, top_k=1 if greedy else 0,
                                      min_p=0.0, repeat_penalty=1.0, reset=True)
            try:
                for token in steps:
                    if token in eos or (stop is not None and stop.is_set()):
                        reason = "stop"
                        break
                    made.append(token)
                    now = self.llm.detokenize(made).decode("utf-8", "ignore")
                    if len(now) > len(text) and not now.endswith("\ufffd"):
                        yield now[len(text):]
                        text = now
                    if len(made) >= max_new_tokens:
                        break
            finally:
                steps.close()
        if report is not None:
            report["completion_tokens"] = len(made)
            report["finish_reason"] = reason if len(made) < max_new_tokens else "length"

    def generate_batch(self, prompts: list, max_new_tokens: int = 12, temperature: float = 0.0,
                       return_ids: bool = False, confidence: bool = False) -> list:
        """Continuations of several prompts, one after another (llama.cpp here runs one sequence at a time)."""
        if confidence:
            raise ModelError("the llama.cpp backend does not report answer confidence")
        out = []
        for prompt in prompts:
            report: dict = {}
            text = "".join(self.stream([list(prompt)], max_new_tokens, temperature, report=report))
            out.append(self.llm.tokenize(text.encode("utf-8"), add_bos=False) if return_ids else text)
        return out


def _compiled(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)
