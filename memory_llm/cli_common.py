"""What every `mllm` command shares: the typer app, common options, error handling (one line, an exit code),
progress bars and printing. cli.py and cli_chat.py register their commands on `app`."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from memory_llm.errors import MemoryLLMError

app = typer.Typer(help="A language model with a memory that grows: learn documents, ask with sources.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)

HOME = typer.Option(None, "--home", help="Memory home (default: $MLLM_HOME or ~/.local/share/memory_llm).",
                    show_default=False)
NAMESPACE = typer.Option("default", "--namespace", "-n", help="Namespace of the memories.")
JSON = typer.Option(False, "--json", help="Print one JSON object (for scripts).")
MODEL = typer.Option(None, "--model", help="LLM: 'smollm2' (default), a hub id, a local dir or a .gguf file.",
                     show_default=False)
EMBEDDER = typer.Option(None, "--embedder", help="Sentence-transformers model (default all-MiniLM-L6-v2).",
                        show_default=False)
PROMPT = typer.Option(None, "--prompt", "-p", help="Template name (default: the one whose description is most"
                      " similar to the question; see `mllm prompt list`).", show_default=False)
NO_EXEMPLARS = typer.Option(False, "--no-exemplars", help="Do not add rated exemplars as few-shot turns.")
MAX_NEW_TOKENS = typer.Option(None, "--max-new-tokens", help="Longest answer (default 200).", show_default=False)


def _print_version(value: bool) -> None:
    if value:
        from memory_llm.versions import describe

        typer.echo(describe())
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the versions of memory-llm and its model libraries, then exit.")
          ) -> None:
    """A language model with a memory that grows: learn documents, ask with sources."""


def stderr(msg: str) -> None:
    """A line on standard error."""
    typer.echo(msg, err=True)


def quiet_libraries() -> None:
    """Keep third-party progress bars, advice and deprecation notices off the user's terminal; our own warnings
    and progress bars stay (MLLM_DEBUG=1 shows the libraries' notices)."""
    debug = bool(os.environ.get("MLLM_DEBUG"))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning" if debug else "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # tqdm bars drawn outside transformers' switch (the GGUF conversion's); read when tqdm is first imported
    os.environ.setdefault("TQDM_DISABLE", "1")
    if not debug:  # libraries telling each other about renamed APIs (peft → transformers' is_gradient_checkpointing)
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)
    root = logging.getLogger("memory_llm")
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    for name in ("transformers", "sentence_transformers", "huggingface_hub", "faiss", "pypdf"):
        logging.getLogger(name).setLevel(logging.WARNING if debug else logging.ERROR)
    for name in ("pymilvus", "milvus_lite"):  # they log each failed call; it reaches us as an error, said in one line
        logging.getLogger(name).setLevel(logging.WARNING if debug else logging.CRITICAL)


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (test runners swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


@contextmanager
def handled() -> Iterator[None]:
    """Library errors → one line on stderr, exit 1; Ctrl-C → exit 130; anything else → one line, exit 2."""
    quiet_libraries()
    try:
        yield
    except MemoryLLMError as exc:
        stderr(f"Error: {exc}")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        stderr("Interrupted.")
        raise typer.Exit(130)
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except sqlite3.DatabaseError as exc:  # a damaged or unwritable database file: not a bug, no traceback
        stderr(f"Error: the memory database failed ({exc}); run `mllm doctor`")
        raise typer.Exit(1)
    except Exception as exc:  # a bug: still one line, the traceback only on request
        if os.environ.get("MLLM_DEBUG"):
            raise
        stderr(f"Internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                " (set MLLM_DEBUG=1 for the traceback)")
        raise typer.Exit(2)


LOCAL = typer.Option(False, "--local", help="Run in this process even when `mllm serve` runs for the home.")


def open_memory(home: Optional[Path], **overrides):
    """The MemoryLLM of a home (tests replace this to inject fakes)."""
    from memory_llm.assistant import MemoryLLM

    return MemoryLLM(home, **overrides)


def print_json(obj) -> None:
    """One JSON object on standard output (--json)."""
    typer.echo(json.dumps(obj, ensure_ascii=False, indent=2))


@contextmanager
def progress_bar(disabled: bool):
    """A rich progress bar on stderr; yields a callback progress(phase, done, total)."""
    if disabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        tasks: dict[str, int] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield update


def print_sources(answer) -> None:
    """An answer's numbered sources, or why it has none (an Answer, or its as_dict)."""
    d = answer if isinstance(answer, dict) else answer.as_dict()
    if d["sources"]:
        typer.echo("\nSources:")
        for i, h in enumerate(d["sources"], 1):
            snippet = " ".join(h["text"].split())
            date = f", {h['valid_from'][:10]}" if h.get("valid_from") else ""
            typer.echo(f"  [{i}] {h['source']} (#{h['id']}{date}): {snippet[:100]}…")
        for c in d.get("conflicts") or []:
            typer.echo(f"  (#{c['newer']} and #{c['older']} disagree: {', '.join(c['old_values'])} →"
                       f" {', '.join(c['new_values'])}; the newer #{c['newer']} leads)")
    elif d["used_memory"] and d["path"] == "adapter":
        typer.echo(f"\n(No sources: {d['why']}.)")
    elif d["used_memory"]:
        typer.echo("\n(No memories matched; answered without sources.)")


def resident(home: Optional[Path]):
    """The home's running `mllm serve`, when one answers (memory_llm.resident), else None."""
    from memory_llm.config import default_home
    from memory_llm.resident import find

    return find(Path(home).expanduser() if home else default_home())


def check_max_new_tokens(max_new_tokens: Optional[int]) -> None:
    """--max-new-tokens must be positive."""
    if max_new_tokens is not None and max_new_tokens <= 0:
        raise MemoryLLMError(f"--max-new-tokens must be > 0, not {max_new_tokens}")
