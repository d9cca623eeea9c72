"""An adapter per tenant: `consolidate(namespace=NS)` trains and promotes an adapter that only NS's requests get,
in-process and on an engine (where tenants' adapters sit side by side). Fast, on the tiny model; the real-model
test that a tenant's adapter answers its facts closed-book and never acts for another is in test_e2e_tenant.py."""

import json
import shutil

from typer.testing import CliRunner

from fake_engine import FakeEngine
from test_consolidate import FACTS, FAST, OPEN
from test_generate_openai import QUESTIONS, fresh, make_version, remote

from memory_llm import MemoryLLM, cli
from memory_llm.adapters import AdapterRegistry, engine_name
from memory_llm.adapters.registry import tenant_slug, tenants


def test_a_consolidated_namespace_gets_an_adapter_no_other_namespace_gets(mem, monkeypatch):
    acme = mem.learn(text=FACTS[0], source="acme-fact", namespace="acme").memory_ids
    other = mem.learn(text=FACTS[1], source="globex-fact", namespace="globex").memory_ids
    summary = mem.consolidate(namespace="acme", recipe=FAST, floors=OPEN)
    assert summary.status == "promoted" and summary.version == "v0001" and summary.namespace == "acme"
    assert "for namespace 'acme'" in summary.message
    home = mem.settings.home
    assert tenants(home) == {"acme": "acme"} and mem.adapters.current_name() is None  # nothing shared yet
    own = mem.adapter_registry("acme")
    assert own.root == home / "adapters" / "tenants" / "acme" and own.current_name() == "v0001"
    assert own.get("v0001").manifest["memories"] == acme  # acme's memories only
    assert {m for m, _ in mem.store.ledger("acme/v0001")} == set(acme)
    assert mem.ask("Who built the lighthouse?", namespace="acme", max_new_tokens=4).adapter == "acme/v0001"
    assert mem.ask("Who sings?", namespace="globex", max_new_tokens=4).adapter is None
    assert mem.ask("Who sings?", max_new_tokens=4).adapter is None

    # the shared adapter leaves the tenant's memories out, and the tenant never gets the shared adapter
    shared = mem.consolidate(recipe=FAST, floors=OPEN)
    assert shared.status == "promoted" and shared.version == "v0001" and shared.namespace is None
    assert mem.adapters.get("v0001").manifest["memories"] == other
    assert mem.ask("Who sings?", namespace="globex", max_new_tokens=4).adapter == "v0001"
    assert mem.ask("Who built it?", namespace="acme", max_new_tokens=4).adapter == "acme/v0001"
    assert mem.consolidate(namespace="acme", recipe=FAST, floors=OPEN).status == "nothing-new"

    # the CLI lists and rolls back a tenant's versions; rolled back, the tenant gets the base model, not the shared
    from memory_llm import cli_common

    monkeypatch.setattr(cli_common, "open_memory", lambda home=None: MemoryLLM(
        mem.settings.home, embedder=mem.embedder, generator=mem.new_generator(), max_new_tokens=4))
    runner = CliRunner()
    listed = json.loads(runner.invoke(cli.app, ["adapters", "list", "--json", "-n", "acme"]).stdout)
    assert listed["namespace"] == "acme" and listed["current"] == "v0001" and listed["tenants"] == ["acme"]
    assert "acme" in runner.invoke(cli.app, ["adapters", "list"]).stdout
    out = runner.invoke(cli.app, ["adapters", "rollback", "--namespace", "acme"])
    assert out.exit_code == 0 and "base model answers" in out.stdout
    assert mem.adapters.current_name() == "v0001"  # the shared one untouched
    fresh_mem = MemoryLLM(home, embedder=mem.embedder, generator=mem.new_generator(), max_new_tokens=4)
    assert fresh_mem.ask("Who built it?", namespace="acme").adapter is None
    assert fresh_mem.ask("Who sings?", namespace="globex").adapter == "v0001"
    report = fresh_mem.doctor()
    assert {c["check"] for c in report["checks"]} >= {"adapters", "adapters:acme"} and report["healthy"]
    fresh_mem.close()


