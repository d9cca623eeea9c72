"""The dependency lock (requirements.lock): what a venv holds against what the lock pins.

Run with a venv's own python (the Makefile's `test-latest` and `lock` run it with .venv-latest's):

    .venv-latest/bin/python scripts/lockfile.py requirements.lock            # the versions that differ
    .venv-latest/bin/python scripts/lockfile.py requirements.lock --write    # rewrite the lock from this venv

The lock is a pip constraints file: one `name==version` line per installed distribution (transitive ones too;
the project itself and pip are left out). torch's local build label (`+cpu`) is dropped, so the pin takes the
build the machine installs for that version.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

SKIP = {"memory-llm", "pip"}
SHOWN = ("torch", "transformers", "peft", "sentence-transformers", "faiss-cpu", "accelerate", "tokenizers",
         "huggingface-hub", "numpy")  # printed first: the ones whose drift has mattered


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """name → version of every distribution in this interpreter's environment (local build labels dropped)."""
    out = {}
    for dist in metadata.distributions():
        name = normalize(dist.metadata["Name"] or "")
        if name and name not in SKIP:
            out[name] = dist.version.split("+", 1)[0]
    return dict(sorted(out.items()))


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalize(name)] = version.strip()
    return pins


def render(pins: dict[str, str]) -> str:
    today = datetime.date.today().isoformat()
    head = ["# The exact versions `make demo`, `make test` and CI install (a pip constraints file).",
            f"# Written by `make lock` on {today} after the whole suite passed on them"
            f" (Python {platform.python_version()}, {platform.machine()}). Do not edit by hand.",
            "# torch's local build label (+cpu) is dropped: the pin takes the build this machine installs."]
    return "\n".join(head + [f"{n}=={v}" for n, v in pins.items()]) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lock", type=Path)
    ap.add_argument("--write", action="store_true", help="rewrite the lock from this environment")
    args = ap.parse_args()
    have, pinned = installed(), read_lock(args.lock)
    print("versions: " + ", ".join(f"{n} {have[n]}" for n in SHOWN if n in have))
    changed = [f"  {n}: {pinned.get(n, '-')} -> {have.get(n, '-')}" for n in sorted(set(have) | set(pinned))
               if have.get(n) != pinned.get(n)]
    print(f"against {args.lock}: " + (f"{len(changed)} differ\n" + "\n".join(changed) if changed else "identical"))
    if args.write:
        args.lock.write_text(render(have), encoding="utf-8")
        print(f"wrote {args.lock} ({len(have)} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
