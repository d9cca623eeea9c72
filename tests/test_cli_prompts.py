"""`mllm prompt | feedback | chat | serve` through typer's CliRunner, on fakes."""

import json

import pytest
from typer.testing import CliRunner

from memory_llm import MemoryLLM, cli, cli_common

runner = CliRunner()


@pytest.fixture(autouse=True)
def fake_models(monkeypatch, fake_embedder, tiny_generator):
    def factory(home, **overrides):
        overrides = {k: v for k, v in overrides.items() if k not in ("embedder", "model")}
        return MemoryLLM(home, embedder=fake_embedder, generator=tiny_generator, max_new_tokens=6, **overrides)

    monkeypatch.setattr(cli_common, "open_memory", factory)


def mllm(*args, input=None):
    return runner.invoke(cli.app, list(args), input=input)


def ok_json(*args, input=None):
    r = mllm(*args, "--json", input=input)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def assert_clean_error(result, fragment):
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert err.startswith("Error: ") and fragment in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in result.output


def test_prompt_add_list_show_rm(tmp_path):
    r = mllm("prompt", "add", "pirate", "-d", "answer like a pirate", "-s", "Talk like a pirate.",
             "-u", "{context}\n\nMatey asks: {question}")
    assert r.exit_code == 0 and "saved" in r.stdout
    assert "pirate" in [t["name"] for t in ok_json("prompt", "list")]
    shown = ok_json("prompt", "show", "pirate")
    assert shown["user"] == "{context}\n\nMatey asks: {question}" and shown["system"] == "Talk like a pirate."
    assert "Matey asks" in mllm("prompt", "show", "pirate").stdout
    assert mllm("prompt", "rm", "pirate").exit_code == 0
    assert "pirate" not in [t["name"] for t in ok_json("prompt", "list")]


@pytest.mark.parametrize("args,fragment", [
    (["prompt", "show", "nope"], "unknown template 'nope'"),
    (["prompt", "rm", "nope"], "unknown template 'nope'"),
    (["prompt", "rm"], "give a template name or --exemplar ID"),
    (["prompt", "rm", "--exemplar", "77"], "unknown exemplar id 77"),
    (["prompt", "add", "x", "-d", "d", "-s", "s", "-u", "no slot"], "no {question} slot"),
    (["prompt", "add", "default", "-d", "d", "-s", "s"], "exists; use --replace"),
    (["prompt", "import", "{p}/missing.toml"], "no such file"),
    (["prompt", "import", "{p}/bad.toml"], "not valid TOML"),
    (["prompt", "export", "{p}/out.txt"], "unknown prompt file format"),
    (["ask", "hi", "--prompt", "nope"], "unknown template 'nope'"),
    (["feedback", "42", "--good"], "unknown answer id 42"),
    (["feedback", "1"], "exactly one of --good, --bad or --correct"),
    (["feedback", "1", "--good", "--bad"], "exactly one of --good, --bad or --correct"),
    (["chat", "--prompt", "nope"], "unknown template 'nope'"),
    (["serve", "--port", "0"], "--port must be 1-65535"),
    (["serve", "--api-key", " "], "--api-key is empty"),
])
def test_bad_input_is_one_line_and_exit_1(tmp_path, args, fragment):
    (tmp_path / "bad.toml").write_text("[[template]\n")
    assert_clean_error(mllm(*[a.replace("{p}", str(tmp_path)) for a in args]), fragment)


def test_import_export_and_exemplar_listing(tmp_path):
    src = tmp_path / "lib.yaml"
    src.write_text("template:\n  - name: terse\n    description: very short answers\n    system: Be terse.\n"
                   "    user: \"{context}\\n{question}\"\nexemplar:\n  - question: Who wrote Emma?\n"
                   "    answer: Jane Austen.\n    rating: 2\n")
    assert ok_json("prompt", "import", str(src), "-n", "alice") == {"templates": 1, "exemplars": 1}
    rows = ok_json("prompt", "list", "--exemplars", "-n", "alice")
    assert [(r["question"], r["rating"], r["namespace"]) for r in rows] == [("Who wrote Emma?", 2, "alice")]
    assert ok_json("prompt", "list", "--exemplars", "-n", "bob") == []
    out = tmp_path / "out.toml"
    assert mllm("prompt", "export", str(out), "-n", "alice").exit_code == 0
    text = out.read_text()
    assert "[[template]]" in text and 'name = "terse"' in text and "Jane Austen." in text
    eid = rows[0]["id"]
    assert mllm("prompt", "rm", "--exemplar", str(eid)).exit_code == 0
    assert ok_json("prompt", "list", "--exemplars") == []


