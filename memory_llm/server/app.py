"""An OpenAI-compatible HTTP server over a MemoryLLM: /v1/models, /v1/chat/completions (JSON or server-sent
events), and /v1/memories, /v1/search, /v1/forget, /v1/feedback. Errors have OpenAI's shape:
{"error": {"message", "type", "param", "code"}}.

Generation is serialized: one worker thread runs every chat completion, one at a time (the model is not safe
for concurrent `generate`, and on a CPU two generations only slow each other down). Requests queue for it;
search, learn and forget run concurrently on the server's thread pool.
"""


import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Literal, Optional, Union

from memory_llm.errors import InputError, MemoryLLMError

logger = logging.getLogger(__name__)

MODEL_ID = "mllm"
NAMESPACE_HEADER = "x-namespace"
SESSION_HEADER = "x-session-id"


class ApiError(Exception):
    """An error response: HTTP status, OpenAI error type and code."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class GenerationWorker:
    """Runs answer streams on one thread, one at a time; pieces are handed to the event loop as they come."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mllm-generate")

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


def create_app(m, api_key: str | None = None, model_id: str = MODEL_ID):
    """The FastAPI application serving `m` (a MemoryLLM). With api_key, every /v1 route needs
    `Authorization: Bearer <api_key>`."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, field_validator
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from memory_llm.config import check_namespace

    worker = GenerationWorker()

    class ContentPart(BaseModel):
        type: str
        text: str = ""

    class Message(BaseModel):
        role: Literal["system", "user", "assistant"]
        content: Union[str, list[ContentPart]]

        @field_validator("content")
        @classmethod
        def text_only(cls, v):
            return v if isinstance(v, str) else "".join(p.text for p in v if p.type == "text")

    class ChatRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str
        messages: list[Message] = Field(min_length=1)
        stream: bool = False
        max_tokens: Optional[int] = Field(None, gt=0)
        max_completion_tokens: Optional[int] = Field(None, gt=0)
        user: Optional[str] = None
        # memory_llm extensions (the openai client sends them with extra_body=...)
        session_id: Optional[str] = None
        remember: bool = False
        prompt: Optional[str] = None
        use_memory: bool = True
        exemplars: bool = True

    class LearnRequest(BaseModel):
        text: str = Field(min_length=1)
        source: Optional[str] = None
        user: Optional[str] = None

    class SearchRequest(BaseModel):
        query: str = Field(min_length=1)
        k: int = Field(5, gt=0, le=100)
        user: Optional[str] = None

    class ForgetRequest(BaseModel):
        ids: list[int] = []
        source: Optional[str] = None
        all: bool = False
        user: Optional[str] = None

    class FeedbackRequest(BaseModel):
        answer_id: int
        rating: Optional[Literal["good", "bad"]] = None
        correction: Optional[str] = None
        user: Optional[str] = None

    def check_key(request: Request) -> None:
        if api_key is None or request.url.path == "/health":
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not given or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key: send Authorization: Bearer <key>.",
                           code="invalid_api_key")

    app = FastAPI(title="memory_llm", version="1", dependencies=[Depends(check_key)], docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.worker = worker

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        return JSONResponse(_validation_error(exc.errors()).body(), status_code=400)

    @app.exception_handler(MemoryLLMError)
    async def library_error(_request, exc: MemoryLLMError):
        status = 400 if isinstance(exc, InputError) else 500
        return JSONResponse(ApiError(status, str(exc), "invalid_request_error" if status == 400 else "server_error")
                            .body(), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), code=code).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal(_request, exc: Exception):
        logger.exception("internal error")
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}", "server_error").body(),
                            status_code=500)

    def namespace_of(request: Request, user: str | None) -> str:
        ns = request.headers.get(NAMESPACE_HEADER) or user or "default"
        check_namespace(ns)
        return ns

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "memory_llm", "base_model": m.settings.model}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if body.model != model_id:
            raise ApiError(404, f"The model {body.model!r} does not exist; this server has {model_id!r}.",
                           code="model_not_found", param="model")
        ns = namespace_of(request, body.user)
        session = body.session_id or request.headers.get(SESSION_HEADER)
        messages = [{"role": msg.role, "content": msg.content} for msg in body.messages]
        max_new = body.max_completion_tokens or body.max_tokens

        def make_stream():
            return m.chat(messages, session_id=session, namespace=ns, remember=body.remember, prompt=body.prompt,
                          use_memory=body.use_memory, exemplars=body.exemplars, max_new_tokens=max_new)

        queue, cancelled = await worker.start(make_stream)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            try:
                while True:
                    kind, value = await queue.get()
                    if kind == "piece":
                        continue
                    if kind == "error":
                        raise value
                    else:
                        return _completion(cid, created, model_id, value, m.generator.count_tokens)
            finally:
                cancelled.set()

        async def events():
            head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id}
            try:
                yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "finish_reason": None}]})
                while True:
                    kind, value = await queue.get()
                    if kind == "piece":
                        yield _sse({**head, "choices": [{"index": 0, "delta": {"content": value},
                                                          "finish_reason": None}]})
                    elif kind == "error":
                        logger.error("generation failed: %s", value)
                        yield _sse(ApiError(500, f"generation failed: {value}", "server_error").body())
                        break
                    else:
                        yield _sse({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                                    "mllm": _extension(value)})
                        break
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()  # the client left (or we are done): stop generating

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/memories")
    async def learn(body: LearnRequest, request: Request):
        ns = namespace_of(request, body.user)
        report = await run_in_threadpool(m.learn, text=body.text, namespace=ns, source=body.source)
        return {"namespace": ns, "memory_ids": report.memory_ids, **report.as_dict()}

    @app.post("/v1/search")
    async def search(body: SearchRequest, request: Request):
        ns = namespace_of(request, body.user)
        hits = await run_in_threadpool(m.search, body.query, body.k, ns)
        return {"object": "list", "namespace": ns, "data": [h.as_dict() for h in hits]}

    @app.post("/v1/forget")
    async def forget(body: ForgetRequest, request: Request):
        ns = namespace_of(request, body.user)  # a tenant only ever forgets its own memories
        if body.all and (body.ids or body.source):
            raise ApiError(400, "'all' cannot be combined with 'ids' or 'source'", param="all")
        if not (body.ids or body.source or body.all):
            raise ApiError(400, "say what to forget: 'ids', 'source' or 'all': true", code="missing_field")
        n = await run_in_threadpool(m.forget, body.ids, source=body.source, namespace=ns, everything=body.all)
        return {"namespace": ns, "forgotten": n}

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackRequest, request: Request):
        ns = namespace_of(request, body.user)
        if (body.rating is None) == (body.correction is None):
            raise ApiError(400, "give either 'rating' (good or bad) or 'correction'", code="missing_field")
        return await run_in_threadpool(m.feedback, body.answer_id, good=body.rating == "good",
                                       bad=body.rating == "bad", correction=body.correction, namespace=ns)

    @app.on_event("shutdown")
    async def stop_worker():
        worker.shutdown()

    return app


def _validation_error(errors: list[dict]) -> ApiError:
    """One OpenAI-style error for FastAPI's validation errors: malformed JSON, a missing or invalid field."""
    e = errors[0] if errors else {"type": "invalid", "loc": (), "msg": "invalid request"}
    if e.get("type") == "json_invalid":
        return ApiError(400, f"The request body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])}).",
                        code="invalid_json")
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if not loc and e.get("type") != "missing":
        return ApiError(400, "The request body must be a JSON object (Content-Type: application/json).",
                        code="invalid_json")
    if e.get("type") == "missing":
        if not loc:
            return ApiError(400, "The request body is missing (expected a JSON object).", code="missing_body")
        return ApiError(400, f"Missing required parameter: {param!r}.", code="missing_required_parameter",
                        param=param)
    message = f"Invalid parameter {param!r}: {e.get('msg')}." if param else f"Invalid request: {e.get('msg')}."
    return ApiError(400, message, code="invalid_value", param=param)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _extension(answer) -> dict:
    """What memory_llm adds to a completion: the answer id (for feedback), template, exemplars, sources."""
    d = answer.as_dict()
    keys = ("id", "namespace", "session_id", "template", "template_chosen_by", "exemplars", "sources",
            "remembered_ids", "adapter", "timings")
    out = {k: d.get(k) for k in keys}
    out["answer_id"] = out.pop("id")
    return out


def _completion(cid: str, created: int, model_id: str, answer, count_tokens) -> dict:
    prompt_tokens = int(answer.timings.get("prompt_tokens", 0))
    completion_tokens = count_tokens(answer.text) if answer.text else 0
    return {"id": cid, "object": "chat.completion", "created": created, "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "mllm": _extension(answer)}


def run(m, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, log=logger.info) -> None:
    """Load the models, then serve until interrupted."""
    import uvicorn

    m.generator, m.embedder, m.prompts  # load before the first request, not during it
    app = create_app(m, api_key)
    log(f"mllm serve: http://{host}:{port}/v1 (model {MODEL_ID!r}, base {m.settings.model}); Ctrl-C to stop")
    uvicorn.run(app, host=host, port=port, log_level="warning")
