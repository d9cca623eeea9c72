"""Batched generation: answers streamed at the same time share forward passes (continuous batching).

A TransformersGenerator with a Batcher (its `batcher`; ServedModel.batching, the server's in-process path) hands
each `stream` call to one background thread, which runs a batch of up to `max_batch` rows one decoding step at a
time. Between steps, answers that arrived join: they are prefilled together (the adapter's router decides per row
there, as it does for a single prompt), each takes its first token, and their cache rows are merged into the running
batch (left-padded, masked). Every row has its own sampling settings, token budget, stop and adapter gates; a row
that ended, or whose client left (its `stop` set), leaves the batch at the next step and its cache is freed. Greedy
rows give the tokens a lone `generate` gives, whoever shares or joins their batch (tests/test_batching.py).

Hand-written on the model's forward and DynamicCache rather than transformers' own continuous batching
(generate_batch / ContinuousBatchingManager): that packs all rows into one flat sequence with paged attention, where
per-row adapter gates (adapters.routing) cannot act."""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from memory_llm.generate import Sampling, cache_kwargs, left_pad, output_cache

if TYPE_CHECKING:
    from memory_llm.generate import TransformersGenerator

GATHER_S = 0.005  # how long the batch thread waits for more answers once one arrives


@dataclass
class Job:
    """One answer in a batch: its prompt ids, budget, sampling, stop event, report and the queue of its pieces."""

    ids: list[int]
    max_new: int
    sampling: Sampling
    stop: threading.Event
    report: dict
    pieces: queue.Queue = field(default_factory=queue.Queue)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    generator: object = None  # a torch.Generator of its own when seeded
    pending: int = -1  # the token picked last, fed at the next step
    gates: tuple = ()  # the adapter gates of its row (ServedModel.row_gates), restored whenever the batch changes
    n_past: int = 0  # tokens in its cache (a llama.cpp sequence's next position)


class Rows:
    """The running batch: its jobs in row order, their cache (a transformers DynamicCache), attention mask and next
    positions. Rows join by merge and leave by drop_done; positions only padding covers are trimmed away."""

    def __init__(self):
        self.jobs: list[Job] = []
        self.cache = self.mask = self.next_pos = None
        self.changed = False  # rows joined or left since the gates were last set

    @property
    def joinable(self) -> bool:
        """Whether newcomers can join while rows run: the cache is made of plain growing layers whose key and value
        tensors can be padded and stacked (a sliding-window or quantized cache cannot: newcomers then wait)."""
        layers = getattr(self.cache, "layers", None)
        return self.cache is None or (layers is not None and all(type(x).__name__ == "DynamicLayer" for x in layers))

    def merge(self, jobs: list[Job], cache, mask, next_pos) -> None:
        import torch

        if not self.jobs:
            self.jobs, self.cache, self.mask, self.next_pos = list(jobs), cache, mask, next_pos
            self.changed = True
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, width, -2), _pad_left(new.keys, width, -2)])
            old.values = torch.cat([_pad_left(old.values, width, -2), _pad_left(new.values, width, -2)])
        self.mask = torch.cat([_pad_left(self.mask, width, -1), _pad_left(mask, width, -1)])
        self.next_pos = torch.cat([self.next_pos, next_pos])
        self.jobs += jobs
        self.changed = True

    def drop_done(self) -> None:
        keep = [i for i, j in enumerate(self.jobs) if not j.done]
        if len(keep) == len(self.jobs):
            return
        if not keep:
            self.__init__()
            return
        import torch

        index = torch.tensor(keep, device=self.mask.device)
        self.mask, self.next_pos = self.mask[index], self.next_pos[index]
        self.jobs = [self.jobs[i] for i in keep]
        self.changed = True
        if not self.joinable:  # another kind of cache selects its own rows (no trimming)
            self.cache.batch_select_indices(index)
            return
        start = int((self.mask.sum(0) > 0).nonzero()[0])  # columns that are padding in every row left go too
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]


def _pad_left(t, width: int, dim: int):
    """`t` left-padded with zeros along `dim` to `width`."""
    import torch

    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