def test_tenant_directories_and_engine_names_are_safe_and_distinct(tmp_path):
    assert tenant_slug("acme") == "acme" and tenant_slug("team_7") == "team_7"
    odd = ["a/b", "a b", "../x", "v0001", "Ünïcode", "a" * 128]
    slugs = {tenant_slug(ns) for ns in odd}
    assert len(slugs) == len(odd) and all(s.replace("_", "").isalnum() and len(s) <= 43 for s in slugs)
    reg = AdapterRegistry(tmp_path, "a/b")
    reg.create()
    assert reg.root.parent == tmp_path / "adapters" / "tenants" and tenants(tmp_path) == {"a/b": reg.tenant}
    assert AdapterRegistry(tmp_path).versions() == []  # the tenants' directory is not a shared version


def tenant_version(home, namespace: str, name: str, tiny, seed: int):
    """A version of a tenant's registry, as consolidation writes it (made in a scratch home, moved in)."""
    reg = AdapterRegistry(home, namespace)
    reg.create()
    shutil.move(str(make_version(home / "scratch", name, tiny, seed=seed)), str(reg.root / name))
    reg.promote(name)
    return reg.root / name


def test_on_an_engine_each_tenant_gets_its_own_adapter_beside_the_others(tmp_path, tiny_generator, fake_embedder):
    """Tenants' adapters are published side by side (mem-<slug>-vNNNN); each namespace's requests go to its own,
    answering as in-process; promoting or rolling back one registry never unloads another's."""
    home = tmp_path / "home"
    shutil.move(str(make_version(home / "scratch", "v0001", tiny_generator, seed=1)), str(home / "adapters" / "v0001"))
    AdapterRegistry(home).promote("v0001")
    acme_path = tenant_version(home, "acme", "v0001", tiny_generator, seed=2)
    tenant_version(home, "a b", "v0001", tiny_generator, seed=3)
    with FakeEngine(fresh(tiny_generator)) as engine:
        m = MemoryLLM(home, embedder=fake_embedder, generator=remote(engine, tiny_generator), max_new_tokens=8)
        local = MemoryLLM(home, embedder=fake_embedder, generator=fresh(tiny_generator), max_new_tokens=8)
        answers = {}
        for ns, used in [("default", "mem-v0001"), ("acme", "mem-acme-v0001"), ("a b", engine_name(
                AdapterRegistry(home, "a b").get("v0001")))]:
            engine.requests.clear()
            a = m.ask(QUESTIONS[0], namespace=ns, use_memory=False, log=False)
            b = local.ask(QUESTIONS[0], namespace=ns, use_memory=False, log=False)
            assert a.text == b.text and a.adapter == b.adapter and a.adapter_used == a.adapter, ns
            assert engine.models_used() == [used], ns
            answers[ns] = a.text
        assert len(set(answers.values())) == 3  # three adapters, three answers: each namespace got its own
        assert set(engine.adapters) == {"mem-v0001", "mem-acme-v0001", engine_name(
            AdapterRegistry(home, "a b").get("v0001"))}
        assert engine.adapters["mem-acme-v0001"] == str(acme_path.resolve())
        # rolling the shared adapter back unloads it alone; rolling acme's back unloads acme's alone
        AdapterRegistry(home).rollback()
        m.reload_adapter()
        assert "mem-v0001" not in engine.adapters and "mem-acme-v0001" in engine.adapters
        AdapterRegistry(home, "acme").rollback()
        m.reload_adapter("acme")
        assert "mem-acme-v0001" not in engine.adapters and len(engine.adapters) == 1
        assert m.ask(QUESTIONS[0], namespace="acme", use_memory=False, log=False).adapter is None
        for x in (m, local):
            x.close()
