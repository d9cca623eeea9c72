"""Shared helpers for the benchmark scripts: stats, tables, and replacing one section of BENCHMARKS.md."""

from __future__ import annotations

import datetime as _dt
import fcntl
import os
import platform
import re
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"


def pct(values, q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation (numpy's default)."""
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def log(msg: str) -> None:
    """A timestamped progress line on stderr."""
    print(f"[{_dt.datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server a benchmark starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median(values) -> float:
    return float(statistics.median(values))


def table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def command_line() -> str:
    script = os.path.relpath(sys.argv[0], ROOT) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", script, *sys.argv[1:]])


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"


def today() -> str:
    return _dt.datetime.now().strftime("%Y-%m-%d %H:%M")


def write_section(title: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replace the '## title' section of BENCHMARKS.md (or append it); other sections are left alone."""
    heading = f"## {title}"
    section = f"{heading}\n\n{body.strip()}\n"
    lock = path.with_suffix(".md.lock")
    with open(lock, "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
        pattern = re.compile(rf"^{re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
        if pattern.search(text):
            text = pattern.sub(lambda _m: section + "\n", text, count=1)
        else:
            text = text.rstrip("\n") + "\n\n" + section
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
        os.replace(tmp, path)
    try:
        lock.unlink()
    except OSError:
        pass