class Batcher:
    """Runs every `stream` of one generator in shared batches on a thread of its own (see the module docstring).
    batch_sizes, step_rows and joined_running tell how the batches went (the server's /health reads them)."""

    def __init__(self, generator: "TransformersGenerator", max_batch: int = 8):
        self.gen, self.max_batch = generator, max_batch
        self._waiting: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batch_sizes: collections.deque = collections.deque(maxlen=4096)  # rows after each join
        self.step_rows: collections.deque = collections.deque(maxlen=4096)  # rows in each decoding step
        self.joined_running = 0  # answers that joined a batch already decoding

    @property
    def alive(self) -> bool:
        """Whether the batch thread runs (it starts with the first answer)."""
        return self._thread is not None and self._thread.is_alive()

    def stream(self, input_ids, max_new_tokens: int, stop: threading.Event | None, sampling: Sampling | None,
               report: dict | None) -> Iterator[str]:
        job = Job([int(t) for t in input_ids[0]], max_new_tokens, sampling or Sampling(), stop or threading.Event(),
                  report if report is not None else {})
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="mllm-batch", daemon=True)
                self._thread.start()
        self._waiting.put(job)
        while True:
            piece = job.pieces.get()
            if piece is None:
                return
            if isinstance(piece, BaseException):
                raise piece
            yield piece

    # ---- the batch thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        rows = Rows()
        while True:
            room = self.max_batch - len(rows.jobs) if rows.joinable else 0
            new = self._admit(block=not rows.jobs, room=room)
            try:
                if new:
                    self._join(rows, new)
                if rows.jobs:
                    self._step(rows)
            except BaseException as exc:  # every client in the batch gets the error, the thread goes on
                for j in rows.jobs + new:
                    if not j.done:
                        j.done = True
                        j.pieces.put(exc)
                rows = Rows()

    def _admit(self, block: bool, room: int) -> list[Job]:
        """The answers waiting (up to `room`): when the batch is idle, wait for one and a few ms for more."""
        jobs: list[Job] = []
        if block:
            jobs.append(self._waiting.get())
            deadline = time.perf_counter() + GATHER_S
            while len(jobs) < room:
                try:
                    jobs.append(self._waiting.get(timeout=max(deadline - time.perf_counter(), 0)))
                except queue.Empty:
                    break
        while len(jobs) < room:
            try:
                jobs.append(self._waiting.get_nowait())
            except queue.Empty:
                break
        for j in jobs:
            if j.stop.is_set():  # the client left while waiting
                self._finish(j)
        return [j for j in jobs if not j.done]

    def _join(self, rows: "Rows", jobs: list[Job]) -> None:
        """Prefill the newcomers in one left-padded batch, take each one's first token, and merge their cache rows
        into the running batch (the shorter side is left-padded with masked positions)."""
        import torch

        gen, tok = self.gen, self.gen.tokenizer
        for j in jobs:
            if j.sampling.seed is not None and not j.sampling.greedy:
                j.generator = torch.Generator(device="cpu").manual_seed(j.sampling.seed)
        ids, mask = left_pad([j.ids for j in jobs], tok.pad_token_id)
        ids, mask = ids.to(gen.device), mask.to(gen.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = gen.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        probe = getattr(gen, "route_probe", None)  # the adapter's per-row routing, read right after the prefill
        if probe is not None:
            for j, routed in zip(jobs, probe(len(jobs))):
                j.report["routed"] = routed
        gates = getattr(gen, "row_gates", None)
        for j, g in zip(jobs, gates(len(jobs)) if gates is not None else [()] * len(jobs)):
            j.gates = g
        logits = out.logits[:, -1, :].float()
        ends = {tok.eos_token_id, tok.pad_token_id}
        for r, j in enumerate(jobs):
            j.pending = self._pick(logits[r], j)
            self._take(j, j.pending, ends)
        self.joined_running += len(jobs) if rows.jobs else 0
        rows.merge(jobs, output_cache(out), mask, positions[:, -1] + 1)
        rows.drop_done()
        self.batch_sizes.append(len(rows.jobs))

    def _step(self, rows: "Rows") -> None:
        """One decoding step for every running row; rows that ended or whose client left are dropped after it."""
        import torch

        gen, tok = self.gen, self.gen.tokenizer
        for j in rows.jobs:
            self._end_if_left(j)  # a client that left since the last step frees its row now
        rows.drop_done()
        if not rows.jobs:
            return
        set_gates = getattr(gen, "set_row_gates", None)
        if set_gates is not None and rows.changed:
            set_gates([j.gates for j in rows.jobs])
        rows.changed = False
        self.step_rows.append(len(rows.jobs))
        last = torch.tensor([[j.pending] for j in rows.jobs], device=gen.device)
        rows.mask = torch.cat([rows.mask, torch.ones_like(rows.mask[:, :1])], dim=1)
        with torch.inference_mode():
            out = gen.model(input_ids=last, attention_mask=rows.mask, position_ids=rows.next_pos[:, None],
                            use_cache=True, **cache_kwargs(gen.model, rows.cache))
        rows.cache, rows.next_pos = output_cache(out), rows.next_pos + 1
        logits = out.logits[:, -1, :].float()
        ends = {tok.eos_token_id, tok.pad_token_id}
        for r, j in enumerate(rows.jobs):
            j.pending = self._pick(logits[r], j)
            self._take(j, j.pending, ends)
        rows.drop_done()

    @staticmethod
    def _pick(logits, job: Job) -> int:
        import torch

        s = job.sampling
        if s.greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < s.top_p  # the nucleus: the smallest head reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs / probs.sum(), 1, generator=job.generator))

    def _take(self, job: Job, token: int, ends: set) -> None:
        """One new token for a row: its text piece out, and whether the row is done."""
        if job.stop.is_set():
            self._finish(job, "stop")
            return
        if token in ends:
            self._finish(job, "stop")
            return
        job.tokens.append(token)
        text = self._text(job.tokens)
        if not text.endswith("\ufffd"):  # a character still being spelled in bytes waits for its last token
            if len(text) > len(job.text):
                job.pieces.put(text[len(job.text):])
            job.text = text
        if len(job.tokens) >= job.max_new:
            self._finish(job, "length")

    def _end_if_left(self, job: Job) -> None:
        """End a running answer whose client left (its stop set): it leaves the batch at once."""
        if job.stop.is_set() and not job.done:
            self._finish(job, "stop")

    def _text(self, tokens: list[int]) -> str:
        return self.gen.tokenizer.decode(tokens, skip_special_tokens=True)

    @staticmethod
    def _finish(job: Job, reason: str = "stop") -> None:
        job.done = True
        job.report.setdefault("finish_reason", reason)
        job.report["completion_tokens"] = len(job.tokens)
        job.pieces.put(None)
