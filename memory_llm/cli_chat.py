"""`mllm prompt | feedback | chat | serve`: the prompt library and chatbot commands (registered on app)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from memory_llm import cli_common as common
from memory_llm.cli_common import (EMBEDDER, HOME, JSON, LOCAL, MAX_NEW_TOKENS, MODEL, NAMESPACE, NO_EXEMPLARS, PROMPT, app,
                                   handled, print_json, stderr)
from memory_llm.errors import MemoryLLMError
from memory_llm.cli_memory import print_supersession

prompt_app = typer.Typer(help="The prompt library: templates and rated exemplars.", no_args_is_help=True)
app.add_typer(prompt_app, name="prompt")

OPT_NAMESPACE = typer.Option(None, "--namespace", "-n", help="Only this namespace's exemplars (default: all).",
                             show_default=False)


@prompt_app.command("add")
def prompt_add(
    name: str = typer.Argument(..., help="Template name (letters, digits, '.', '_', '-')."),
    description: str = typer.Option(..., "--description", "-d", help="What questions it is for (matched against"
                                    " questions when no --prompt is given)."),
    system: str = typer.Option(..., "--system", "-s", help="System prompt."),
    user: str = typer.Option("{context}\n\nQuestion: {question}", "--user", "-u",
                             help="User template; {question} is required, {context} receives the sources."),
    closed_system: Optional[str] = typer.Option(None, "--closed-system", help="System prompt when no sources are"
                                                " found (default: --system).", show_default=False),
    replace: bool = typer.Option(False, "--replace", help="Overwrite a template of the same name."),
    home: Optional[Path] = HOME,
) -> None:
    """Add a template."""
    with handled():
        from memory_llm.prompts import Template

        common.open_memory(home).prompts.add(Template(name, description, system, user, closed_system), replace=replace)
        typer.echo(f"Template {name!r} saved.")


@prompt_app.command("list")
def prompt_list(
    exemplars: bool = typer.Option(False, "--exemplars", "-e", help="List exemplars instead of templates."),
    namespace: Optional[str] = OPT_NAMESPACE,
    home: Optional[Path] = HOME,
    as_json: bool = JSON,
) -> None:
    """List templates (or, with --exemplars, exemplars with their ratings)."""
    with handled():
        m = common.open_memory(home)
        if exemplars:
            rows = [e.as_dict() for e in m.store.exemplars(namespace)]
            if as_json:
                print_json(rows)
                return
            if not rows:
                typer.echo("No exemplars yet (`mllm feedback ID --good`, or `mllm prompt import FILE`).")
            for e in rows:
                typer.echo(f"#{e['id']:<5} {e['rating']:+d}  [{e['namespace']}] {e['source']:10s} "
                           f"{' '.join(e['question'].split())[:90]}")
            return
        templates = m.prompts.templates()
        if as_json:
            print_json([t.as_dict() for t in templates])
            return
        for t in templates:
            typer.echo(f"{t.name:16s} {t.description}")


@prompt_app.command("show")
def prompt_show(name: str = typer.Argument(..., help="Template name."), home: Optional[Path] = HOME,
                as_json: bool = JSON) -> None:
    """Show a template."""
    with handled():
        t = common.open_memory(home).prompts.get(name)
        if as_json:
            print_json(t.as_dict())
            return
        for key, value in t.as_dict().items():
            typer.echo(f"{key}:\n  " + value.replace("\n", "\n  ") if "\n" in value else f"{key}: {value}")


@prompt_app.command("rm")
def prompt_rm(
    name: Optional[str] = typer.Argument(None, help="Template to remove.", show_default=False),
    exemplar: Optional[int] = typer.Option(None, "--exemplar", help="Remove this exemplar id instead.",
                                           show_default=False),
    home: Optional[Path] = HOME,
) -> None:
    """Remove a template (or an exemplar with --exemplar ID)."""
    with handled():
        if (name is None) == (exemplar is None):
            raise MemoryLLMError("give a template name or --exemplar ID")
        m = common.open_memory(home)
        if exemplar is not None:
            if not m.store.remove_exemplar(exemplar):
                raise MemoryLLMError(f"unknown exemplar id {exemplar}")
            typer.echo(f"Exemplar {exemplar} removed.")
        else:
            m.prompts.remove(name)
            typer.echo(f"Template {name!r} removed.")


@prompt_app.command("import")
def prompt_import(
    file: Path = typer.Argument(..., help="A .toml, .yaml or .yml file with [[template]] / [[exemplar]] entries."),
    namespace: str = typer.Option("default", "--namespace", "-n", help="Namespace of exemplars that name none."),
    home: Optional[Path] = HOME,
    as_json: bool = JSON,
) -> None:
    """Import templates (added or replaced by name) and exemplars; all or nothing."""
    with handled():
        nt, ne = common.open_memory(home).prompts.import_file(file, namespace)
        if as_json:
            print_json({"templates": nt, "exemplars": ne})
        else:
            typer.echo(f"Imported {nt} template(s) and {ne} new exemplar(s) from {file}.")


@prompt_app.command("export")
def prompt_export(
    file: Path = typer.Argument(..., help="Where to write: .toml, .yaml or .yml."),
    namespace: Optional[str] = OPT_NAMESPACE,
    no_exemplars: bool = typer.Option(False, "--no-exemplars", help="Templates only."),
    home: Optional[Path] = HOME,
) -> None:
    """Export templates and exemplars to a file `mllm prompt import` reads."""
    with handled():
        nt, ne = common.open_memory(home).prompts.export_file(file, namespace, exemplars=not no_exemplars)
        typer.echo(f"Exported {nt} template(s) and {ne} exemplar(s) to {file}.")


@app.command()
def feedback(
    answer_id: int = typer.Argument(..., help="The answer id (`ask` prints it; `ask --json` has it as id)."),
    good: bool = typer.Option(False, "--good", help="A good answer: it becomes an exemplar."),
    bad: bool = typer.Option(False, "--bad", help="A bad answer: the exemplars it used lose a point."),
    correct: Optional[str] = typer.Option(None, "--correct", help="The right answer: learned as a memory (it"
                                          " supersedes the cited memories it contradicts) and kept as an exemplar.",
                                          show_default=False),
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n", help="Only find answers of this namespace.",
                                            show_default=False),
    home: Optional[Path] = HOME,
    as_json: bool = JSON,
) -> None:
    """Rate an answer: --good, --bad or --correct "the right answer"."""
    with handled():
        if sum([good, bad, correct is not None]) != 1:
            raise MemoryLLMError("give exactly one of --good, --bad or --correct TEXT")
        result = common.open_memory(home).feedback(answer_id, good=good, bad=bad, correction=correct, namespace=namespace)
        if as_json:
            print_json(result)
            return
        what = {"good": "kept as an exemplar", "bad": "the exemplars it used were rated down",
                "correct": f"correction learned (memory {', '.join(map(str, result['memory_ids'])) or 'unchanged'})"
                           " and kept as an exemplar"}[result["feedback"]]
        typer.echo(f"Answer {answer_id}: {what}.")
        for x in result.get("superseded", []):
            print_supersession(x)


@app.command()
def chat(
    session: Optional[str] = typer.Option(None, "--session", help="Session id; an existing one is resumed"
                                          " (default: a new id).", show_default=False),
    remember: bool = typer.Option(False, "--remember", help="Store what you state as memories of the namespace."),
    prompt: Optional[str] = PROMPT,
    no_exemplars: bool = NO_EXEMPLARS,
    k: Optional[int] = typer.Option(None, "-k", help="Memories to retrieve per turn (default 4).", show_default=False),
    namespace: str = NAMESPACE,
    max_new_tokens: Optional[int] = MAX_NEW_TOKENS,
    model: Optional[str] = MODEL,
    embedder: Optional[str] = EMBEDDER,
    home: Optional[Path] = HOME,
    local: bool = LOCAL,
) -> None:
    """Chat in the terminal with memory. Commands: /good, /bad, /correct TEXT, /sources, /quit (or Ctrl-D). A new
    session goes through a running `mllm serve` of the home unless --local, --model or --embedder."""
    with handled():
        import uuid

        common.check_max_new_tokens(max_new_tokens)
        resident = None if local or model or embedder or session else common.resident(home)
        m = resident or common.open_memory(home, model=model, embedder=embedder)
        if prompt is not None and resident is None:
            m.prompts.get(prompt)
        session = session or uuid.uuid4().hex[:12]
        messages = m.history(session, namespace) if resident is None else []
        stderr(f"Chat session {session} ({'resumed, ' + str(len(messages) // 2) + ' turn(s)' if messages else 'new'})"
                f", namespace {namespace!r}, remember {'on' if remember else 'off'}. "
                "/good /bad /correct TEXT /sources /quit")
        last = None
        while True:
            line = _read_line()
            if line is None or line.strip() in ("/quit", "/exit"):
                break
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    _chat_command(m, line, last, namespace)
                    continue
                turn = messages + [{"role": "user", "content": line}]
                stream = m.chat(turn, session_id=session, namespace=namespace, remember=remember, k=k, prompt=prompt,
                                exemplars=not no_exemplars, max_new_tokens=max_new_tokens) if resident is None else \
                    resident.chat_stream(turn, namespace, session_id=session, remember=remember, k=k, prompt=prompt,
                                         exemplars=not no_exemplars, max_tokens=max_new_tokens)
                _stdout("bot> ")
                answer = None
                for piece in stream:
                    if isinstance(piece, dict):  # the server's answer (Answer.as_dict)
                        answer = piece
                    else:
                        _stdout(piece)
                _stdout("\n")
                last = answer or stream.answer.as_dict()
                messages += [{"role": "user", "content": line}, {"role": "assistant", "content": last["answer"]}]
                if last["remembered_ids"]:
                    stderr(f"(remembered as memory #{', #'.join(map(str, last['remembered_ids']))})")
            except MemoryLLMError as exc:  # one bad turn does not end the session
                stderr(f"Error: {exc}")


def _read_line() -> str | None:
    if sys.stdin.isatty():
        try:
            return input("you> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line or None


def _stdout(text: str) -> None:
    typer.echo(text, nl=False)
    sys.stdout.flush()


def _chat_command(m, line: str, last, namespace: str) -> None:
    command, _, arg = line.partition(" ")
    if command not in ("/good", "/bad", "/correct", "/sources"):
        raise MemoryLLMError(f"unknown command {command}; use /good, /bad, /correct TEXT, /sources or /quit")
    if last is None:
        raise MemoryLLMError("no answer yet")
    if command == "/sources":
        common.print_sources(last)
        return
    if command == "/correct" and not arg.strip():
        raise MemoryLLMError("/correct needs the right answer, e.g. /correct It opened in 1897.")
    m.feedback(last["id"], good=command == "/good", bad=command == "/bad",
               correction=arg if command == "/correct" else None, namespace=namespace)
    stderr(f"(feedback recorded on answer {last['id']})")


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MLLM_API_KEY", help="Require this bearer"
                                          " token (Authorization: Bearer KEY); env MLLM_API_KEY.",
                                          show_default=False),
    model: Optional[str] = MODEL,
    embedder: Optional[str] = EMBEDDER,
    generator: Optional[str] = typer.Option(None, "--generator", help="Who generates: transformers (in-process,"
                                            " default), llama.cpp (in-process, a GGUF model, no adapters, one"
                                            " answer at a time) or openai (an OpenAI-compatible engine such as vLLM"
                                            " at --base-url; docs/server.md).", show_default=False),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="The engine's URL for --generator openai, e.g."
                                           " http://127.0.0.1:8001/v1.", show_default=False),
    generator_api_key: Optional[str] = typer.Option(None, "--generator-api-key", envvar="MLLM_GENERATOR_API_KEY",
                                                    help="Bearer token the engine wants (--api-key is this"
                                                    " server's own).", show_default=False),
    home: Optional[Path] = HOME,
) -> None:
    """Serve an OpenAI-compatible API (/v1/models, /v1/chat/completions, streaming) answering with memory,
    plus /v1/memories, /v1/search, /v1/forget and /v1/feedback. Namespace per request: X-Namespace header or
    the `user` field. With --generator openai an engine (vLLM) generates and serves the adapters."""
    with handled():
        from memory_llm.server import run

        if not 0 < port < 65536:
            raise MemoryLLMError(f"--port must be 1-65535, not {port}")
        if api_key is not None and not api_key.strip():
            raise MemoryLLMError("--api-key is empty")
        if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
            stderr(f"warning: serving on {host} without --api-key: anyone who can reach it can read the memory")
        m = common.open_memory(home, model=model, embedder=embedder, generator_backend=generator,
                               generator_base_url=base_url, generator_api_key=generator_api_key)
        run(m, host, port, api_key, log=stderr)
