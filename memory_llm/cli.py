"""The `mllm` command: parse, call the MemoryLLM facade, print. Library errors become one line and exit 1."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from memory_llm import cli_common as common
from memory_llm import cli_memory  # noqa: F401  (registers learn, search, forget, update, history, restore first)
from memory_llm.cli_common import (EMBEDDER, HOME, JSON, LOCAL, MAX_NEW_TOKENS, MODEL, NAMESPACE, NO_EXEMPLARS, PROMPT, app, check_max_new_tokens, handled, print_json, print_sources, progress_bar, stderr)
from memory_llm.errors import MemoryLLMError

@app.command()
def ask(
    question: str = typer.Argument(..., help="The question."),
    k: Optional[int] = typer.Option(None, "-k", help="Memories to retrieve (default 4).", show_default=False),
    no_memory: bool = typer.Option(False, "--no-memory", help="Closed-book: answer without retrieval."),
    no_adapter: bool = typer.Option(False, "--no-adapter", help="Do not use the consolidated adapter."),
    prompt: Optional[str] = PROMPT,
    no_exemplars: bool = NO_EXEMPLARS,
    namespace: str = NAMESPACE,
    max_new_tokens: Optional[int] = MAX_NEW_TOKENS,
    model: Optional[str] = MODEL,
    embedder: Optional[str] = EMBEDDER,
    home: Optional[Path] = HOME,
    local: bool = LOCAL,
    as_json: bool = JSON,
) -> None:
    """Answer a question from memory; streams the answer, then lists its sources and the answer id. A running
    `mllm serve` of the home answers it (no start-up) unless --local, --no-adapter, --model or --embedder."""
    with handled():
        check_max_new_tokens(max_new_tokens)
        resident = None if local or no_adapter or model or embedder else common.resident(home)
        if resident is not None:
            stream = resident.ask_stream(question, namespace, k=k, use_memory=not no_memory, prompt=prompt,
                                         exemplars=not no_exemplars, max_tokens=max_new_tokens)
        else:
            m = common.open_memory(home, model=model, embedder=embedder, use_adapter=not no_adapter,
                                   quick_start=True)
            stream = m.ask_stream(question, k=k, namespace=namespace, use_memory=not no_memory,
                                  max_new_tokens=max_new_tokens, prompt=prompt, exemplars=not no_exemplars)
        answer = None
        for piece in stream:
            if isinstance(piece, dict):  # the resident server's answer, as Answer.as_dict gives it
                answer = piece
            elif not as_json:
                typer.echo(piece, nl=False)
                sys.stdout.flush()
        answer = answer or stream.answer.as_dict()
        if as_json:
            print_json(answer)
            return
        typer.echo("")
        print_sources(answer)
        shots = f", {len(answer['exemplars'])} exemplar(s)" if answer["exemplars"] else ""
        if answer["adapter"]:
            shots += f", adapter {answer['adapter']} {'on' if answer['adapter_active'] else 'off (routed to the base)'}"
            if answer["adapter_used"] and answer["adapter_used"] != answer["adapter"]:
                shots += f" ({answer['adapter_used']} beneath it acted)"
        if answer["path"] == "retrieval+adapter":
            shots += ", beside the sources"
        typer.echo(f"\n(answer {answer['id']}, template {answer['template']}{shots}; "
                   f"mllm feedback {answer['id']} --good | --bad | --correct \"...\")")


@app.command()
def stats(home: Optional[Path] = HOME, as_json: bool = JSON) -> None:
    """Show what the memory holds: memories, sources, index, models, home."""
    with handled():
        st = common.open_memory(home).stats()
        if as_json:
            print_json(st)
            return
        typer.echo(f"home:        {st['home']}")
        typer.echo(f"memories:    {st['memories']} in {st['sources']} source(s)"
                   + (f", {st['superseded']} superseded (kept)" if st.get("superseded") else ""))
        for ns, n in st["namespaces"].items():
            typer.echo(f"  {ns}: {n}")
        typer.echo(f"index:       {st['index_type']}, {st['index_size']} vectors, {st['index_bytes']} bytes")
        typer.echo(f"database:    {st['db_bytes']} bytes, schema v{st['schema_version']}")
        typer.echo(f"model:       {st['model']}")
        typer.echo(f"embedder:    {st['embedder'] or st['embedder_setting']}")


@app.command()
def sources(namespace: Optional[str] = typer.Option(None, "--namespace", "-n", help="Only this namespace.",
                                                    show_default=False),
            home: Optional[Path] = HOME, as_json: bool = JSON) -> None:
    """List learned sources with their chunk counts."""
    with handled():
        rows = common.open_memory(home).sources(namespace)
        if as_json:
            print_json(rows)
            return
        for r in rows:
            typer.echo(f"{r['chunks']:5d}  [{r['namespace']}]  {r['uri']}")


@app.command()
def doctor(repair: bool = typer.Option(False, "--repair", help="Rebuild what can be rebuilt from SQLite."),
           home: Optional[Path] = HOME, as_json: bool = JSON) -> None:
    """Check the memory home (SQLite, full-text index, embeddings, vector index, adapters); --repair fixes what it can."""
    with handled():
        from memory_llm.versions import describe, versions

        report = {**common.open_memory(home).doctor(repair), "versions": versions()}
        if as_json:
            print_json(report)
        else:
            typer.echo(describe(report["versions"]))
            for line in report["repaired"]:
                typer.echo(f"repaired: {line}")
            for c in report["checks"]:
                hint = " (mllm doctor --repair can fix this)" if c["repairable"] else ""
                typer.echo(f"{'ok  ' if c['ok'] else 'FAIL'}  {c['check']:10s} {c['detail']}{hint}")
        if not report["healthy"]:
            raise typer.Exit(1)


@app.command(name="eval")
def eval_(
    file: Path = typer.Argument(..., help="JSON Lines probe file (format: docs/eval-format.md)."),
    mode: str = typer.Option("rag", "--mode", help="base (nothing), rag (retrieval), closed (adapter only),"
                                                    " hybrid (each probe answered both ways, closed and rag; the more"
                                                    " confident answer is kept) or served (exactly what `ask` does:"
                                                    " every probe asked as a question, retrieval and the adapter)."),
    k: Optional[int] = typer.Option(None, "-k", help="Memories to retrieve in rag mode.", show_default=False),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N probes.", show_default=False),
    prompt: Optional[str] = PROMPT,
    no_exemplars: bool = NO_EXEMPLARS,
    namespace: str = NAMESPACE,
    model: Optional[str] = MODEL,
    home: Optional[Path] = HOME,
    as_json: bool = JSON,
) -> None:
    """Measure accuracy on an eval file: overall and by tag."""
    with handled():
        from memory_llm.evaluate import load_probes

        n = len(load_probes(file)[:limit]) * (2 if mode == "hybrid" else 1)  # validates the file before any model
        # loads; hybrid answers every probe twice (closed and rag)
        m = common.open_memory(home, model=model)
        with progress_bar(as_json) as progress:
            cb = (lambda done, _s={"n": 0}: (_s.__setitem__("n", _s["n"] + done), progress("eval", _s["n"], n))) \
                if progress else None
            result = m.evaluate(file, mode, k=k, namespace=namespace, limit=limit, progress=cb, prompt=prompt,
                                exemplars=not no_exemplars)
        if as_json:
            print_json({k: v for k, v in result.items() if k != "probes"})
            return
        typer.echo(f"mode {result['mode']}: accuracy {result['accuracy']:.3f} on {result['n']} probes"
                   f" ({result['seconds']:.0f} s)")
        for tag, acc in result["by_tag"].items():
            typer.echo(f"  {tag:12s} {acc:.3f}  (n={result['by_tag_n'][tag]})")
        if result.get("paths"):
            typer.echo("  answered by: " + ", ".join(f"{p} {n}" for p, n in result["paths"].items()))


@app.command()
def consolidate(
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Time budget; stops cleanly, keeps"
                                                " finished work, never half-promotes.", show_default=False),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be trained."),
    full: bool = typer.Option(False, "--full", help="Rebuild the adapter from all memories."),
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n", help="Give this namespace an adapter of its"
                                            " own that only its requests get (a tenant); its memories leave the"
                                            " shared adapter.", show_default=False),
    recipe_file: Optional[Path] = typer.Option(None, "--recipe", help="TOML file of recipe fields to change"
                                               " (docs/consolidation.md lists them).", show_default=False),
    processes: int = typer.Option(1, "--processes", min=1, help="Train in this many processes (one per GPU, or"
                                  " CPU processes); the same result as one."),
    launcher: Optional[str] = typer.Option(None, "--launcher", help="Command that starts the training workers"
                                           " itself, with {job} for the job directory (several machines: see"
                                           " docs/consolidation.md).", show_default=False),
    home: Optional[Path] = HOME,
    as_json: bool = JSON,
) -> None:
    """Distil new memories into the model's weights (a LoRA adapter), gated and versioned.

    Exit codes: 0 promoted / nothing new / dry run; 3 candidate rejected by the gate, or training diverged
    (current adapter kept); 4 time budget reached (partial work kept); 75 another consolidation is running; 1 error.
    """
    with handled():
        from memory_llm.consolidate.recipe import Recipe
        from memory_llm.consolidate.run import EXIT_LOCKED, ConsolidationLocked

        recipe = Recipe.from_toml(recipe_file) if recipe_file is not None else None  # a bad file fails first
        m = common.open_memory(home)
        try:
            with progress_bar(as_json) as progress:
                summary = m.consolidate(max_minutes=max_minutes, dry_run=dry_run, full=full, namespace=namespace,
                                        recipe=recipe, progress=progress, processes=processes,
                                        launcher=launcher)
        except ConsolidationLocked as exc:
            stderr(f"Error: {exc}")
            raise typer.Exit(EXIT_LOCKED)
        if as_json:
            print_json(summary.as_dict())
        else:
            typer.echo(summary.message[:1].upper() + summary.message[1:] + ".")
            if summary.training:
                t = summary.training
                typer.echo(f"  memories {summary.memories}, exemplars {summary.exemplars}, items {summary.items},"
                           f" steps {t['steps']}, "
                           f"{t['tokens_per_s']} tokens/s, loss {t['loss_first']} → {t['loss_last']}")
            for k, v in (summary.metrics or {}).items():
                cur = (summary.current_metrics or {}).get(k)
                typer.echo(f"  {k:22s} {v}" + (f"   (current {cur})" if cur is not None else ""))
            for r in summary.reasons:
                typer.echo(f"  {r}")
            typer.echo(f"  {summary.seconds:.0f} s")
        raise typer.Exit(summary.exit_code)


adapters_app = typer.Typer(help="Consolidated adapter versions: list, show, rollback.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")


TENANT = typer.Option(None, "--namespace", "-n", help="A tenant's adapters (consolidated with --namespace).",
                      show_default=False)

@adapters_app.command("list")
def adapters_list(namespace: Optional[str] = TENANT, home: Optional[Path] = HOME, as_json: bool = JSON) -> None:
    """List adapter versions; * marks the current one. Tenants (namespaces with their own) are named at the end."""
    with handled():
        from memory_llm.adapters.registry import tenants

        m = common.open_memory(home)
        reg = m.adapter_registry(namespace)
        others = sorted(tenants(m.settings.home))
        current = reg.current_name()
        rows = [{"version": v.name, "current": v.name == current, "memories": len(v.manifest.get("memories", [])),
                 "base_model": v.manifest.get("base_model"), "metrics": v.manifest.get("metrics", {}),
                 "stack": [b.name for b in v.below]}
                for v in reg.versions()]
        if as_json:
            print_json({"namespace": namespace, "current": current, "versions": rows, "broken": reg.problems(),
                        "tenants": others})
            return
        if not rows:
            typer.echo("No adapters yet (run `mllm consolidate" + (f" --namespace {namespace}" if namespace else "")
                       + "`).")
        for r in rows:
            met = r["metrics"]
            typer.echo(f"{'*' if r['current'] else ' '} {r['version']}  {r['memories']} memories  "
                       f"reliability {met.get('reliability')}  locality {met.get('locality')}"
                       + (f"  (beside {', '.join(r['stack'])})" if r["stack"] else ""))
        for p in reg.problems():
            stderr(f"broken: {p}")
        if others and namespace is None:
            typer.echo(f"Namespaces with adapters of their own (mllm adapters list -n NS): {', '.join(others)}")


@adapters_app.command("show")
def adapters_show(version: Optional[str] = typer.Argument(None, help="Version (default: current)."),
                  namespace: Optional[str] = TENANT, home: Optional[Path] = HOME) -> None:
    """Print a version's manifest (JSON)."""
    with handled():
        reg = common.open_memory(home).adapter_registry(namespace)
        name = version or reg.current_name()
        if not name:
            raise MemoryLLMError("no current adapter; name a version")
        print_json(reg.get(name).manifest)


@adapters_app.command("rollback")
def adapters_rollback(to: Optional[str] = typer.Option(None, "--to", help="Make this version current.",
                                                       show_default=False),
                      namespace: Optional[str] = TENANT, home: Optional[Path] = HOME) -> None:
    """Make the previous intact version (or --to VERSION) current; with none left, serve the base model."""
    with handled():
        v = common.open_memory(home).adapter_registry(namespace).rollback(to)
        typer.echo(f"Current adapter: {v.name}." if v else "No adapter is current now; the base model answers.")


from memory_llm import cli_chat  # noqa: E402,F401  (registers prompt, feedback, chat, serve)


def main() -> None:
    """Console entry point."""
    try:
        app()
    except MemoryLLMError as exc:  # raised outside a command body (should not happen)
        stderr(f"Error: {exc}")
        sys.exit(1)
