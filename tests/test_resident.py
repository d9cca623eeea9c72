"""`mllm ask` and `mllm search` through a resident `mllm serve` of the home (memory_llm.resident), on fakes: a live
server in a thread; the CLI must not open the home itself while the server answers, and falls back to in-process
when the record is stale or --local is given."""

import json
import os
import threading
import time

import pytest
from typer.testing import CliRunner

from memory_llm import cli, cli_common
from memory_llm.resident import SERVER_FILE, announce, find, withdraw
from memory_llm.server import create_app

FACT = "Herons nest in tall trees near the lake."


@pytest.fixture
def live(mem, monkeypatch):
    """A server of mem's home on a free port, recorded in the home; the CLI's in-process path is counted."""
    import uvicorn
    from test_server_e2e import free_port

    mem.learn(text=FACT, source="herons", namespace="birds")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(mem, api_key="k3y"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    announce(mem.settings.home, f"http://127.0.0.1:{port}/v1", "k3y")
    opened = []
    monkeypatch.setattr(cli_common, "open_memory", lambda home=None, **kw: opened.append(kw) or mem)
    yield mem, opened
    server.should_exit = True
    thread.join(10)
    withdraw(mem.settings.home)


def mllm(mem, *args):
    return CliRunner().invoke(cli.app, [*args, "--home", str(mem.settings.home)])


def test_ask_and_search_go_through_the_resident_server(live):
    mem, opened = live
    out = mllm(mem, "ask", "Where do herons nest?", "-n", "birds", "--max-new-tokens", "5", "--json")
    assert out.exit_code == 0, out.output
    answer = json.loads(out.stdout)
    assert answer["sources"][0]["text"] == FACT and answer["namespace"] == "birds" and answer["id"]
    assert {"path", "why", "template", "adapter", "timings", "question", "finish_reason"} <= set(answer)
    assert opened == []  # the CLI never opened the home: the server answered
    logged = mem.store.logged_answer(answer["id"], "birds")
    assert logged is not None and logged.answer == answer["answer"]
    text = mllm(mem, "ask", "Where do herons nest?", "-n", "birds", "--max-new-tokens", "5", "-k", "1")
    assert text.exit_code == 0 and "Sources:" in text.stdout and "[1] herons" in text.stdout
    assert "mllm feedback" in text.stdout and opened == []
    found = json.loads(mllm(mem, "search", "heron nest", "-n", "birds", "--json").stdout)
    assert found["hits"][0]["text"] == FACT and opened == []
    bad = mllm(mem, "ask", "Where?", "--prompt", "nope")
    assert bad.exit_code == 1 and "unknown template 'nope'" in bad.output and "Traceback" not in bad.output

    local = mllm(mem, "ask", "Where do herons nest?", "-n", "birds", "--max-new-tokens", "5", "--json", "--local")
    assert local.exit_code == 0 and len(opened) == 1  # --local: in-process
    assert set(json.loads(local.stdout)) == set(answer)  # the same fields either way
    mllm(mem, "ask", "Where?", "--max-new-tokens", "2", "--no-adapter")
    assert len(opened) == 2  # a choice the server cannot honour runs in-process


def test_chat_goes_through_the_resident_server_with_feedback(live):
    mem, opened = live
    out = CliRunner().invoke(cli.app, ["chat", "-n", "birds", "--max-new-tokens", "4", "--home",
                                       str(mem.settings.home)],
                             input="Where do herons nest?\n/sources\n/good\nAnd what else?\n/quit\n")
    assert out.exit_code == 0, out.output
    assert out.output.count("bot> ") == 2 and "[1] herons" in out.output and "feedback recorded" in out.output
    assert opened == []  # the server answered every turn
    logged = mem.store.answers("birds")
    assert len(logged) == 2 and len({a.session_id for a in logged}) == 1  # one session, both turns
    assert mem.store.exemplars("birds")  # /good kept the first answer as an exemplar


def test_a_stale_or_foreign_record_is_ignored(tmp_path):
    home = tmp_path / "home"
    announce(home, "http://127.0.0.1:9/v1", None)
    record = json.loads((home / SERVER_FILE).read_text())
    assert record["pid"] == os.getpid() and oct((home / SERVER_FILE).stat().st_mode)[-3:] == "600"
    assert find(home) is None  # this process is alive but nothing listens there
    record["pid"] = 2 ** 22 + 7  # no such process
    (home / SERVER_FILE).write_text(json.dumps(record))
    assert find(home) is None
    withdraw(home)
    assert (home / SERVER_FILE).exists()  # another process's record is left alone
    (home / SERVER_FILE).write_text("{oops")
    assert find(home) is None
