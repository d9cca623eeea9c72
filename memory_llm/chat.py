"""Chat turns: checking OpenAI-style messages, what to retrieve for a conversation, what the user states, and
answering a conversation's last turn."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable, Sequence

from memory_llm.config import check_namespace
from memory_llm.errors import InputError
from memory_llm.store import content_uri

if TYPE_CHECKING:
    from memory_llm.answering import Answerer, AnswerStream

ROLES = ("system", "user", "assistant")
RECENT_USER_TURNS = 3  # the conversation query joins this many latest user turns
HISTORY_MESSAGES = 12  # earlier messages kept in the prompt (a small model's window is the limit)
_NOT_A_STATEMENT = re.compile(
    r"^(who|what|when|where|why|how|which|whose|whom|is|are|was|were|do|does|did|can|could|would|will|should|"
    r"shall|may|might|tell me|please|show|list|explain|give|help|hi|hello|hey|thanks|thank you|ok|okay|yes|no)\b",
    re.I)


_OPENING = re.compile(r"^((hi|hello|hey|ok|okay|oh|so|well|um|umm|yes|yeah|no|nope|thanks|thank you)\b[\s,.!:;-]*)+",
                      re.I)


def check_messages(messages: Sequence[dict]) -> list[dict]:
    """OpenAI-style messages [{"role", "content"}], the last one from the user; InputError says what is wrong."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InputError(f"messages[{i}]: role must be one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise InputError(f"messages[{i}]: content must be a text")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user" or not out[-1]["content"].strip():
        raise InputError("the last message must be a non-empty user message")
    return out


def split_messages(messages: list[dict]) -> tuple[str | None, list[dict], str]:
    """(the client's system prompt or None, the latest earlier user/assistant turns, the last user message)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
    turns = [m for m in messages[:-1] if m["role"] != "system"][-HISTORY_MESSAGES:]
    return system, turns, messages[-1]["content"]


def conversation_queries(messages: list[dict]) -> list[str]:
    """What to retrieve for: the last user message and, in a longer conversation, the latest user turns
    together (so that "and when did it open?" still finds the observatory named two turns earlier)."""
    users = [m["content"].strip() for m in messages if m["role"] == "user" and m["content"].strip()]
    queries = [users[-1]]
    if len(users) > 1:
        queries.append(" ".join(users[-RECENT_USER_TURNS:]))
    return queries


def statements(text: str) -> list[str]:
    """The sentences of a user message that state something (not questions, requests or greetings); a greeting or
    an interjection before a statement is left out of it ("hey, I changed the password to ..." states that)."""
    out = []
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", text.strip()):
        sentence = _OPENING.sub("", sentence.strip())
        if (len(sentence.split()) >= 3 and not sentence.endswith("?")
                and not _NOT_A_STATEMENT.match(sentence)):
            out.append(sentence)
    return out


def answer_conversation(answerer: "Answerer", learn: Callable, messages: Sequence[dict], *,
                        session_id: str | None = None, namespace: str = "default", remember: bool = False,
                        k: int | None = None, use_memory: bool = True, prompt: str | None = None,
                        exemplars: bool = True, max_new_tokens: int | None = None, sampling=None,
                        stop: Sequence[str] = ()) -> "AnswerStream":
    """Answer the last user message of a conversation, streamed and logged with its session id (MemoryLLM.chat).
    With `remember`, what the user states in it is learned first (`learn`: MemoryLLM.learn's signature)."""
    check_namespace(namespace)
    messages = check_messages(messages)
    system, history, question = split_messages(messages)
    remembered: list[int] = []
    said = " ".join(statements(question)) if remember else ""
    if said:
        uri = content_uri(f"chat:{session_id or '-'}", said)
        remembered = learn(text=said, namespace=namespace, source=uri).memory_ids
    prepared = answerer.prepare(question, k=k, namespace=namespace, use_memory=use_memory, prompt=prompt,
                                exemplars=exemplars, queries=conversation_queries(messages), history=history,
                                system=system)
    return answerer.stream(question, prepared, namespace, use_memory, max_new_tokens, True, session_id, remembered,
                           sampling=sampling, stop=stop)
