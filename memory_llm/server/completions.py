"""OpenAI's chat completions over `MemoryLLM.chat`: JSON or server-sent events, with memory_llm's extension
(answer id for feedback, template, sources) under "mllm"."""

from __future__ import annotations

import json
import logging
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from memory_llm.server.context import SESSION_HEADER, namespace_of, served
from memory_llm.server.errors import ApiError
from memory_llm.generate import Sampling
from memory_llm.server.schemas import REFUSED, ChatRequest

logger = logging.getLogger(__name__)
router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    m, model_id, worker = served(request)
    if body.model != model_id:
        raise ApiError(404, f"The model {body.model!r} does not exist; this server has {model_id!r}.",
                       code="model_not_found", param="model")
    for name, (allowed, why) in REFUSED.items():
        if getattr(body, name) not in allowed:
            raise ApiError(400, f"Unsupported value for {name!r}: {why}.", code="unsupported_value", param=name)
    ns = namespace_of(request, body.user)
    session = body.session_id or request.headers.get(SESSION_HEADER)
    messages = [{"role": msg.role, "content": msg.content} for msg in body.messages]
    max_new = body.max_completion_tokens or body.max_tokens
    sampling = Sampling(body.temperature or 0.0, 1.0 if body.top_p is None else body.top_p, body.seed)
    usage_chunk = bool(body.stream_options and body.stream_options.include_usage)

    def make_stream():
        return m.chat(messages, session_id=session, namespace=ns, remember=body.remember, prompt=body.prompt, k=body.k,
                      use_memory=body.use_memory, exemplars=body.exemplars, max_new_tokens=max_new,
                      sampling=sampling, stop=body.stop or ())

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
                    return completion(cid, created, model_id, value, m.generator.count_tokens)
        finally:
            cancelled.set()

    async def events():
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                **({"usage": None} if usage_chunk else {})}
        try:
            yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]})
            while True:
                kind, value = await queue.get()
                if kind == "piece":
                    yield sse({**head, "choices": [{"index": 0, "delta": {"content": value},
                                                      "finish_reason": None}]})
                elif kind == "error":
                    logger.error("generation failed: %s", value)
                    yield sse(ApiError(500, f"generation failed: {value}", "server_error").body())
                    break
                else:
                    yield sse({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": value.finish_reason}],
                                "mllm": extension(value)})
                    if usage_chunk:  # OpenAI's last chunk: no choices, the usage of the whole request
                        yield sse({**head, "choices": [], "usage": usage(value, m.generator.count_tokens)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            cancelled.set()  # the client left (or we are done): stop generating

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def extension(answer) -> dict:
    """What memory_llm adds to a completion: the answer as `Answer.as_dict` gives it (its id as answer_id, for
    feedback; template, exemplars, sources, adapter, which path answered and why, timings), less the text."""
    out = answer.as_dict()
    out["answer_id"] = out.pop("id")
    out.pop("answer")
    return out


def usage(answer, count_tokens) -> dict:
    """OpenAI's usage object: the prompt's tokens (of which cached: not computed again) and those generated (as the
    generator counted them)."""
    prompt_tokens = int(answer.timings.get("prompt_tokens", 0))
    completion_tokens = answer.completion_tokens
    if completion_tokens is None:
        completion_tokens = count_tokens(answer.text) if answer.text else 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": int(answer.timings.get("cached_tokens", 0))}}


def completion(cid: str, created: int, model_id: str, answer, count_tokens) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": answer.finish_reason}],
            "usage": usage(answer, count_tokens), "mllm": extension(answer)}
