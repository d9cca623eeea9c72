"""`mllm serve` live on localhost with the real offline models, called with the real `openai` client and curl."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.e2e
KEY = "e2e-secret"
FACT = "The Larkspur Observatory opened in 1911 on Merrow Hill; it was founded by Edith Calloway."
QUESTION = "When did the Larkspur Observatory open?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "memory_llm", "serve", "--port", str(port), "--api-key", KEY,
                             "--home", str(tmp_path / "home")], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            log.seek(0)
            proc.kill()
            pytest.fail(f"server did not start: {log.read()[-2000:]}")
        time.sleep(0.5)
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=300)


def test_live_server_with_openai_client_and_curl(server):
    import openai

    learned = curl("-X", "POST", server + "/v1/memories", "-H", f"Authorization: Bearer {KEY}",
                   "-H", "Content-Type: application/json", "-H", "X-Namespace: alice",
                   "-d", json.dumps({"text": FACT}))
    body, status = learned.stdout.rsplit("\n", 1)
    assert status == "200" and json.loads(body)["chunks_added"] == 1

    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["mllm"]
    done = client.chat.completions.create(model="mllm", messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=20, user="alice")
    assert "1911" in done.choices[0].message.content
    ext = done.model_extra["mllm"]
    assert ext["namespace"] == "alice" and "Larkspur" in ext["sources"][0]["text"] and ext["answer_id"]

    pieces, last = [], None
    for chunk in client.chat.completions.create(model="mllm", messages=[{"role": "user", "content": QUESTION}],
                                                max_tokens=8, stream=True, extra_headers={"X-Namespace": "alice"}):
        pieces.append(chunk.choices[0].delta.content or "")
        last = chunk
    assert len([p for p in pieces if p]) > 3 and "Larkspur" in "".join(pieces)
    assert last.choices[0].finish_reason == "stop" and last.model_extra["mllm"]["sources"]

    other = client.chat.completions.create(model="mllm", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=1, user="bob")
    assert other.model_extra["mllm"]["sources"] == []  # another tenant does not see alice's memory

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong").models.list()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="mllm", messages=[])

    streamed = curl("-N", server + "/v1/chat/completions", "-H", f"Authorization: Bearer {KEY}",
                    "-H", "Content-Type: application/json", "-H", "X-Namespace: alice",
                    "-d", json.dumps({"model": "mllm", "stream": True, "max_tokens": 4,
                                      "messages": [{"role": "user", "content": QUESTION}]}))
    body, status = streamed.stdout.rsplit("\n", 1)
    events = [ln[6:] for ln in body.split("\n\n") if ln.startswith("data: ")]
    assert status == "200" and events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]).strip()

    for args, want in [((), "401"), (("-H", f"Authorization: Bearer {KEY}", "-d", "{oops"), "400")]:
        bad = curl("-X", "POST", server + "/v1/chat/completions", "-H", "Content-Type: application/json", *args)
        body, status = bad.stdout.rsplit("\n", 1)
        assert status == want and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
