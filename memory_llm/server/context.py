"""What every route reads from the request: the served MemoryLLM (app.state) and the caller's namespace."""

from __future__ import annotations

from fastapi import Request

from memory_llm.config import DEFAULT_NAMESPACE, check_namespace

NAMESPACE_HEADER = "x-namespace"
SESSION_HEADER = "x-session-id"


def served(request: Request):
    """(the MemoryLLM served, the model id clients name, the generation worker) of the app handling request."""
    state = request.app.state
    return state.memory, state.model_id, state.worker


def namespace_of(request: Request, user: str | None) -> str:
    """The request's namespace: the X-Namespace header, else the body's `user`, else the default one."""
    ns = request.headers.get(NAMESPACE_HEADER) or user or DEFAULT_NAMESPACE
    check_namespace(ns)
    return ns
