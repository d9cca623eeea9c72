"""Continuous batching on llama.cpp: the server's answers share decoding steps when a LlamaCppGenerator serves
(no adapter current; Settings.cold_backend).

The same scheme as memory_llm.batching (whose Batcher this extends: the queue, the jobs, their budgets, stops and
reports): one thread runs up to `max_batch` answers as sequences of one llama.cpp context. Between steps, answers
that arrived are prefilled (each its own sequence, in chunks of the context's batch size) and take their first
token; then one llama_decode advances every running sequence by a token. A sequence that ended, or whose client
left, is removed from the KV cache at once. Tokens are sampled in numpy per row (greedy, or temperature and nucleus
with a seeded generator of the row's own). A greedy answer is the lone answer's up to the kernels' rounding (a
batch's matrix products sum in another order, so a near tie can go the other way).

Each sequence has a KV window of its own (CONTEXT tokens; up to ROWS sequences, 377 MB of cache for the default
model): one shared pool (kv_unified) made every prefill attend over all rows' cells, 1.5x slower with 8 rows.
Answers wait in arrival order for a free sequence. A sequence keeps its cache when its answer ends: the next answer
seated there prefills only what differs from the tokens it holds (and the last TAIL tokens): a newcomer takes the free
sequence whose tokens share the longest prefix with its prompt when that is at least half the prompt, else the
least recently used one (so a repeated prompt finds its cache, and the system prompt is reused anyway), as
llama.cpp's own server reuses a slot's prompt (the system prompt, a repeated question, a conversation's history).
Low-level llama.cpp API (llama_batch / llama_decode / llama_memory_seq_rm): llama-cpp-python's Llama runs one
sequence."""

from __future__ import annotations

import collections
import ctypes
import queue
import time
from typing import TYPE_CHECKING

import numpy as np

from memory_llm.batching import GATHER_S, Batcher, Job
from memory_llm.errors import ModelError
from memory_llm.generate import Sampling
from memory_llm.generate_llamacpp import CONTEXT

if TYPE_CHECKING:
    from memory_llm.generate_llamacpp import LlamaCppGenerator

CHUNK = 512  # tokens per llama_decode call (the context's n_batch)
ROWS = 4  # sequences at once: on a CPU one prefill fills the cores, so more rows add cache, not speed
TAIL = 16  # a prompt's last tokens are prefilled even when a sequence holds them: the last one's logits then come
# from a batch of this many (a lone token takes another kernel, whose rounding made seeded samples differ)


class Context:
    """A llama.cpp context over a loaded model (the generator's Llama.model: its weights are not loaded twice) with
    `seqs` sequences, each with a KV window of `window` tokens."""

    def __init__(self, model, threads: int, seqs: int, window: int):
        import llama_cpp as lc

        self.lc, self.model = lc, model
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = seqs * window, CHUNK, CHUNK
        params.n_seq_max, params.kv_unified = seqs, False
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED  # as LlamaCppGenerator's own context
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise ModelError(f"llama.cpp could not make a context of {seqs} x {window} tokens")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.batch = lc.llama_batch_init(CHUNK, 0, 1)
        self.memory = lc.llama_get_memory(self.ctx)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One forward pass over (token, position, sequence, wants logits) entries (at most CHUNK)."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, int(logits)
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise ModelError(f"llama.cpp could not decode a batch of {len(entries)} tokens (code {rc})")

    def logits(self, i: int) -> np.ndarray:
        """The logits of the i-th entry of the last decode that asked for them (a copy)."""
        ptr = self.lc.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,)).copy()

    def is_end(self, token: int) -> bool:
        return bool(self.lc.llama_vocab_is_eog(self.vocab, token))

    def drop(self, seq: int, start: int = 0) -> None:
        """Forget the sequence's cache from position `start` on."""
        self.lc.llama_memory_seq_rm(self.memory, seq, start if start > 0 else -1, -1)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)  # the model stays: it is the generator's


class _Ends:
    """The tokens that end an answer (the vocabulary's end-of-generation tokens), as a set-like for Batcher._take."""

    def __init__(self, context: Context):
        self.context = context

    def __contains__(self, token: int) -> bool:
        return self.context.is_end(token)


