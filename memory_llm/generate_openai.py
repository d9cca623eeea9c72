"""A generator backend over HTTP: an OpenAI-compatible engine (vLLM, or any server with /v1/completions) runs the
model; memory_llm keeps the tokenizer, the prompts and the routing (docs/server.md, "Generation on vLLM").

Prompts go to the engine as token ids (built here through the model's chat template, as in-process), so the
engine generates from exactly the tokens `ask` would generate from; greedy output then matches in-process
generation token for token (tests/test_vllm.py). Adapters are published to the engine by name (POST
/v1/load_lora_adapter, vLLM's runtime LoRA API) and chosen per request through `route` (adapters.remote).

Only the standard library talks HTTP here: serving against an engine needs no client package."""

from __future__ import annotations

import json
import logging
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from memory_llm.errors import InputError, ModelError
from memory_llm.models import CONFIDENCE_TOKENS, chat_token_ids

logger = logging.getLogger(__name__)

TIMEOUT = 600.0  # seconds for one HTTP exchange (a long generation on a busy CPU engine)


def api_root(base_url: str) -> str:
    """The engine's API root ending in /v1, from 'http://host:port' or 'http://host:port/v1' (a bad URL is an
    InputError naming it)."""
    url = (base_url or "").strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"generator base URL {base_url!r} is not an http(s) URL (e.g. http://127.0.0.1:8001/v1)")
    try:
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError:
        raise InputError(f"generator base URL {base_url!r} has a bad port") from None
    return url if url.endswith("/v1") else url + "/v1"


class EngineClient:
    """The few calls memory_llm makes to an OpenAI-compatible engine, each failure a one-line ModelError."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = TIMEOUT):
        self.root, self.api_key, self.timeout = api_root(base_url), api_key or None, timeout

    def _request(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.root + path, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raise ModelError(f"the generator at {self.root} answered {path} with HTTP {exc.code}:"
                             f" {_error_message(exc)}{_hint(exc.code)}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ModelError(f"cannot reach the generator at {self.root} ({_reason(reason)});"
                             " is the engine running at generator_base_url?") from None

    def get(self, path: str) -> dict:
        with self._request("GET", path) as response:
            return self._json(response, path)

    def post(self, path: str, body: dict) -> dict | str:
        """The answer as JSON, or as text when the engine answers in words (vLLM's adapter routes do)."""
        with self._request("POST", path, body) as response:
            raw = self._read(response, path)
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", "replace")

    def events(self, path: str, body: dict, stop: threading.Event | None = None) -> Iterator[dict]:
        """The server-sent events of a streamed request, as JSON objects; closing early (stop set, or the
        caller stops iterating) closes the connection, which makes the engine abort the generation."""
        response = self._request("POST", path, {**body, "stream": True})
        try:
            while stop is None or not stop.is_set():
                try:
                    line = response.readline()
                except (OSError, socket.timeout) as exc:
                    raise ModelError(f"the generator at {self.root} stopped answering ({_reason(exc)})") from None
                if not line:
                    return
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                try:
                    event = json.loads(data)
                except ValueError:
                    raise ModelError(f"the generator at {self.root} sent a malformed event on {path}") from None
                if isinstance(event, dict) and "error" in event:
                    raise ModelError(f"the generator at {self.root} failed: {_message_of(event)}")
                yield event
        finally:
            response.close()

    def _read(self, response, path: str) -> bytes:
        try:
            return response.read()
        except (OSError, socket.timeout) as exc:
            raise ModelError(f"the generator at {self.root} stopped answering {path} ({_reason(exc)})") from None

    def _json(self, response, path: str) -> dict:
        try:
            out = json.loads(self._read(response, path))
        except ValueError:
            raise ModelError(f"the generator at {self.root} did not answer {path} with JSON; is"
                             " generator_base_url an OpenAI-compatible API?") from None
        if not isinstance(out, dict):
            raise ModelError(f"the generator at {self.root} answered {path} with an unexpected shape")
        return out


def _message_of(body) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else error if isinstance(error, str) else None
    message = message or (body.get("message") if isinstance(body, dict) else None) or str(body)
    return " ".join(str(message).split())[:300]


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        raw = exc.read()
    except OSError:
        return exc.reason or "no details"
    try:
        return _message_of(json.loads(raw))
    except ValueError:
        return " ".join(raw.decode("utf-8", "replace").split())[:300] or str(exc.reason)


def _hint(status: int) -> str:
    if status == 401:
        return " (set generator_api_key to the engine's key)"
    if status == 404:
        return " (is generator_base_url the engine's /v1 root?)"
    return ""


def _reason(reason) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, socket.gaierror):
        return "unknown host"
    return str(reason).splitlines()[0][:200] if str(reason) else type(reason).__name__


