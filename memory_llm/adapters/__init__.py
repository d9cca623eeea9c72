"""Adapters for serving and for consolidation alike: the versions on disk (registry), their routers (routing,
keys) and loading them onto a model (attach). Serving imports only this package, never memory_llm.consolidate."""

from memory_llm.adapters.attach import attach, stack_on
from memory_llm.adapters.keys import read_keys, save_keys
from memory_llm.adapters.registry import AdapterRegistry, AdapterVersion
from memory_llm.adapters.remote import ContentRoute, engine_name, publish, unpublish
from memory_llm.adapters.routing import Router, load_router, read_router
from memory_llm.adapters.stack import RouterStack, prompt_embedder

__all__ = ["AdapterRegistry", "AdapterVersion", "ContentRoute", "Router", "RouterStack", "attach", "engine_name",
           "load_router", "prompt_embedder", "publish", "read_keys", "read_router", "save_keys", "stack_on",
           "unpublish"]
