"""Batched generation: answers streamed at the same time share forward passes.

A TransformersGenerator with a Batcher (its `batcher`; ServedModel.batching, the server's in-process path) hands
each `stream` call to one background thread. The thread gathers what is waiting (up to `max_batch` answers, a few
milliseconds for more to arrive), left-pads the prompts into one batch, runs one prefill (the adapter's router
decides per row there, as it does for a single prompt) and then one decoding step for all rows at a time, each row
with its own sampling settings, token budget and stop; a row whose client left (its `stop` set) or that ended is
dropped from the batch at the next step. Answers arriving meanwhile wait for the next batch (static batching: no
row joins a running batch). Greedy rows give the tokens a lone `generate` gives (tests/test_batching.py).
"""

from __future__ import annotations

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


class Batcher:
    """Runs every `stream` of one generator in shared batches on a thread of its own (see the module docstring).
    `stats` keeps the size of each batch run (the server's throughput figures read it)."""

    def __init__(self, generator: "TransformersGenerator", max_batch: int = 8):
        self.gen, self.max_batch = generator, max_batch
        self._waiting: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batch_sizes: list[int] = []

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
        while True:
            jobs = [self._waiting.get()]
            deadline = time.perf_counter() + GATHER_S
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self._waiting.get(timeout=max(deadline - time.perf_counter(), 0)))
                except queue.Empty:
                    break
            for j in [j for j in jobs if j.stop.is_set()]:  # the client left while waiting
                self._finish(j)
            jobs = [j for j in jobs if not j.done]
            if not jobs:
                continue
            self.batch_sizes.append(len(jobs))
            try:
                self._generate(jobs)
            except BaseException as exc:  # every waiting client gets the error, the thread goes on
                for j in jobs:
                    if not j.done:
                        j.done = True
                        j.pieces.put(exc)

    def _generate(self, jobs: list[Job]) -> None:
        import torch

        gen, tok = self.gen, self.gen.tokenizer
        model, device = gen.model, gen.device
        ends = {tok.eos_token_id, tok.pad_token_id}
        for j in jobs:
            if j.sampling.seed is not None and not j.sampling.greedy:
                j.generator = torch.Generator(device="cpu").manual_seed(j.sampling.seed)
        ids, mask = left_pad([j.ids for j in jobs], tok.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
            probe = getattr(gen, "route_probe", None)  # the adapter's per-row routing, read right after prefill
            if probe is not None:
                for j, routed in zip(jobs, probe(len(jobs))):
                    j.report["routed"] = routed
            for step in range(max(j.max_new for j in jobs)):
                logits = out.logits[:, -1, :].float()
                nxt = [self._pick(logits[r], j) if not j.done else tok.pad_token_id for r, j in enumerate(jobs)]
                for j, t in zip(jobs, nxt):
                    if not j.done:
                        self._take(j, t, ends)
                if all(j.done for j in jobs):
                    break
                last = torch.tensor([[t] for t in nxt], device=device)
                mask = torch.cat([mask, torch.ones((len(jobs), 1), dtype=mask.dtype, device=device)], dim=1)
                positions = positions[:, -1:] + 1
                out = model(input_ids=last, attention_mask=mask, position_ids=positions, use_cache=True,
                            **cache_kwargs(model, output_cache(out)))
        for j in jobs:
            if not j.done:
                self._finish(j)

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
        text = self.gen.tokenizer.decode(job.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # a character still being spelled in bytes waits for its last token
            if len(text) > len(job.text):
                job.pieces.put(text[len(job.text):])
            job.text = text
        if len(job.tokens) >= job.max_new:
            self._finish(job, "length")

    @staticmethod
    def _finish(job: Job, reason: str = "stop") -> None:
        job.done = True
        job.report.setdefault("finish_reason", reason)
        job.report["completion_tokens"] = len(job.tokens)
        job.pieces.put(None)
