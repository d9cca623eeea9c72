"""Serving an adapter version: load its peft adapters (and those it stacks on) onto a base model and install
their routers."""

from __future__ import annotations

from pathlib import Path

from memory_llm.adapters.keys import read_keys, read_owners
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
        router = _held(load_router(peft_model, version.path), version)
        keys = _keys(version.path) if router is not None and router.similarity is not None and embed else None
        if keys is None:
            return peft_model, router
        return peft_model, RouterStack([router], keys=[keys], embed=embed,
                                       owners=[_owners(version.path)]).install()  # routes by similarity too
    first = version.below[0]
    peft_model = PeftModel.from_pretrained(base, str(first.path), adapter_name=first.name)
    router = stack_on(peft_model, _held(load_router(peft_model, first.path, name=first.name), first),
                      version.stack[1:], keys=_keys(first.path), embed=embed, owners=_owners(first.path))
    return peft_model.eval(), router


def stack_on(peft_model, router, versions: list[AdapterVersion], keys=None, embed=None, owners=None):
    """Load `versions`' adapters beside the ones peft_model has (whose router, or None, is given, with its keys),
    make them all active, and route them together: a RouterStack (None when no adapter has a router). With
    `embed` (token rows → sentence embeddings, routing.prompt_embedder) and keys for every adapter, a prompt gets
    the adapter holding its nearest key; `owners` are the given router's keys' memories (keys.read_owners)."""
    for v in versions:
        peft_model.load_adapter(str(v.path), adapter_name=v.name)
    names = list(peft_model.peft_config)
    peft_model.base_model.set_adapter(names, inference_mode=True)
    triples = ([(router, keys, owners)] if router is not None else []) + [
        (_held(r, v), _keys(v.path), _owners(v.path)) for v in versions
        if (r := load_router(peft_model, v.path, name=v.name)) is not None]
    if not triples:
        return None
    return RouterStack([r for r, _, _ in triples], keys=[k for _, k, _ in triples], embed=embed,
                       owners=[o for _, _, o in triples]).install()


def _held(router, version: AdapterVersion):
    """The router, told which memories (and exemplars, by negative id) its adapter was trained on."""
    if router is not None:
        router.holds = [*version.own_memories, *(-e for e in version.own_exemplars)]
    return router


def _owners(path: Path):
    """An adapter directory's keys' memories (None: not recorded); unreadable ones are a StoreError."""
    try:
        return read_owners(path)
    except ValueError as exc:
        raise StoreError(f"adapter {Path(path).name} is broken: {exc}") from None


def _keys(path: Path):
    """An adapter directory's routing keys (None: it has none); unreadable ones are a StoreError."""
    try:
        return read_keys(path)
    except ValueError as exc:
        raise StoreError(f"adapter {Path(path).name} is broken: {exc}") from None
