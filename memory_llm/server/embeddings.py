"""OpenAI's embeddings route over the home's embedder (the one memories are indexed with): clients that embed
through the server get vectors comparable with the memory's own."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from memory_llm.server.context import served
from memory_llm.server.errors import ApiError
from memory_llm.server.schemas import EmbeddingsRequest

router = APIRouter()
MAX_INPUTS = 2048  # as OpenAI's limit per request


def embedder_id(m) -> str:
    """The model id clients name for embeddings: the home's embedder setting (all-MiniLM-L6-v2 by default)."""
    return m.settings.embedder


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingsRequest, request: Request):
    m, model_id, _ = served(request)
    if body.model not in (embedder_id(m), model_id):
        raise ApiError(404, f"The model {body.model!r} does not embed here; use {embedder_id(m)!r}.",
                       code="model_not_found", param="model")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or len(texts) > MAX_INPUTS or any(not t for t in texts):
        raise ApiError(400, f"'input' must be a non-empty string or 1-{MAX_INPUTS} non-empty strings.",
                       code="invalid_value", param="input")
    embedder = m.embedder
    if body.dimensions is not None and body.dimensions != embedder.dim:
        raise ApiError(400, f"Unsupported value for 'dimensions': this embedder makes {embedder.dim}.",
                       code="unsupported_value", param="dimensions")
    vectors = np.asarray(await run_in_threadpool(embedder.encode, texts), dtype=np.float32)
    tokens = sum(embedder.count_tokens(t) for t in texts)

    def encoded(v: np.ndarray):
        if body.encoding_format == "base64":  # little-endian float32, as OpenAI's clients decode it
            return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
        return [float(x) for x in v]

    return {"object": "list", "model": embedder_id(m),
            "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
