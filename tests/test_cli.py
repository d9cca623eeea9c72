"""The CLI through typer's CliRunner, on fakes: output formats and the bad-input contract
(one-line error, exit 1, no traceback, nothing stored lost)."""

import json

import pytest
from typer.testing import CliRunner

from memory_llm import MemoryLLM, cli, cli_common

runner = CliRunner()


@pytest.fixture(autouse=True)
def fake_models(monkeypatch, fake_embedder, tiny_generator, tmp_path):
    def factory(home, **overrides):
        overrides = {k: v for k, v in overrides.items() if k not in ("embedder", "model")}
        return MemoryLLM(home, embedder=fake_embedder, generator=tiny_generator, **overrides)

    monkeypatch.setattr(cli_common, "open_memory", factory)


def mllm(*args, input=None):
    return runner.invoke(cli.app, list(args), input=input)


def stored():
    return json.loads(mllm("stats", "--json").stdout)["memories"]


def assert_clean_error(result, fragment):
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert err.startswith("Error: ") and fragment in err and len(err.splitlines()) == 1
    assert "Traceback" not in result.output


def test_learn_search_ask_json(tmp_path):
    doc = tmp_path / "herons.md"
    doc.write_text("Herons nest in tall trees near the lake.")
    out = json.loads(mllm("learn", str(doc), "--json").stdout)
    assert out["chunks_added"] == 1 and out["files"] == 1
    hits = json.loads(mllm("search", "herons nest", "--json").stdout)["hits"]
    assert hits[0]["source"] == str(doc.resolve()) and hits[0]["text"].startswith("Herons")
    ans = json.loads(mllm("ask", "Where do herons nest?", "--json", "--max-new-tokens", "4").stdout)
    assert ans["sources"][0]["source"] == str(doc.resolve()) and "total" in ans["timings"]
    plain = mllm("ask", "Where do herons nest?", "--max-new-tokens", "4")
    assert plain.exit_code == 0 and "Sources:" in plain.stdout and "herons.md" in plain.stdout


def test_what_is_true_now_from_the_command_line():
    """learn says what it superseded and how to undo it; search shows dates and, with --history, the superseded;
    update, history and restore; bad ids and dates are one-line errors."""
    first = mllm("learn", "--text", "The wifi password for the Harbor office is tangerine-42.", "--date",
                 "2026-11-01", "--json")
    old = json.loads(first.stdout)["memory_ids"][0]
    second = mllm("learn", "--text", "The wifi password for the Harbor office is maple-17.", "--date", "2026-12-03")
    assert second.exit_code == 0 and f"superseded #{old} by #" in second.stdout
    assert f"(undo: mllm restore {old})" in second.stdout and "tangerine-42" in second.stdout
    plain = mllm("search", "Harbor office wifi password")
    assert "2026-12-03" in plain.stdout and "tangerine" not in plain.stdout
    both = mllm("search", "Harbor office wifi password", "--history")
    assert "[superseded]" in both.stdout and "tangerine-42" in both.stdout
    shown = mllm("history", str(old))
    assert shown.exit_code == 0 and "superseded by #" in shown.stdout and "(detected)" in shown.stdout
    new = json.loads(mllm("search", "Harbor office wifi password", "--json").stdout)["hits"][0]["id"]
    updated = json.loads(mllm("update", str(new), "The wifi password for the Harbor office is birch-905.",
                              "--json").stdout)
    assert [(x["old_id"], x["reason"]) for x in updated["superseded"]] == [(new, "update")]
    assert "Restored #" in mllm("restore", str(old)).stdout
    assert json.loads(mllm("stats", "--json").stdout)["superseded"] == 1
    assert_clean_error(mllm("history", "987654"), "no memory has id 987654")
    assert_clean_error(mllm("learn", "--text", "x y z", "--date", "soon"), "not a date")
    assert_clean_error(mllm("learn", "--text", "x y z", "--supersedes", "987654"), "no memory has id 987654")
    assert_clean_error(mllm("update", "987654", "text"), "no memory has id 987654")
    assert json.loads(mllm("forget", "--superseded", "--json").stdout) == {"forgotten": 1}