@dataclass
class RemoteConfig:
    """What `ask` reads of a model's config: its context window (the engine's max_model_len)."""

    max_position_embeddings: int | None = None


@dataclass
class RemoteModel:
    """Stands where an in-process generator has its torch model: the engine's model id and context window.
    Consolidation and activation routing need a torch model; they load one in-process (load_generator)."""

    id: str
    config: RemoteConfig = field(default_factory=RemoteConfig)


class OpenAIGenerator:
    """The Generator protocol (generate.py) over an OpenAI-compatible engine's /v1/completions.

    Args:
        client: the engine's EngineClient.
        tokenizer: the served model's tokenizer (prompts are sent as its token ids).
        name: the model setting (what adapters record as their base model).
        model_id: the engine's id for the base model (None: the first base model it lists).
    """

    remote = True  # serving.ServedModel publishes adapters to the engine instead of attaching them

    def __init__(self, client: EngineClient, tokenizer, name: str, model_id: str | None = None,
                 listing: dict | None = None):
        self.client, self.tokenizer, self.name = client, tokenizer, name
        listed = (listing or client.get("/models")).get("data") or []
        bases = [m for m in listed if isinstance(m, dict) and m.get("id") and not m.get("parent")]
        if not bases:
            raise ModelError(f"the generator at {client.root} lists no model at /v1/models")
        chosen = next((m for m in bases if m["id"] == model_id), None) if model_id else bases[0]
        if chosen is None:
            raise ModelError(f"the generator at {client.root} does not serve {model_id!r}"
                             f" (it serves {', '.join(repr(m['id']) for m in bases)})")
        window = chosen.get("max_model_len")
        self.model = RemoteModel(chosen["id"], RemoteConfig(window if isinstance(window, int) else None))
        self.route: Callable[[list[list[int]]], list[str | None]] | None = None  # rows → adapter names
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def load(cls, name: str, cache_dir, base_url: str, api_key: str | None = None) -> "OpenAIGenerator":
        """A generator over the engine at base_url serving the model `name` (whose tokenizer is loaded here)."""
        from memory_llm.models import load_tokenizer

        client = EngineClient(base_url, api_key)
        listing = client.get("/models")  # an engine that is down or a bad URL fails before the tokenizer loads
        return cls(client, load_tokenizer(name, cache_dir), name, listing=listing)

    @property
    def device(self):
        import torch

        return torch.device("cpu")  # where prompt ids live; the engine has its own

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat_ids(self, messages: list[dict]):
        """Token ids of messages through the chat template, as in-process (a 1 × n LongTensor)."""
        return chat_token_ids(self.tokenizer, messages)

    # ---- the engine's adapters ----------------------------------------------------------------------
    def adapters(self) -> dict[str, str | None]:
        """The adapters the engine serves: name → the path it loaded them from."""
        listed = self.client.get("/models").get("data") or []
        return {m["id"]: m.get("root") for m in listed if isinstance(m, dict) and m.get("parent")}

    def load_adapter(self, name: str, path: str) -> None:
        """Have the engine load a peft adapter directory under `name` (vLLM: POST /v1/load_lora_adapter; the
        engine must be started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, and read `path`)."""
        self.client.post("/load_lora_adapter", {"lora_name": name, "lora_path": path})

    def unload_adapter(self, name: str) -> None:
        self.client.post("/unload_lora_adapter", {"lora_name": name})

    def models_for(self, rows: Sequence[Sequence[int]]) -> list[str]:
        """The engine model each prompt goes to: the adapter `route` chooses, else the base model."""
        chosen = self.route([list(r) for r in rows]) if self.route is not None else [None] * len(rows)
        return [c or self.model.id for c in chosen]

    # ---- generation ----------------------------------------------------------------------------------
    def _body(self, model: str, prompt, max_new_tokens: int, temperature: float, sampling=None) -> dict:
        body = {"model": model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": temperature,
                "skip_special_tokens": True, "return_token_ids": True}
        if temperature > 0:
            body["top_p"] = 0.95
        if sampling is not None and not sampling.greedy:
            body.update(temperature=sampling.temperature, top_p=sampling.top_p)
            if sampling.seed is not None:
                body["seed"] = sampling.seed
        return body

    def generate_batch(self, prompts: list, max_new_tokens: int = 12, temperature: float = 0.0,
                       return_ids: bool = False, confidence: bool = False) -> list:
        """Continuations of several prompts (lists of token ids): one request per engine model (the base, or an
        adapter) holding its rows, sent concurrently. As TransformersGenerator.generate_batch: texts, or the
        generated ids, and with confidence (text, mean log-probability of the first tokens) pairs."""
        if not prompts:
            return []
        rows = [list(p) for p in prompts]
        models = self.models_for(rows)
        groups: dict[str, list[int]] = {}
        for i, m in enumerate(models):
            groups.setdefault(m, []).append(i)
        results: list = [None] * len(rows)

        def run(model: str, members: list[int]) -> None:
            body = self._body(model, [rows[i] for i in members], max_new_tokens, temperature)
            if confidence:
                body["logprobs"] = 1
            answer = self.client.post("/completions", body)
            choices = answer.get("choices") if isinstance(answer, dict) else None
            if not isinstance(choices, list) or len(choices) != len(members):
                raise ModelError(f"the generator at {self.client.root} answered /completions without"
                                 f" {len(members)} choices")
            for choice in choices:
                results[members[choice.get("index", 0)]] = self._result(choice, return_ids, confidence)

        if len(groups) == 1:
            run(*next(iter(groups.items())))
        else:
            with ThreadPoolExecutor(max_workers=len(groups)) as pool:
                for f in [pool.submit(run, m, members) for m, members in groups.items()]:
                    f.result()
        return results

    def _result(self, choice: dict, return_ids: bool, confidence: bool):
        """One choice as TransformersGenerator.generate_batch gives it: cut at the first end or pad token (an
        engine stops at the end token only), the text decoded from the ids kept."""
        text, ids = choice.get("text") or "", choice.get("token_ids")
        stop = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        if isinstance(ids, list):
            cut = next((i for i, t in enumerate(ids) if t in stop), len(ids))
            if cut < len(ids):
                ids = ids[:cut]
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
        elif return_ids or confidence:  # an engine without vLLM's return_token_ids: re-tokenize the text
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        out = ids if return_ids else text
        if not confidence:
            return out
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
        head = [float(x) for x in logprobs[:min(len(ids), CONFIDENCE_TOKENS)] if x is not None]
        return out, (sum(head) / len(head) if head else float("-inf"))

    def stream(self, input_ids, max_new_tokens: int = 200, temperature: float = 0.0,
               stop: threading.Event | None = None, sampling=None, report: dict | None = None) -> Iterator[str]:
        """Yield text pieces as the engine generates them; setting `stop` closes the request (the engine aborts
        the generation). `sampling` and `report` as Generator.stream (the engine's finish reason and usage)."""
        row = [int(t) for t in input_ids[0]]  # a 1 × n batch of ids (chat_ids' shape)
        model = self.models_for([row])[0]
        body = self._body(model, row, max_new_tokens, temperature, sampling)
        body.pop("return_token_ids")
        if report is not None:
            body["stream_options"] = {"include_usage": True}
        for event in self.client.events("/completions", body, stop):
            if report is not None and isinstance(event.get("usage"), dict):
                report["completion_tokens"] = event["usage"].get("completion_tokens")
            for choice in event.get("choices") or []:
                if report is not None and choice.get("finish_reason"):
                    report["finish_reason"] = "length" if choice["finish_reason"] == "length" else "stop"
                piece = choice.get("text")
                if piece:
                    yield piece
