"""The `mllm` commands that read and change memories: learn, search, forget, update, history, restore. Parse, call
the MemoryLLM facade, print."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from memory_llm import cli_common as common
from memory_llm.cli_common import EMBEDDER, HOME, JSON, LOCAL, NAMESPACE, app, handled, print_json, progress_bar, stderr
from memory_llm.errors import MemoryLLMError

DATE = typer.Option(None, "--date", help="When it became true (ISO 8601: 2026-12-03 or 2026-12-03T14:30;"
                    " default now).", show_default=False)
OF_NAMESPACE = typer.Option(None, "--namespace", "-n", help="Only a memory of this namespace.", show_default=False)


@app.command()
def learn(
    paths: List[Path] = typer.Argument(None, help="Files or directories to learn; '-' reads standard input.",
                                       show_default=False),
    text: Optional[str] = typer.Option(None, "--text", "-t", help="Learn this text.", show_default=False),
    key: Optional[str] = typer.Option(None, "--key", help="Name the text: a later text with the same key"
                                      " supersedes it.", show_default=False),
    supersedes: List[int] = typer.Option([], "--supersedes", help="A memory id the new memory supersedes"
                                         " (repeatable)."),
    date: Optional[str] = DATE,
    no_detect: bool = typer.Option(False, "--no-detect", help="Do not look for memories the new ones restate with"
                                   " other values."),
    namespace: str = NAMESPACE,
    include: List[str] = typer.Option([], "--include", help="Glob of directory members to learn (repeatable)."),
    exclude: List[str] = typer.Option([], "--exclude", help="Glob of directory members to skip (repeatable)."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="JSON/JSONL field holding the text.",
                                             show_default=False),
    encoding: str = typer.Option("utf-8", "--encoding", help="Text encoding of the files."),
    max_file_mb: Optional[float] = typer.Option(None, "--max-file-mb", help="Largest file accepted (default 20).",
                                                show_default=False),
    embedder: Optional[str] = EMBEDDER,
    home: Optional[Path] = HOME,
    as_json: bool = JSON,
) -> None:
    """Teach the memory: txt, md, html, pdf, json/jsonl files, folders (recursively), stdin or --text. Says what
    the new memories supersede (a restated fact, a re-learned file's changed parts); `mllm restore ID` undoes it."""
    with handled():
        paths = list(paths or [])
        stdin_text = None
        if any(str(p) == "-" for p in paths):
            paths = [p for p in paths if str(p) != "-"]
            stdin_text = sys.stdin.read()
        if text is not None and stdin_text is not None:
            raise MemoryLLMError("give either --text or '-' (stdin), not both")
        if not paths and text is None and stdin_text is None:
            raise MemoryLLMError("nothing to learn: give files, folders, '-' or --text")
        m = common.open_memory(home, embedder=embedder, max_file_mb=max_file_mb)
        source = None
        if stdin_text is not None:
            from memory_llm.store.sources import content_uri

            text, source = stdin_text, None if key else content_uri("stdin", stdin_text)
        with progress_bar(as_json) as progress:
            report = m.learn(paths, text=text, namespace=namespace, include=include, exclude=exclude,
                             text_field=text_field, encoding=encoding, source=source, key=key,
                             supersedes=supersedes, date=date, detect=False if no_detect else None,
                             progress=progress)
        if as_json:
            print_json({**report.as_dict(), "memory_ids": report.memory_ids})
            return
        skipped = report.duplicates_skipped + report.near_duplicates_skipped
        typer.echo(f"Learned {report.files} source(s): {report.chunks_added} chunk(s) added, "
                   f"{report.unchanged} unchanged, {skipped} duplicate chunk(s) skipped, "
                   f"{report.replaced_sources} replaced, in {report.seconds:.1f} s.")
        for x in report.superseded:
            print_supersession(x)
        for line in report.skipped_files:
            stderr(f"skipped: {line}")


def print_supersession(x: dict) -> None:
    """One line per supersession a learn (or a correction) made, with how to undo it."""
    why = {"source": "its file changed", "key": "the same key", "user": "you said so", "update": "updated",
           "correction": "your correction", "detected": "restated with another value"}.get(x["reason"], x["reason"])
    values = x["detail"].get("old_values") if x.get("detail") else None
    old = " ".join((x.get("old_text") or "").split())
    by = f" by #{x['new_id']}" if x.get("new_id") else ""
    what = "a sentence of " if x.get("sentence") else ""
    typer.echo(f"  superseded {what}#{x['old_id']}{by} ({why}{': ' + ', '.join(values) if values else ''}):"
               f" {old[:90]}{'…' if len(old) > 90 else ''}  (undo: mllm restore {x['old_id']})")


@app.command()
def search(
    query: str = typer.Argument(..., help="What to look for."),
    k: int = typer.Option(5, "-k", help="How many memories."),
    history: bool = typer.Option(False, "--history", help="Superseded memories too (marked)."),
    namespace: str = NAMESPACE,
    home: Optional[Path] = HOME,
    local: bool = LOCAL,
    as_json: bool = JSON,
) -> None:
    """List the memories closest to a query (dense + lexical, fused), with when each became true."""
    with handled():
        resident = None if local else common.resident(home)
        if resident is not None:
            hits = resident.call("/search", {"query": query, "k": k, "history": history}, namespace)["data"]
        else:
            hits = [h.as_dict() for h in common.open_memory(home, quick_start=True).search(query, k, namespace,
                                                                                          history=history)]
        if as_json:
            print_json({"query": query, "hits": hits})
            return
        if not hits:
            typer.echo("No memories match.")
        for h in hits:
            snippet = " ".join(h["text"].split())
            mark = "" if h.get("status", "live") == "live" else f"  [{h['status']}]"
            typer.echo(f"#{h['id']}  {h['score']:.4f}  {h['source']}  {(h.get('valid_from') or '')[:10]}{mark}\n"
                       f"    {snippet[:300]}")


@app.command()
def forget(
    ids: List[int] = typer.Argument(None, help="Memory ids to forget.", show_default=False),
    source: Optional[str] = typer.Option(None, "--source", help="Forget every memory from this source.",
                                         show_default=False),
    everything: bool = typer.Option(False, "--all", help="Forget every memory (in the namespace, if given)."),
    superseded: bool = typer.Option(False, "--superseded", help="Forget the superseded memories only (their"
                                    " history goes with them)."),
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n", help="Only within this namespace.",
                                            show_default=False),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation with --all."),
    home: Optional[Path] = HOME,
    as_json: bool = JSON,
) -> None:
    """Forget memories by id, by source, all of them (asks first), or the superseded ones."""
    with handled():
        ids = list(ids or [])
        m = common.open_memory(home)
        if everything and not yes and not (ids or source):
            scope = f"namespace {namespace!r}" if namespace else "every namespace"
            n = m.stats()["namespaces"].get(namespace, 0) if namespace else m.stats()["memories"]
            if not sys.stdin.isatty():
                raise MemoryLLMError(f"refusing to forget {n} memories in {scope} without --yes")
            typer.confirm(f"Forget all {n} memories in {scope}?", abort=True)
        n = m.forget(ids, source=source, namespace=namespace, everything=everything, superseded=superseded)
        if n == 0 and (ids or source):
            what = f"source {source!r}" if source else "id(s) " + ", ".join(map(str, ids))
            raise MemoryLLMError(f"nothing forgotten: no memory matches {what}")
        if as_json:
            print_json({"forgotten": n})
        else:
            typer.echo(f"Forgot {n} memor{'y' if n == 1 else 'ies'}.")