def test_learn_text_and_stdin_then_forget_and_stats(tmp_path):
    assert mllm("learn", "--text", "Remember the milk.").exit_code == 0
    assert mllm("learn", "-", input="Buy fresh bread on Friday.").exit_code == 0
    assert stored() == 2
    uri = [s for s in json.loads(mllm("sources", "--json").stdout) if s["uri"].startswith("stdin:")][0]["uri"]
    assert json.loads(mllm("forget", "--source", uri, "--json").stdout) == {"forgotten": 1}
    refused = mllm("forget", "--all")  # no terminal, no --yes
    assert_clean_error(refused, "without --yes")
    assert stored() == 1
    assert mllm("forget", "--all", "--yes").exit_code == 0 and stored() == 0
    text = mllm("stats").stdout
    assert "memories:    0" in text and "index:" in text


def test_learn_progress_free_summary(tmp_path):
    (tmp_path / "a.txt").write_text("Alpha is the first letter.")
    out = mllm("learn", str(tmp_path))
    assert out.exit_code == 0 and out.stdout.startswith("Learned 1 source(s): 1 chunk(s) added")


@pytest.mark.parametrize("setup,args,fragment", [
    (lambda p: None, ["learn", "{p}/missing.txt"], "no such file or directory"),
    (lambda p: (p / "e.txt").write_text(""), ["learn", "{p}/e.txt"], "file is empty"),
    (lambda p: (p / "b.bin").write_bytes(b"\x00\x01" * 50), ["learn", "{p}/b.bin"], "binary"),
    (lambda p: (p / "l.txt").write_bytes("olé".encode("latin-1")), ["learn", "{p}/l.txt"], "not valid utf-8"),
    (lambda p: (p / "big.txt").write_bytes(b"a" * (50 * 1024 * 1024)), ["learn", "{p}/big.txt"], "50.0 MB"),
    (lambda p: None, ["learn"], "nothing to learn"),
    (lambda p: (p / "x.jsonl").write_text("{bad"), ["eval", "{p}/x.jsonl"], "invalid JSON"),
    (lambda p: None, ["eval", "{p}/none.jsonl"], "no such eval file"),
    (lambda p: None, ["eval", "{p}/none.jsonl", "--mode", "closed"], "no such eval file"),
    (lambda p: None, ["ask", "  "], "question is empty"),
    (lambda p: None, ["forget"], "say what to forget"),
    (lambda p: None, ["forget", "9999"], "no memory matches id(s) 9999"),
    (lambda p: None, ["forget", "--source", "{p}/never-learned.txt"], "no memory matches source"),
    (lambda p: None, ["ask", "hi", "--max-new-tokens", "0"], "must be > 0"),
    (lambda p: None, ["learn", "--text", "x", "-n", ""], "invalid namespace"),
])
def test_bad_input_is_one_line_exit_1_and_keeps_memories(tmp_path, setup, args, fragment):
    assert mllm("learn", "--text", "An earlier memory about owls.").exit_code == 0
    setup(tmp_path)
    result = mllm(*[a.replace("{p}", str(tmp_path)) for a in args])
    assert_clean_error(result, fragment)
    assert stored() == 1


def test_bad_eval_mode_is_refused(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"id": "a", "input": "x", "answers": [["y"]]}\n')
    assert_clean_error(mllm("eval", str(path), "--mode", "closed"), "needs a consolidated adapter")
    assert_clean_error(mllm("eval", str(path), "--mode", "sideways"), "mode must be one of")


