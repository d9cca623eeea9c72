"""`mllm` as a real process, on the fake embedder (and the tiny model when a command needs one).

The crash, concurrency and hostile-input trials run this instead of `python -m memory_llm` so that a child
starts in about a second without loading real models, yet goes through the same CLI code path:
    python tests/fake_cli.py learn docs/ --json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

GENERATING = {"ask", "eval", "consolidate"}


def factory(home, generate: bool | None = None, **overrides):
    """What cli_common.open_memory does, with the fake embedder and (when `generate`, by default for the commands that
    generate) the tiny model: importing torch costs seconds, so the other commands go without."""
    from conftest import FakeEmbedder

    from memory_llm import MemoryLLM

    overrides = {k: v for k, v in overrides.items() if k not in ("embedder", "model")}
    generator = None
    if generate or generate is None and sys.argv[1:2] and sys.argv[1] in GENERATING:
        import conftest

        generator = conftest.tiny_generator.__wrapped__()
    return MemoryLLM(home, embedder=FakeEmbedder(), generator=generator, **overrides)


def main(argv: list[str]) -> None:
    from memory_llm import cli, cli_common

    cli_common.open_memory = factory
    sys.argv = ["mllm", *argv]
    cli.main()


if __name__ == "__main__":
    main(sys.argv[1:])
