"""The FastAPI application: authentication, errors in OpenAI's shape, and the routes (completions.py, memory.py)."""

from __future__ import annotations

import hmac
import logging

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from memory_llm.errors import InputError, MemoryLLMError
from memory_llm.server import completions, embeddings, memory
from memory_llm.server.errors import ApiError, validation_error
from memory_llm.server.worker import GenerationWorker

logger = logging.getLogger(__name__)

MODEL_ID = "mllm"
ENGINE_WORKERS = 8  # chat completions generated at once when an engine (vLLM) generates; it batches them
BATCH = 8  # in-process: chat completions generated together in one batch (memory_llm.batching)


def create_app(m, api_key: str | None = None, model_id: str = MODEL_ID) -> FastAPI:
    """The FastAPI application serving `m` (a MemoryLLM) as `model_id`. With api_key, every /v1 route needs
    `Authorization: Bearer <api_key>`."""

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
    remote = bool(getattr(getattr(m, "served", None), "remote", False))
    if not remote and hasattr(m, "enable_batching"):  # in-process: concurrent answers share forward passes
        m.enable_batching(BATCH)
    app.state.memory, app.state.model_id = m, model_id
    app.state.worker = GenerationWorker(ENGINE_WORKERS if remote else BATCH)

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        return JSONResponse(validation_error(exc.errors()).body(), status_code=400)

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

    @app.get("/health")
    async def health():
        """Liveness, and with in-process batching the largest batch generated so far (operators, benchmarks)."""
        largest = getattr(getattr(m, "served", None), "largest_batch", None)
        return {"status": "ok", **({"largest_batch": largest} if largest is not None else {})}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "memory_llm", "base_model": m.settings.model},
                                           {"id": embeddings.embedder_id(m), "object": "model", "created": 0,
                                            "owned_by": "memory_llm"}]}

    app.include_router(completions.router)
    app.include_router(embeddings.router)
    app.include_router(memory.router)

    @app.on_event("shutdown")
    async def stop_worker():
        app.state.worker.shutdown()

    return app


def run(m, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, log=logger.info) -> None:
    """Load the models, then serve until interrupted."""
    import uvicorn

    from memory_llm.resident import announce, withdraw

    app = create_app(m, api_key)  # first: batching decides which backend loads (cold_backend while no adapter)
    m.generator, m.embedder, m.prompts  # load before the first request, not during it
    engine = getattr(getattr(m.generator, "client", None), "root", None) if getattr(m.generator, "remote", False) \
        else None
    log(f"mllm serve: http://{host}:{port}/v1 (model {MODEL_ID!r}, base {m.settings.model}"
        f"{f', generating on {engine}' if engine else ''}); Ctrl-C to stop")
    here = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # where this machine's CLI reaches it
    announce(m.settings.home, f"http://{here}:{port}/v1", api_key)  # `mllm ask` uses it (memory_llm.resident)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        withdraw(m.settings.home)