def test_corrupted_index_is_rebuilt_transparently(tmp_path):
    assert mllm("learn", "--text", "Owls hunt at night in the forest.").exit_code == 0
    index = tmp_path / "home" / "index" / "vectors.faiss"
    index.write_bytes(b"\x00garbage")
    result = mllm("search", "owls hunt", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["hits"][0]["text"].startswith("Owls")
    assert "rebuilding" in result.stderr


def test_home_written_by_newer_schema(tmp_path):
    assert mllm("learn", "--text", "Owls hunt at night.").exit_code == 0
    import sqlite3

    db = sqlite3.connect(tmp_path / "home" / "memory.sqlite")
    db.execute("INSERT INTO _migrations VALUES ('m999_future', 0)")
    db.commit()
    db.close()
    assert_clean_error(mllm("stats"), "newer memory_llm")
    assert_clean_error(mllm("learn", "--text", "more"), "newer memory_llm")


def test_eval_json_shape(tmp_path):
    assert mllm("learn", "--text", "The secret word is zebra.").exit_code == 0
    path = tmp_path / "e.jsonl"
    path.write_text('{"id": "a", "kind": "cloze", "input": "The secret word is", "answers": [["zebra"]],'
                    ' "tags": ["mem"]}\n')
    out = json.loads(mllm("eval", str(path), "--mode", "rag", "--json").stdout)
    assert set(out) >= {"mode", "n", "accuracy", "by_tag"} and out["n"] == 1 and "mem" in out["by_tag"]


def test_help_lists_commands():
    out = mllm("--help").stdout
    for cmd in ("learn", "ask", "search", "forget", "stats", "eval"):
        assert cmd in out


def test_version_and_doctor_name_the_model_libraries_in_use():
    from importlib import metadata

    import memory_llm

    out = mllm("--version")
    line = out.stdout.strip()
    assert out.exit_code == 0 and line.startswith(f"memory-llm {memory_llm.__version__} (")
    for name in ("torch", "transformers", "peft", "sentence-transformers"):
        assert f"{name} {metadata.version(name)}" in line
    assert f"faiss {metadata.version('faiss-cpu')}" in line
    report = json.loads(mllm("doctor", "--json").stdout)
    assert report["versions"]["transformers"] == metadata.version("transformers") and report["healthy"]
    assert mllm("doctor").stdout.splitlines()[0] == line


def test_doctor_finds_and_repairs_a_broken_index(tmp_path):
    assert mllm("learn", "--text", "Owls hunt at night in the forest.").exit_code == 0
    healthy = json.loads(mllm("doctor", "--json").stdout)
    assert healthy["healthy"] and {c["check"] for c in healthy["checks"]} == {"sqlite", "fts", "embeddings", "index", "adapters"}
    (tmp_path / "home" / "index" / "vectors.faiss").write_bytes(b"junk")
    broken = mllm("doctor")
    assert broken.exit_code == 1 and "FAIL  index" in broken.stdout and "--repair" in broken.stdout
    fixed = mllm("doctor", "--repair")
    assert fixed.exit_code == 0 and "repaired: rebuilt the vector index" in fixed.stdout
    assert json.loads(mllm("doctor", "--json").stdout)["healthy"] and stored() == 1


def test_consolidate_and_adapters_commands(tmp_path, monkeypatch):
    from memory_llm.consolidate import run as runmod
    from memory_llm.consolidate.recipe import Recipe

    monkeypatch.setattr(runmod, "Recipe", lambda: Recipe(epochs=1, rank=4, alpha=8, locality_prompts=4, questions=1, min_steps=0))
    nothing = mllm("consolidate", "--json")
    assert nothing.exit_code == 0 and json.loads(nothing.stdout)["status"] == "nothing-new"
    assert mllm("learn", "--text", "The lighthouse of Varn was built in 1820 by Lisbet Holm.").exit_code == 0
    dry = json.loads(mllm("consolidate", "--dry-run", "--json").stdout)
    assert dry["status"] == "dry-run" and dry["memories"] == 1
    rejected = mllm("consolidate", "--json")  # a random tiny model cannot reach the default reliability floor
    out = json.loads(rejected.stdout)
    assert rejected.exit_code == 3 and out["status"] == "rejected" and out["exit_code"] == 3
    assert any(r.startswith("failed: reliability") for r in out["reasons"])
    listed = json.loads(mllm("adapters", "list", "--json").stdout)
    assert listed == {"namespace": None, "current": None, "versions": [], "broken": [], "tenants": []}
    assert "base model answers" in mllm("adapters", "rollback").stdout
    assert_clean_error(mllm("adapters", "show"), "no current adapter")
    assert_clean_error(mllm("adapters", "show", "v0042"), "no adapter version 'v0042'")


def test_consolidate_recipe_file_errors_are_one_line(tmp_path):
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("epochz = 2\n")
    assert_clean_error(mllm("consolidate", "--recipe", str(unknown)), "unknown recipe field 'epochz'")
    invalid = tmp_path / "invalid.toml"
    invalid.write_text('route_pool = "median"\n')
    assert_clean_error(mllm("consolidate", "--recipe", str(invalid)), "route_pool='median'")
    assert_clean_error(mllm("consolidate", "--recipe", str(tmp_path / "none.toml")), "cannot read")