@app.command()
def update(
    memory_id: int = typer.Argument(..., help="The memory to replace."),
    text: str = typer.Argument(..., help="What is true now."),
    date: Optional[str] = DATE,
    namespace: Optional[str] = OF_NAMESPACE,
    home: Optional[Path] = HOME,
    as_json: bool = JSON,
) -> None:
    """Replace a memory with a new text: the text is learned and supersedes it (kept; `mllm restore ID` undoes)."""
    with handled():
        report = common.open_memory(home).update(memory_id, text, date=date, namespace=namespace)
        if as_json:
            print_json({**report.as_dict(), "memory_ids": report.memory_ids})
            return
        new = ", ".join(f"#{i}" for i in report.memory_ids) or "an existing memory"
        typer.echo(f"Updated #{memory_id}: now {new}.")
        for x in report.superseded:
            print_supersession(x)


@app.command()
def history(
    memory_id: int = typer.Argument(..., help="A memory id."),
    namespace: Optional[str] = OF_NAMESPACE,
    home: Optional[Path] = HOME,
    as_json: bool = JSON,
) -> None:
    """Show a memory's chain: what it superseded and what superseded it, when and why, oldest first."""
    with handled():
        chain = common.open_memory(home).memory_history(memory_id, namespace)
        if as_json:
            print_json(chain)
            return
        for mem in chain["memories"]:
            here = " <" if mem["id"] == memory_id else ""
            typer.echo(f"#{mem['id']}  {mem['status']:17s} true from {mem['valid_from'][:10]}, learned"
                       f" {mem['learned_at'][:16].replace('T', ' ')}  {mem['source']}{here}\n"
                       f"    {' '.join(mem['text'].split())[:200]}")
        for i in chain["forgotten"]:
            typer.echo(f"#{i}  forgotten")
        if chain["events"]:
            typer.echo("")
        for e in chain["events"]:
            new = f"#{e['new_id']}" if e["new_id"] else "nothing (removed from its source)"
            what = f"a sentence of #{e['old_id']}" if e["sentence"] else f"#{e['old_id']}"
            undone = f"; reverted {e['reverted_at'][:16].replace('T', ' ')}" if e["reverted_at"] else ""
            typer.echo(f"{e['created_at'][:16].replace('T', ' ')}  {what} superseded by {new} ({e['reason']})"
                       f"{undone}")
        if not chain["events"]:
            typer.echo("(nothing superseded it, and it superseded nothing)")


@app.command()
def restore(
    memory_id: int = typer.Argument(..., help="A superseded memory."),
    namespace: Optional[str] = OF_NAMESPACE,
    home: Optional[Path] = HOME,
    as_json: bool = JSON,
) -> None:
    """Make a superseded memory live again (the supersession is reverted and kept in its history)."""
    with handled():
        result = common.open_memory(home).restore(memory_id, namespace)
        if as_json:
            print_json(result)
            return
        n = len(result["reverted"])
        typer.echo(f"Restored #{memory_id}" + (f" ({n} supersession{'s' * (n != 1)} reverted)." if n else
                                               " (it was not superseded)."))
