"""Chat completions run on worker threads: each prepares its answer (retrieval, prompt) and streams it.
In-process the generator batches the streams running at once (memory_llm.batching: up to BATCH answers
share each forward pass); when an engine generates (generator_backend = openai) the engine batches them.
Requests beyond the workers queue."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


class GenerationWorker:
    """Runs answer streams on `workers` threads (one: one at a time); a job is prepared, generated and finished on
    one thread (per-request routing state is thread-local); pieces are handed to the event loop as they come."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mllm-generate")

    async def start(self, make_stream: Callable[[], Any]) -> tuple[asyncio.Queue, threading.Event]:
        """Queue a job; returns once its stream is prepared (or raises its preparation error) with a queue of
        ("piece", text) ... ("done", Answer) | ("error", exc), and an event that cancels the generation."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def put(kind: str, value) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is gone (server shutting down)
                cancelled.set()

        def work() -> None:
            if cancelled.is_set():  # the client left while queued
                return
            try:
                stream = make_stream()
            except BaseException as exc:
                put("error", exc)
                return
            put("started", None)
            try:
                for piece in stream:
                    if cancelled.is_set():
                        stream.cancel()  # stops at the next token; draining joins the generation thread
                    else:
                        put("piece", piece)
                if not cancelled.is_set():
                    put("done", stream.answer)
            except BaseException as exc:
                put("error", exc)

        loop.run_in_executor(self._executor, work)
        try:
            kind, value = await queue.get()
        except asyncio.CancelledError:  # the client left while queued: skip (or stop) its job
            cancelled.set()
            raise
        if kind == "error":
            raise value
        return queue, cancelled

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
