"""A resident server for the CLI, the way `ollama run` talks to `ollama serve`: `mllm serve` records where it
listens in the home (server.json), and `ask`, `search` and `chat` send their requests there when it answers, so a user who
asks many questions pays the models' start-up once. Standard library only: this runs before anything heavy is
imported, and a CLI that finds the server never imports torch."""

from __future__ import annotations

import json
import os
import tempfile
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SERVER_FILE = "server.json"
PROBE_TIMEOUT = 0.5  # seconds a resident server gets to answer /health before the CLI runs in-process


def announce(home: Path, url: str, api_key: str | None) -> None:
    """Record the running server in the home (readable by the user alone: it may hold the API key)."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".server-", dir=home)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"url": url, "pid": os.getpid(), "api_key": api_key}, fh)
    os.chmod(tmp, 0o600)
    os.replace(tmp, home / SERVER_FILE)


def withdraw(home: Path) -> None:
    """Remove the record if it is this process's (a newer server may have replaced it)."""
    path = Path(home) / SERVER_FILE
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


@dataclass
class Resident:
    """A running `mllm serve` of this home: its base URL (…/v1) and API key."""

    url: str
    api_key: str | None = None

    def _request(self, path: str, body: dict | None = None, timeout: float = 600):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        return urllib.request.urlopen(urllib.request.Request(self.url + path, data, headers), timeout=timeout)

    @contextmanager
    def _answering(self) -> Iterator[None]:
        """The server's refusals as the library's errors: a 4xx as an InputError (its message), the rest as a
        ModelError."""
        from memory_llm.errors import InputError, ModelError

        try:
            yield
        except urllib.error.HTTPError as exc:
            raise (InputError if exc.code < 500 else ModelError)(_message(exc)) from None
        except (OSError, ValueError) as exc:
            raise ModelError(f"the resident server at {self.url} stopped answering ({exc}); use --local") from None

    def call(self, path: str, body: dict, namespace: str) -> dict:
        """POST a JSON body in a namespace; the reply's JSON."""
        with self._answering(), self._request(path, {**body, "user": namespace}) as r:
            return json.loads(r.read())

    def ask_stream(self, question: str, namespace: str, **fields) -> Iterator[str | dict]:
        """Text pieces as the server generates them, then the answer as `Answer.as_dict` gives it."""
        return self.chat_stream([{"role": "user", "content": question}], namespace, **fields)

    def feedback(self, answer_id: int, *, good: bool = False, bad: bool = False, correction: str | None = None,
                 namespace: str) -> dict:
        """MemoryLLM.feedback through the server."""
        body = {"answer_id": answer_id, **({"correction": correction} if correction is not None else
                                           {"rating": "good" if good else "bad"})}
        return self.call("/feedback", body, namespace)

    def chat_stream(self, messages: list[dict], namespace: str, **fields) -> Iterator[str | dict]:
        """A conversation's answer (MemoryLLM.chat's fields: session_id, remember, k, prompt, use_memory,
        exemplars, max_tokens): text pieces, then the answer as `Answer.as_dict` gives it."""
        from memory_llm.errors import ModelError

        body = {"model": "mllm", "messages": messages, "stream": True,
                "user": namespace, **{k: v for k, v in fields.items() if v is not None}}
        pieces = []
        with self._answering():
            with self._request("/chat/completions", body) as r:
                for line in r:
                    if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise ModelError(event["error"].get("message", "generation failed"))
                    choice = (event.get("choices") or [{}])[0]
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        pieces.append(piece)
                        yield piece
                    if "mllm" in event:
                        ext = dict(event["mllm"])
                        yield {"id": ext.pop("answer_id"), "answer": "".join(pieces).strip(), **ext}


def find(home: Path) -> Resident | None:
    """The home's running server, when its record names a live process that answers /health quickly."""
    try:
        record = json.loads((Path(home) / SERVER_FILE).read_text(encoding="utf-8"))
        os.kill(int(record["pid"]), 0)
        resident = Resident(str(record["url"]).rstrip("/"), record.get("api_key"))
        with urllib.request.urlopen(resident.url.removesuffix("/v1") + "/health", timeout=PROBE_TIMEOUT) as r:
            return resident if r.status == 200 else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _message(exc: urllib.error.HTTPError) -> str:
    try:
        return json.loads(exc.read())["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        return f"the resident server answered HTTP {exc.code}"
