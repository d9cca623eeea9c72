"""Serving an adapter version: load its peft adapters (and those it stacks on) onto a base model and install
their routers."""

from __future__ import annotations

from pathlib import Path

from memory_llm.adapters.keys import read_keys
from memory_llm.adapters.registry import AdapterVersion
from memory_llm.adapters.routing import load_router
from memory_llm.adapters.stack import RouterStack
from memory_llm.errors import StoreError


def attach(model, version: AdapterVersion, embed=None):
    """A base model with the version's adapters on top (its own and those it stacks on), in eval mode, and their
    routers installed (None when no adapter has one: then the adapters are always on). Returns (peft model,
    router): a Router for one adapter, a RouterStack for several (choosing by content with `embed`, see
    stack_on)."""
    from peft import PeftModel

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not version.below:
        peft_model = PeftModel.from_pretrained(base, str(version.path)).eval()
        router = load_router(peft_model, version.path)
        keys = _keys(version.path) if router is not None and router.similarity is not None and embed else None
        if keys is None:
            return peft_model, router
        return peft_model, RouterStack([router], keys=[keys], embed=embed).install()  # routes by similarity too
    first = version.below[0]
    peft_model = PeftModel.from_pretrained(base, str(first.path), adapter_name=first.name)
    router = stack_on(peft_model, load_router(peft_model, first.path, name=first.name), version.stack[1:],
                      keys=_keys(first.path), embed=embed)
    return peft_model.eval(), router


def stack_on(peft_model, router, versions: list[AdapterVersion], keys=None, embed=None):
    """Load `versions`' adapters beside the ones peft_model has (whose router, or None, is given, with its keys),
    make them all active, and route them together: a RouterStack (None when no adapter has a router). With
    `embed` (token rows → sentence embeddings, routing.prompt_embedder) and keys for every adapter, a prompt gets
    the adapter holding its nearest key."""
    for v in versions:
        peft_model.load_adapter(str(v.path), adapter_name=v.name)
    names = list(peft_model.peft_config)
    peft_model.base_model.set_adapter(names, inference_mode=True)
    pairs = ([(router, keys)] if router is not None else []) + [
        (r, _keys(v.path)) for v in versions if (r := load_router(peft_model, v.path, name=v.name)) is not None]
    if not pairs:
        return None
    return RouterStack([r for r, _ in pairs], keys=[k for _, k in pairs], embed=embed).install()


def _keys(path: Path):
    """An adapter directory's routing keys (None: it has none); unreadable ones are a StoreError."""
    try:
        return read_keys(path)
    except ValueError as exc:
        raise StoreError(f"adapter {Path(path).name} is broken: {exc}") from None
