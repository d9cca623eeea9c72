"""The house rules, enforced (docs/architecture.md): serving never imports training, consolidation uses components
and never the facade, components never import what is built on them, and private names stay in their module."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "memory_llm"
# the two entry points that start a consolidation round: the facade's method and the CLI's command
ROUND_STARTERS = {("assistant.py", "consolidate"), ("cli.py", "consolidate")}
FACADE = ("memory_llm.assistant", "memory_llm.cli", "memory_llm.cli_chat", "memory_llm.cli_memory", "memory_llm.server")


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE), ast.parse(path.read_text(encoding="utf-8"))


def imports(tree):
    """(imported module, names, enclosing function or None) of every import in a module, lazy ones included."""
    def walk(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.ImportFrom) and child.module:
                yield child.module, [a.name for a in child.names], inner
            elif isinstance(child, ast.Import):
                for a in child.names:
                    yield a.name, [], inner
            yield from walk(child, inner)
    yield from walk(tree, None)


def offences(rule):
    return [f"{path}: {module} ({where or 'module level'})" for path, tree in modules()
            for module, names, where in imports(tree) if rule(path, module, names, where)]


def test_serving_never_imports_training():
    def rule(path, module, names, where):
        training = module.startswith("memory_llm.consolidate") or (module == "memory_llm" and "consolidate" in names)
        return training and path.parts[0] != "consolidate" and (str(path), where) not in ROUND_STARTERS
    assert offences(rule) == []


def test_consolidation_uses_components_never_the_facade():
    def rule(path, module, names, where):
        facade = module.startswith(FACADE) or (module == "memory_llm" and "MemoryLLM" in names)
        return path.parts[0] == "consolidate" and facade
    assert offences(rule) == []


def test_components_do_not_import_what_is_built_on_them():
    above = ("memory_llm.consolidate", "memory_llm.answering", "memory_llm.learning", "memory_llm.serving",
             "memory_llm.updating") + FACADE
    components = ("store", "adapters", "ingest", "prompts")

    def rule(path, module, names, where):
        return path.parts[0] in components and module.startswith(above)
    assert offences(rule) == []


def test_the_detector_reads_text_only():
    """memory_llm/supersede.py and statements.py decide from texts (and the similarity function they are given):
    no store, no model, so learning, retrieval and consolidation share them."""
    def rule(path, module, names, where):
        return str(path) in ("supersede.py", "statements.py") and module.startswith("memory_llm") \
            and module not in ("memory_llm.errors", "memory_llm.statements")
    assert offences(rule) == []


def test_private_names_stay_in_their_module():
    def rule(path, module, names, where):
        return module.startswith("memory_llm") and any(n.startswith("_") and not n.startswith("__") for n in names)
    assert offences(rule) == []


def test_asking_loads_no_training_code():
    """The modules `ask`, `chat` and the server run on import nothing of consolidate/ (nor peft's trainer)."""
    code = ("import sys, memory_llm, memory_llm.server, memory_llm.cli, memory_llm.answering, memory_llm.serving, "
            "memory_llm.adapters; print(sorted(m for m in sys.modules if m.startswith('memory_llm.consolidate')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_import_circles():
    """No group of modules imports each other round (lazy imports included; a package counts as its __init__)."""
    names = {}
    for path, tree in modules():
        parts = ("memory_llm",) + path.with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = tree
    graph = {name: set() for name in names}
    for name, tree in names.items():
        for module, imported, _ in imports(tree):
            targets = [f"{module}.{n}" for n in imported if f"{module}.{n}" in names] or [module]
            graph[name] |= {t for t in targets if t in names and t != name}

    def reaches(start, goal, seen):
        return any(nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen))
                   for nxt in graph[start])
    circles = sorted(name for name in graph if reaches(name, name, set()))
    assert circles == []
