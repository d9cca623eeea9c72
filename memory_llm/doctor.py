"""`mllm doctor`: check a home's health (SQLite, full-text index, vector index, adapters) and repair what can
be rebuilt from SQLite, rolling a broken current adapter back to the newest intact one."""

from __future__ import annotations

from typing import Callable

from memory_llm.adapters import AdapterRegistry
from memory_llm.adapters.registry import tenants
from memory_llm.errors import StoreError
from memory_llm.store import Store


def diagnose(open_store: Callable[[], Store], adapters: AdapterRegistry, model: str, repair: bool = False) -> dict:
    """Every check as {"check", "ok", "repairable", "detail"}; with repair, repair and check again. The adapter
    check runs on the shared registry and on each tenant's (check "adapters:<namespace>").

    Returns:
        {"healthy", "checks", "repaired" (what was repaired, in words)}.
    """
    try:
        store = open_store()
    except StoreError as exc:  # a file too damaged to open: nothing can be checked or rebuilt from it
        if "locked" in str(exc):
            raise
        failed = {"check": "sqlite", "ok": False, "repairable": False,
                  "detail": f"the database file is damaged and cannot be opened ({exc}); restore memory.sqlite"
                            " from a backup"}
        return {"healthy": False, "checks": [failed], "repaired": []}

    registries = [adapters] + [AdapterRegistry(adapters.home, ns) for ns in tenants(adapters.home)]

    def run() -> list[dict]:
        return store.check() + [_labelled(r, r.check(model)) for r in registries]

    checks = run()
    n = len(registries)
    repaired: list[str] = []
    if repair and any(c["repairable"] for c in checks[:-n]):
        repaired += store.repair()
    for registry, check in zip(registries, checks[-n:]):
        if repair and check["repairable"]:
            repaired.append(registry.repair(model) + (f" (namespace {registry.namespace!r})"
                                                      if registry.namespace is not None else ""))
    if repaired:
        checks = run()
    return {"healthy": all(c["ok"] for c in checks), "checks": checks, "repaired": repaired}


def _labelled(registry: AdapterRegistry, check: dict) -> dict:
    return check if registry.namespace is None else {**check, "check": f"adapters:{registry.namespace}"}
