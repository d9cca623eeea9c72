"""The versions of memory_llm and of the libraries it stands on, read from the installed packages' metadata
(nothing is imported: `mllm --version` stays fast)."""

from __future__ import annotations

import platform
from importlib import metadata

# the libraries whose versions decide how the model behaves; faiss is published under several names
LIBRARIES = {"torch": ("torch",), "transformers": ("transformers",), "peft": ("peft",),
             "sentence-transformers": ("sentence-transformers",),
             "faiss": ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss"),
             "llama-cpp-python": ("llama-cpp-python",)}  # a cold ask's generator (not installed: transformers)


def versions() -> dict[str, str | None]:
    """memory-llm, python and each library in LIBRARIES → its installed version (None: not installed)."""
    from memory_llm import __version__

    return {"memory-llm": __version__, "python": platform.python_version(),
            **{name: _installed(dists) for name, dists in LIBRARIES.items()}}


def describe(v: dict[str, str | None] | None = None) -> str:
    """One line: "memory-llm 0.1.0 (python 3.11.7, torch 2.13.0+cpu, ...)", of `versions()` unless given."""
    v = v or versions()
    rest = ", ".join(f"{name} {version or 'not installed'}" for name, version in v.items() if name != "memory-llm")
    return f"memory-llm {v['memory-llm']} ({rest})"


def _installed(dists) -> str | None:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None
