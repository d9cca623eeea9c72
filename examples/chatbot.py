"""A small chatbot with a memory, built on the library (run: python examples/chatbot.py --user alice).

It remembers what each user states (namespace = user), answers with what it remembers, and learns from
feedback: type "+" after a good answer, "-" after a bad one, or "! the right answer" to correct it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterable, TextIO

from memory_llm import MemoryLLM, MemoryLLMError


def run(m: MemoryLLM, user: str, lines: Iterable[str], out: TextIO = sys.stdout) -> list[dict]:
    """Chat over input lines; returns the conversation."""
    messages: list[dict] = [{"role": "system", "content": "You are a helpful assistant. Use the notes about the user"
                             " when they are relevant. Keep replies short."}]
    last = None
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            if line in ("+", "-") or line.startswith("! "):
                if last is None:
                    raise MemoryLLMError("no answer to rate yet")
                m.feedback(last.id, good=line == "+", bad=line == "-",
                           correction=line[2:] if line.startswith("! ") else None, namespace=user)
                print("(thanks, noted)", file=out)
                continue
            messages.append({"role": "user", "content": line})
            stream = m.chat(messages, session_id=f"example-{user}", namespace=user, remember=True)
            print("bot> ", end="", file=out)
            for piece in stream:
                print(piece, end="", flush=True, file=out)
            print(file=out)
            last = stream.answer
            messages.append({"role": "assistant", "content": last.text})
        except MemoryLLMError as exc:
            print(f"Error: {exc}", file=out)
    return messages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--user", default="default", help="whose memory (a namespace)")
    ap.add_argument("--home", default=None, help="memory home (default: MLLM_HOME)")
    args = ap.parse_args()
    m = MemoryLLM(args.home, max_new_tokens=120)
    print(f"Chatting as {args.user!r}. Tell me things, ask me things; + / - / ! correction to give feedback.",
          file=sys.stderr)
    run(m, args.user, sys.stdin)


if __name__ == "__main__":
    main()