class LlamaBatcher(Batcher):
    """Runs every `stream` of a LlamaCppGenerator in shared decoding steps (see the module docstring)."""

    def __init__(self, generator: "LlamaCppGenerator", max_batch: int = 8, window: int = CONTEXT):
        super().__init__(generator, min(max_batch, ROWS))
        self.window = window  # KV cells of each sequence: prompt and answer together
        self._held: collections.deque = collections.deque()  # arrived, waiting for a free sequence
        self._cached: dict[int, list[int]] = {}  # sequence -> the tokens its KV cache holds (positions 0..n-1)
        self.cached_tokens = 0  # prompt tokens not prefilled because a sequence held them already
        self._seated = 0  # answers seated so far; _last[seq]: when that sequence was last given one
        self._last: dict[int, int] = {}

    def stream(self, input_ids, max_new_tokens: int, stop, sampling: Sampling | None, report: dict | None,
               temperature: float = 0.0):
        """Batcher.stream; without `sampling`, greedy or sampled at `temperature` (LlamaCppGenerator.stream's)."""
        return super().stream(input_ids, max_new_tokens, stop, sampling or Sampling.at(temperature), report)

    def _text(self, tokens: list[int]) -> str:
        return self.gen.llm.detokenize(tokens).decode("utf-8", "replace")

    def close(self, wait: float | None = None) -> None:
        """End the batch thread once its running answers are done, freeing the context (a swapped-out generator);
        with `wait`, wait that many seconds for it to end."""
        self._waiting.put(None)
        if wait is not None and self._thread is not None:
            self._thread.join(wait)

    # ---- the batch thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            context = Context(self.gen.llm.model, self.gen.threads, self.max_batch, self.window)
        except BaseException as exc:  # no context: the answers waiting get the error (the next one tries again)
            self._gather(block=True)
            while self._held:
                job = self._held.popleft()
                job.done = True
                job.pieces.put(exc)
            return
        ends = _Ends(context)
        running: dict[int, Job] = {}  # sequence id -> its job
        self._cached = {s: [] for s in range(self.max_batch)}
        closing = False
        try:
            while not (closing and not running and not self._held):
                closing = self._gather(block=not running and not self._held) or closing
                new = self._seat(running)
                try:
                    for seq, job in new:
                        self._prefill(context, seq, job, ends)
                        running[seq] = job
                    self._free(context, running)
                    if new:
                        self.joined_running += len(new) if len(running) > len(new) else 0
                        self.batch_sizes.append(len(running))
                    if running:
                        self._step(context, running, ends)
                except BaseException as exc:  # every client in the batch gets the error, the thread goes on
                    for seq, job in list(running.items()) + new:
                        if not job.done:
                            job.done = True
                            job.pieces.put(exc)
                        context.drop(seq)
                        self._cached[seq] = []
                    running.clear()
        finally:
            context.close()

    def _gather(self, block: bool) -> bool:
        """Move arrived answers to the held queue (waiting for one, and a few ms for more, when idle). True when
        close() was called."""
        got, closing = [], False
        try:
            if block:
                got.append(self._waiting.get())
                deadline = time.perf_counter() + GATHER_S
                while True:
                    got.append(self._waiting.get(timeout=max(deadline - time.perf_counter(), 0)))
            while True:
                got.append(self._waiting.get_nowait())
        except queue.Empty:
            pass
        for job in got:
            if job is None:
                closing = True
            elif job.stop.is_set():  # the client left while waiting
                self._finish(job)
            else:
                self._held.append(job)
        return closing

    def _seat(self, running: dict[int, Job]) -> list[tuple[int, Job]]:
        """Held answers that get a free sequence now, in arrival order (one whose prompt cannot fit a window gets
        its error alone)."""
        free = [s for s in range(self.max_batch) if s not in running]
        seated = []
        while self._held and free:
            job = self._held.popleft()
            if job.stop.is_set():
                self._finish(job)
            elif not job.ids or len(job.ids) >= self.window:
                job.done = True
                job.pieces.put(ModelError(f"a prompt of {len(job.ids)} tokens does not fit llama.cpp's window of"
                                          f" {self.window}"))
            else:
                seq = max(free, key=lambda s: _common(self._cached[s], job.ids))  # ties: the lowest
                if 2 * _common(self._cached[seq], job.ids) < len(job.ids):  # not mostly this prompt's
                    seq = min(free, key=lambda s: self._last.get(s, -1))
                free.remove(seq)
                self._seated += 1
                self._last[seq] = self._seated
                seated.append((seq, job))
        return seated

    def _prefill(self, context: Context, seq: int, job: Job, ends) -> None:
        """The prompt through the model as sequence `seq` (from where it parts from the tokens the sequence holds), in
        chunks; the first token taken."""
        if job.sampling.seed is not None or not job.sampling.greedy:
            job.generator = np.random.default_rng(job.sampling.seed)
        ids = job.ids
        keep = max(0, min(_common(self._cached[seq], ids), len(ids) - TAIL))
        context.drop(seq, keep)
        self._cached[seq] = list(ids)
        job.report["cached_tokens"] = keep
        self.cached_tokens += keep
        for start in range(keep, len(ids), CHUNK):
            part = ids[start:start + CHUNK]
            last = start + len(part) == len(ids)
            context.decode([(t, start + i, seq, last and i == len(part) - 1) for i, t in enumerate(part)])
        job.n_past = len(ids)
        job.pending = self._pick(context.logits(len(part) - 1), job)
        self._take(job, job.pending, ends)

    def _free(self, context: Context, running: dict[int, Job]) -> None:
        """Rows that ended or whose client left give their sequence back (its cache stays for the next prompt)."""
        for seq, job in list(running.items()):
            self._end_if_left(job)
            if job.done:
                del running[seq]

    def _step(self, context: Context, running: dict[int, Job], ends) -> None:
        """One decoding step for every running row; rows that ended are freed after it."""
        rows = list(running.items())
        self.step_rows.append(len(rows))
        context.decode([(job.pending, job.n_past, seq, True) for seq, job in rows])
        for i, (seq, job) in enumerate(rows):
            job.n_past += 1
            self._cached[seq].append(job.pending)
            job.pending = self._pick(context.logits(i), job)
            self._take(job, job.pending, ends)
            if not job.done and job.n_past + 1 >= self.window:  # its window is full
                self._finish(job, "length")
        self._free(context, running)

    @staticmethod
    def _pick(logits: np.ndarray, job: Job) -> int:
        s = job.sampling
        if s.greedy:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / s.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        if s.top_p < 1.0:
            head = p[order]
            order = order[np.cumsum(head) - head < s.top_p]  # the nucleus: the smallest head reaching top_p
        q = p[order] / p[order].sum()
        return int(order[job.generator.choice(len(order), p=q)])


def _common(a: list[int], b: list[int]) -> int:
    """The length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