def test_ask_json_names_template_and_exemplars_then_feedback(tmp_path):
    assert mllm("learn", "--text", "The observatory opened in 1897.").exit_code == 0
    first = ok_json("ask", "When did the observatory open?")
    assert first["id"] and first["template"] and first["exemplars"] == []
    fb = ok_json("feedback", str(first["id"]), "--good")
    assert fb["feedback"] == "good" and fb["exemplar_ids"]
    second = ok_json("ask", "When did the observatory open?")
    assert [e["id"] for e in second["exemplars"]] == fb["exemplar_ids"]
    assert ok_json("ask", "When did the observatory open?", "--no-exemplars")["exemplars"] == []
    assert ok_json("ask", "When did the observatory open?", "--prompt", "howto")["template"] == "howto"
    plain = mllm("ask", "When did the observatory open?")
    assert plain.exit_code == 0 and "mllm feedback" in plain.stdout
    corrected = mllm("feedback", str(second["id"]), "--correct", "It opened in 1897.")
    assert corrected.exit_code == 0 and "correction learned" in corrected.stdout
    assert_clean_error(mllm("feedback", str(second["id"]), "--good", "-n", "bob"), "in namespace 'bob'")


def test_namespace_on_learn_search_ask_eval_forget(tmp_path):
    assert mllm("learn", "--text", "The vault code is 4417.", "-n", "alice").exit_code == 0
    assert ok_json("search", "vault code", "-n", "alice")["hits"]
    assert ok_json("search", "vault code", "-n", "bob")["hits"] == []
    assert ok_json("ask", "What is the vault code?", "-n", "bob")["sources"] == []
    assert ok_json("ask", "What is the vault code?", "-n", "alice")["sources"]
    probe = tmp_path / "p.jsonl"
    probe.write_text(json.dumps({"id": "1", "kind": "qa", "input": "vault code?", "answers": [["4417"]]}) + "\n")
    assert ok_json("eval", str(probe), "-n", "bob")["n"] == 1
    assert ok_json("forget", "--all", "--yes", "-n", "bob") == {"forgotten": 0}
    assert ok_json("forget", "--all", "--yes", "-n", "alice") == {"forgotten": 1}


def test_chat_session_with_commands_remember_and_resume(tmp_path):
    script = "My locker number is 31.\n/sources\n/good\n/bogus\nWhat is my locker number?\n/quit\n"
    r = mllm("chat", "--session", "t1", "-n", "dana", "--remember", input=script)
    assert r.exit_code == 0, r.output
    assert r.stdout.count("bot> ") == 2 and "Sources:" in r.stdout
    assert "remembered as memory" in r.stderr and "feedback recorded" in r.stderr
    assert "Error: unknown command /bogus" in r.stderr
    assert ok_json("search", "locker number", "-n", "dana")["hits"][0]["text"] == "My locker number is 31."
    assert len(ok_json("prompt", "list", "--exemplars", "-n", "dana")) == 1
    resumed = mllm("chat", "--session", "t1", "-n", "dana", input="")
    assert resumed.exit_code == 0 and "resumed, 2 turn(s)" in resumed.stderr
    early = mllm("chat", input="/good\n")
    assert "Error: no answer yet" in early.stderr and early.exit_code == 0


def test_help_lists_the_new_commands():
    out = mllm("--help").stdout
    for cmd in ("prompt", "feedback", "chat", "serve"):
        assert cmd in out
    assert "import" in mllm("prompt", "--help").stdout


def test_example_chatbot_remembers_per_user_and_takes_feedback(tmp_path, fake_embedder, tiny_generator):
    import importlib.util
    import io

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("chatbot", REPO / "examples" / "chatbot.py")
    chatbot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chatbot)
    m = MemoryLLM(tmp_path / "home", embedder=fake_embedder, generator=tiny_generator, max_new_tokens=4)
    out = io.StringIO()
    conversation = chatbot.run(m, "erin", ["+", "My bike is a green Batavus.", "What bike do I have?", "+",
                                           "! A green Batavus."], out)
    assert out.getvalue().count("bot> ") == 2 and "Error: no answer to rate yet" in out.getvalue()
    assert [c["role"] for c in conversation] == ["system", "user", "assistant", "user", "assistant"]
    assert any("Batavus" in h.memory.text for h in m.search("green Batavus bike", namespace="erin"))
    assert m.search("green Batavus bike", namespace="frank") == []
    assert {e.source for e in m.store.exemplars("erin")} == {"feedback", "correction"}
    m.close()
