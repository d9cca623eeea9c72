"""OpenAI conformance of the server on fakes (the tiny model): every documented parameter validated (a 400 naming
it), sampling honoured (temperature, top_p, seed), stop strings, max tokens and the finish reason, usage in replies
and in the last streamed chunk, and /v1/embeddings with the home's embedder. The same cases through real clients
(the openai package and the `llm` CLI) against a live server are in test_server_clients.py."""

import base64

import numpy as np
import pytest
from fastapi.testclient import TestClient

from test_server import AUTH, KEY, assert_openai_error, chat_body, sse_events

from memory_llm.server import create_app


@pytest.fixture
def client(mem):
    mem.learn(text="Herons nest in tall trees near the lake.", source="herons")
    with TestClient(create_app(mem, api_key=KEY)) as c:
        yield c


def ask(client, **extra):
    r = client.post("/v1/chat/completions", headers=AUTH, json=chat_body(**extra))
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("field,value,fragment", [
    ("temperature", "hot", "'temperature'"), ("temperature", 2.5, "'temperature'"), ("temperature", "0.5", "'temperature'"),
    ("top_p", 0, "'top_p'"), ("top_p", 1.5, "'top_p'"), ("seed", 1.5, "'seed'"), ("seed", "7", "'seed'"),
    ("max_tokens", -1, "'max_tokens'"), ("max_tokens", "5", "'max_tokens'"), ("max_completion_tokens", 0,
                                                                           "'max_completion_tokens'"),
    ("stop", ["a", "b", "c", "d", "e"], "at most 4"), ("stop", [""], "at most 4"), ("stop", 5, "'stop'"),
    ("stream", "yes", "'stream'"), ("stream_options", {"include_usage": "yes"}, "include_usage"),
    ("n", 2, "only n=1"), ("n", 0, "'n'"), ("presence_penalty", 0.5, "penalties"), ("frequency_penalty", 3, "'frequency_penalty'"),
    ("logprobs", True, "log probabilities"), ("top_logprobs", 2, "log probabilities"),
    ("logit_bias", {"50256": -100}, "logit_bias"), ("response_format", {"type": "json_object"}, "free text"),
    ("tools", [{"type": "function", "function": {"name": "f"}}], "tool calls"), ("tool_choice", "auto", "tool calls"),
])
def test_every_documented_parameter_is_validated_and_named(client, field, value, fragment):
    r = client.post("/v1/chat/completions", headers=AUTH, json=chat_body(**{field: value}))
    assert_openai_error(r, 400, fragment=fragment)
    assert r.json()["error"]["param"] == field or r.json()["error"]["param"].startswith(field)


def test_parameters_at_their_neutral_values_are_accepted(client):
    body = ask(client, n=1, presence_penalty=0, frequency_penalty=0.0, logprobs=False, top_logprobs=0,
               logit_bias={}, response_format={"type": "text"}, tools=[], tool_choice="none", temperature=0,
               top_p=1, seed=3, stream=False, stream_options=None, unknown_extension_field=1)
    assert body["choices"][0]["message"]["content"] is not None


def test_max_tokens_cut_is_finish_reason_length_and_usage_counts_it(client):
    cut = ask(client, max_tokens=3)
    usage = cut["usage"]
    assert cut["choices"][0]["finish_reason"] == "length" and usage["completion_tokens"] == 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + 3 and usage["prompt_tokens"] > 10
    assert ask(client, max_completion_tokens=2)["usage"]["completion_tokens"] == 2  # the newer name


def test_stop_strings_end_the_answer_before_them(client):
    full = ask(client, max_tokens=24)["choices"][0]["message"]["content"]
    assert len(full) > 8
    stop = full[4:7]
    cut = ask(client, max_tokens=24, stop=[stop, "never-in-it"])
    assert full.startswith(cut["choices"][0]["message"]["content"].rstrip())
    assert stop not in cut["choices"][0]["message"]["content"] and cut["choices"][0]["finish_reason"] == "stop"
    streamed = client.post("/v1/chat/completions", headers=AUTH, json=chat_body(max_tokens=24, stop=stop,
                                                                                  stream=True))
    events = sse_events(streamed.text)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text.strip() == cut["choices"][0]["message"]["content"] and events[-1]["choices"][0]["finish_reason"] == "stop"


def test_temperature_top_p_and_seed_are_honoured(client):
    greedy = ask(client, max_tokens=12)["choices"][0]["message"]["content"]
    assert ask(client, max_tokens=12)["choices"][0]["message"]["content"] == greedy  # greedy by default
    sampled = [ask(client, max_tokens=12, temperature=1.5, seed=s)["choices"][0]["message"]["content"]
               for s in (1, 2, 3)]
    assert any(t != greedy for t in sampled) and len(set(sampled)) > 1  # sampling happened, seeds differ
    assert ask(client, max_tokens=12, temperature=1.5, seed=2)["choices"][0]["message"]["content"] == sampled[1]
    # a nucleus this small keeps only the most likely token: sampling becomes greedy
    assert ask(client, max_tokens=12, temperature=1.5, top_p=1e-6, seed=5)["choices"][0]["message"]["content"] == greedy


def test_include_usage_sends_a_last_chunk_with_usage(client):
    r = client.post("/v1/chat/completions", headers=AUTH, json=chat_body(max_tokens=4, stream=True,
                                                                          stream_options={"include_usage": True}))
    events = sse_events(r.text)
    last = events[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 4
    assert all(e["usage"] is None for e in events[:-1]) and events[-2]["choices"][0]["finish_reason"] == "length"
    plain = sse_events(client.post("/v1/chat/completions", headers=AUTH, json=chat_body(stream=True)).text)
    assert all("usage" not in e for e in plain)  # not asked: no usage chunk


def test_embeddings_with_the_homes_embedder(client, mem):
    models = [d["id"] for d in client.get("/v1/models", headers=AUTH).json()["data"]]
    assert models == ["mllm", mem.settings.embedder]
    texts = ["Herons nest in tall trees.", "A lake"]
    r = client.post("/v1/embeddings", headers=AUTH, json={"model": mem.settings.embedder, "input": texts}).json()
    want = mem.embedder.encode(texts)
    assert r["object"] == "list" and [d["index"] for d in r["data"]] == [0, 1] and r["model"] == mem.settings.embedder
    assert np.allclose(np.array([d["embedding"] for d in r["data"]]), want, atol=1e-6)
    assert r["usage"]["prompt_tokens"] == r["usage"]["total_tokens"] == sum(mem.embedder.count_tokens(t) for t in texts)
    b64 = client.post("/v1/embeddings", headers=AUTH, json={"model": "mllm", "input": texts[0],
                                                             "encoding_format": "base64"}).json()
    assert np.allclose(np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), "<f4"), want[0], atol=1e-6)
    for body, status, fragment in [({"model": "text-embedding-3-small", "input": "x"}, 404, "does not embed"),
                                   ({"model": "mllm", "input": []}, 400, "'input'"),
                                   ({"model": "mllm", "input": [""]}, 400, "'input'"),
                                   ({"model": "mllm", "input": [[1, 2]]}, 400, "input"),
                                   ({"model": "mllm", "input": "x", "dimensions": 7}, 400, "'dimensions'"),
                                   ({"model": "mllm", "input": "x", "encoding_format": "int8"}, 400, "encoding_format")]:
        assert_openai_error(client.post("/v1/embeddings", headers=AUTH, json=body), status, fragment=fragment)
