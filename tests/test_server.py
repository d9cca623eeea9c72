"""The OpenAI-compatible server through FastAPI's TestClient, on fakes: routes, streaming format, namespaces,
and the bad-input contract (4xx with an OpenAI-style error body, 401 for a wrong key)."""

import json

import pytest
from fastapi.testclient import TestClient

from memory_llm.server import create_app

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def client(mem):
    with TestClient(create_app(mem, api_key=KEY)) as c:
        yield c


def chat_body(content="Where do herons nest?", **extra):
    return {"model": "mllm", "messages": [{"role": "user", "content": content}], "max_tokens": 6, **extra}


def assert_openai_error(r, status, code=None, fragment=""):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and fragment in err["message"]
    if code:
        assert err["code"] == code


def sse_events(text):
    lines = [ln[6:] for ln in text.split("\n\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_models_and_health(client):
    assert client.get("/health").json()["status"] == "ok"  # no key needed
    data = client.get("/v1/models", headers=AUTH).json()
    assert data["object"] == "list" and data["data"][0]["id"] == "mllm"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": "Basic " + KEY}])
def test_wrong_or_missing_api_key_is_401(client, headers):
    assert_openai_error(client.get("/v1/models", headers=headers), 401, "invalid_api_key")
    assert_openai_error(client.post("/v1/chat/completions", headers=headers, json=chat_body()), 401,
                        "invalid_api_key")


def test_no_key_configured_means_open(mem):
    with TestClient(create_app(mem)) as c:
        assert c.get("/v1/models").status_code == 200


def test_chat_completion_with_memory_and_namespace(client):
    learned = client.post("/v1/memories", headers={**AUTH, "X-Namespace": "alice"},
                          json={"text": "Herons nest in tall trees near the lake."}).json()
    assert learned["namespace"] == "alice" and learned["chunks_added"] == 1
    r = client.post("/v1/chat/completions", headers=AUTH, json=chat_body(user="alice"))
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] == ("length" if body["usage"]["completion_tokens"] == 6 else "stop")
    ext = body["mllm"]
    assert ext["namespace"] == "alice" and ext["sources"][0]["text"].startswith("Herons")
    assert ext["template"] and isinstance(ext["answer_id"], int) and body["usage"]["prompt_tokens"] > 0
    other = client.post("/v1/chat/completions", headers={**AUTH, "X-Namespace": "bob"}, json=chat_body()).json()
    assert other["mllm"]["namespace"] == "bob" and other["mllm"]["sources"] == []


def test_streamed_chat_completion_is_server_sent_events(client):
    client.post("/v1/memories", headers=AUTH, json={"text": "Herons nest in tall trees near the lake."})
    r = client.post("/v1/chat/completions", headers=AUTH, json=chat_body(stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length") and events[-1]["mllm"]["sources"]
    answer_id = events[-1]["mllm"]["answer_id"]
    fb = client.post("/v1/feedback", headers=AUTH, json={"answer_id": answer_id, "rating": "good"}).json()
    assert fb["feedback"] == "good" and fb["exemplar_ids"]
    assert len(text) > 0


def test_search_forget_and_feedback_stay_in_the_namespace(client):
    a = {**AUTH, "X-Namespace": "alice"}
    client.post("/v1/memories", headers=a, json={"text": "Alice keeps the spare key under the blue pot."})
    assert client.post("/v1/search", headers=a, json={"query": "spare key"}).json()["data"]
    assert client.post("/v1/search", headers=AUTH, json={"query": "spare key", "user": "bob"}).json()["data"] == []
    assert client.post("/v1/forget", headers=AUTH, json={"all": True, "user": "bob"}).json()["forgotten"] == 0
    ans = client.post("/v1/chat/completions", headers=a, json=chat_body("where is the spare key?")).json()
    assert_openai_error(client.post("/v1/feedback", headers=AUTH, json={"answer_id": ans["mllm"]["answer_id"],
                                                                        "rating": "good", "user": "bob"}),
                        400, fragment="unknown answer id")
    assert client.post("/v1/forget", headers=a, json={"all": True}).json()["forgotten"] == 1
    assert client.post("/v1/search", headers=a, json={"query": "spare key"}).json()["data"] == []


def test_update_history_and_restore_through_the_api(client):
    a = {**AUTH, "X-Namespace": "alice"}
    first = client.post("/v1/memories", headers=a, json={"text": "The gate code of the Wren yard is 4471.",
                                                          "key": "wren-gate", "date": "2026-11-01"}).json()
    old = first["memory_ids"][0]
    got = client.get(f"/v1/memories/{old}", headers=a).json()
    assert got["object"] == "memory" and got["status"] == "live" and got["valid_from"].startswith("2026-11-01")
    assert_openai_error(client.get(f"/v1/memories/{old}", headers=AUTH), 400, fragment="no memory has id")  # another
    # namespace's memory is not found
    upd = client.post(f"/v1/memories/{old}", headers=a, json={"text": "The gate code of the Wren yard is 5512.",
                                                              "date": "2026-12-03"}).json()
    new = upd["memory_ids"][0]
    assert [(x["old_id"], x["new_id"], x["reason"]) for x in upd["superseded"]] == [(old, new, "update")]
    hits = client.post("/v1/search", headers=a, json={"query": "Wren yard gate code"}).json()["data"]
    assert [h["id"] for h in hits] == [new] and hits[0]["valid_from"].startswith("2026-12-03")
    both = client.post("/v1/search", headers=a, json={"query": "Wren yard gate code", "history": True}).json()
    assert {(h["id"], h["status"]) for h in both["data"]} == {(new, "live"), (old, "superseded")}
    chain = client.get(f"/v1/memories/{new}/history", headers=a).json()
    assert chain["object"] == "memory.history" and [e["old_id"] for e in chain["events"]] == [old]
    restored = client.post(f"/v1/memories/{old}/restore", headers=a).json()
    assert restored["memory"]["status"] == "live" and restored["reverted"][0]["reverted_at"]
    assert client.post("/v1/forget", headers=a, json={"superseded": True}).json()["forgotten"] == 0


def test_remember_and_session_through_the_api(client, mem):
    body = chat_body("My sister lives in Porto.", remember=True, session_id="s9")
    ext = client.post("/v1/chat/completions", headers={**AUTH, "X-Namespace": "carol"}, json=body).json()["mllm"]
    assert ext["remembered_ids"] and ext["session_id"] == "s9"
    assert mem.history("s9", namespace="carol")[0]["content"] == "My sister lives in Porto."


@pytest.mark.parametrize("send,status,code,fragment", [
    (dict(content=b"{not json", headers={"Content-Type": "application/json"}), 400, "invalid_json", "not valid JSON"),
    (dict(content=b"[1, 2]", headers={"Content-Type": "application/json"}), 400, "invalid_json", "JSON object"),
    (dict(json={"messages": [{"role": "user", "content": "hi"}]}), 400, "missing_required_parameter", "'model'"),
    (dict(json={"model": "mllm"}), 400, "missing_required_parameter", "'messages'"),
    (dict(json={"model": "mllm", "messages": []}), 400, "invalid_value", "'messages'"),
    (dict(json={"model": "mllm", "messages": [{"role": "robot", "content": "x"}]}), 400, "invalid_value", "role"),
    (dict(json={"model": "mllm", "messages": [{"role": "user"}]}), 400, "missing_required_parameter", "content"),
    (dict(json=chat_body(max_tokens=0)), 400, "invalid_value", "max_tokens"),
    (dict(json={**chat_body(), "model": "gpt-4"}), 404, "model_not_found", "'gpt-4'"),
    (dict(json=chat_body(prompt="nope")), 400, None, "unknown template 'nope'"),
    (dict(json={"model": "mllm", "messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "yo"}]}), 400, None, "last message"),
    (dict(json=chat_body(user="")), 200, None, ""),  # an empty user field means the default namespace
    (dict(json=chat_body(), headers={"X-Namespace": "x" * 200}), 400, None, "invalid namespace"),
])
def test_bad_chat_requests_get_openai_errors(client, send, status, code, fragment):
    headers = {**AUTH, **send.pop("headers", {})}
    r = client.post("/v1/chat/completions", headers=headers, **send)
    if status == 200:
        assert r.status_code == 200
        return
    assert_openai_error(r, status, code, fragment)


@pytest.mark.parametrize("path,body,fragment", [
    ("/v1/memories", {}, "'text'"),
    ("/v1/memories", {"text": ""}, "'text'"),
    ("/v1/search", {"query": "x", "k": 0}, "'k'"),
    ("/v1/forget", {}, "say what to forget"),
    ("/v1/forget", {"all": True, "ids": [1]}, "cannot be combined"),
    ("/v1/feedback", {"answer_id": 1}, "either 'rating'"),
    ("/v1/feedback", {"answer_id": 123, "rating": "good"}, "unknown answer id 123"),
    ("/v1/feedback", {"answer_id": 1, "rating": "meh"}, "'rating'"),
])
def test_bad_memory_requests_get_openai_errors(client, path, body, fragment):
    assert_openai_error(client.post(path, headers=AUTH, json=body), 400, fragment=fragment)


def test_unknown_route_is_an_openai_error(client):
    assert_openai_error(client.post("/v1/completions", headers=AUTH, json={}), 404, "not_found")
