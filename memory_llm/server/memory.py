"""memory_llm's own routes: learn (/v1/memories), a memory, its update, history and restore (/v1/memories/{id}),
search, forget and feedback, each in the caller's namespace. They run on the server's thread pool, beside
generation."""

from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from memory_llm.server.context import namespace_of, served
from memory_llm.server.errors import ApiError
from memory_llm.server.schemas import FeedbackRequest, ForgetRequest, LearnRequest, SearchRequest, UpdateRequest

router = APIRouter()


@router.post("/v1/memories")
async def learn(body: LearnRequest, request: Request):
    m = served(request)[0]
    ns = namespace_of(request, body.user)
    report = await run_in_threadpool(m.learn, text=body.text, namespace=ns, source=body.source, key=body.key,
                                     supersedes=body.supersedes, date=body.date, detect=body.detect)
    return {"namespace": ns, "memory_ids": report.memory_ids, **report.as_dict()}

@router.get("/v1/memories/{memory_id}")
async def memory(memory_id: int, request: Request, user: Optional[str] = None):
    m = served(request)[0]
    ns = namespace_of(request, user)  # a memory of another namespace is not found
    found = await run_in_threadpool(m.memory, memory_id, ns)
    return {"object": "memory", **found.as_dict()}

@router.post("/v1/memories/{memory_id}")
async def update(memory_id: int, body: UpdateRequest, request: Request):
    m = served(request)[0]
    ns = namespace_of(request, body.user)
    report = await run_in_threadpool(m.update, memory_id, body.text, date=body.date, namespace=ns)
    return {"namespace": ns, "memory_ids": report.memory_ids, **report.as_dict()}

@router.get("/v1/memories/{memory_id}/history")
async def history(memory_id: int, request: Request, user: Optional[str] = None):
    m = served(request)[0]
    ns = namespace_of(request, user)
    return {"object": "memory.history", **await run_in_threadpool(m.memory_history, memory_id, ns)}

@router.post("/v1/memories/{memory_id}/restore")
async def restore(memory_id: int, request: Request, user: Optional[str] = None):
    m = served(request)[0]
    ns = namespace_of(request, user)
    return await run_in_threadpool(m.restore, memory_id, ns)

@router.post("/v1/search")
async def search(body: SearchRequest, request: Request):
    m = served(request)[0]
    ns = namespace_of(request, body.user)
    hits = await run_in_threadpool(m.search, body.query, body.k, ns, body.history)
    return {"object": "list", "namespace": ns, "data": [h.as_dict() for h in hits]}

@router.post("/v1/forget")
async def forget(body: ForgetRequest, request: Request):
    m = served(request)[0]
    ns = namespace_of(request, body.user)  # a tenant only ever forgets its own memories
    n = await run_in_threadpool(m.forget, body.ids, source=body.source, namespace=ns, everything=body.all,
                                superseded=body.superseded)
    return {"namespace": ns, "forgotten": n}

@router.post("/v1/feedback")
async def feedback(body: FeedbackRequest, request: Request):
    m = served(request)[0]
    ns = namespace_of(request, body.user)
    if (body.rating is None) == (body.correction is None):
        raise ApiError(400, "give either 'rating' (good or bad) or 'correction'", code="missing_field")
    return await run_in_threadpool(m.feedback, body.answer_id, good=body.rating == "good",
                                   bad=body.rating == "bad", correction=body.correction, namespace=ns)
