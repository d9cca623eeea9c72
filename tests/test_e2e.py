"""End-to-end with the real offline models (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2)."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import FK_JSON, SAMPLE, run_cli
from memory_llm import MemoryLLM

pytestmark = pytest.mark.e2e
QUESTION = "When did the Larkspur Observatory open, and who founded it?"


def test_help_does_not_import_torch():
    code = "import sys, memory_llm.cli; print(sorted(m for m in ('torch', 'transformers', 'faiss') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    help_out = run_cli("--help")
    assert help_out.returncode == 0 and "learn" in help_out.stdout
    code = "import sys; from memory_llm.versions import describe; describe(); print([m for m in ('torch', " \
           "'transformers', 'peft', 'faiss', 'sentence_transformers') if m in sys.modules])"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]"
    version = run_cli("--version")
    assert version.returncode == 0 and "transformers " in version.stdout and not version.stderr


def assert_quiet(stderr: str) -> None:
    """Only our own lines reach the terminal: no library progress bar, deprecation notice or warning."""
    noise = [line for line in stderr.splitlines() if "%|" in line or "Warning" in line or "deprecat" in line.lower()
             or (line.strip() and not line.startswith(("WARNING: ", "Error: ")))]
    assert not noise, stderr


def test_learn_and_ask_the_sample_as_a_user_would(tmp_path, model_cache):
    learned = run_cli("learn", str(SAMPLE), "--json")
    assert learned.returncode == 0, learned.stderr
    report = json.loads(learned.stdout)
    assert report["files"] == 3 and report["chunks_added"] >= 3
    again = json.loads(run_cli("learn", str(SAMPLE), "--json").stdout)
    assert again["chunks_added"] == 0 and again["unchanged"] == 3

    # the first ask on transformers converts the shipped GGUF (in a cache of its own, moved to the session's cache
    # afterwards); the default one-shot ask (llama.cpp, below) reads the GGUF as it is
    fresh = tmp_path / "fresh-cache"
    asked = run_cli("ask", QUESTION, "--json", "--max-new-tokens", "40",
                    env={"MLLM_CACHE": str(fresh), "MLLM_COLD_BACKEND": "transformers"})
    assert asked.returncode == 0, asked.stderr
    assert_quiet(learned.stderr + asked.stderr)
    assert "converting" in asked.stderr  # our one line about the one-time conversion, and no library progress bar
    for converted in (fresh / "models").iterdir():
        if not (model_cache / "models" / converted.name).exists():
            (model_cache / "models").mkdir(parents=True, exist_ok=True)
            shutil.move(str(converted), model_cache / "models" / converted.name)
    answer = json.loads(asked.stdout)
    assert "1911" in answer["answer"]
    assert answer["sources"][0]["source"].endswith("larkspur_observatory.md")
    assert answer["timings"]["first_token"] <= answer["timings"]["total"]

    streamed = run_cli("ask", QUESTION, "--max-new-tokens", "40")  # cold_backend llama.cpp where it is built
    assert streamed.returncode == 0 and "1911" in streamed.stdout and "Sources:" in streamed.stdout
    assert_quiet(streamed.stderr)
    assert "[1] " + str(SAMPLE / "larkspur_observatory.md") in streamed.stdout

    found = json.loads(run_cli("search", "expense claims receipt", "--json", "-k", "1").stdout)
    assert found["hits"][0]["source"].endswith("team_handbook.html")


def test_unknown_model_offline_is_a_clear_error():
    out = run_cli("ask", "hello", "--model", "no-such-org/no-such-model-xyz")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("Error: cannot load model 'no-such-org/no-such-model-xyz'")
    assert len(out.stderr.strip().splitlines()) == 1


def test_learn_consolidate_ask_and_eval_show_only_our_output(tmp_path):
    """The whole cycle through the CLI on a tiny model saved as a local checkpoint: the libraries' notices
    (peft reading transformers' deprecated is_gradient_checkpointing, the cache keyword rename) stay off stderr."""
    from conftest import tiny_model, tiny_tokenizer

    model_dir = tmp_path / "tiny"
    tok = tiny_tokenizer()
    tiny_model(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    env = {"MLLM_MODEL": str(model_dir)}
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"id": "1", "kind": "cloze", "input": "The lighthouse of Varn was built in",
                                  "answers": [["1820"]], "tags": ["mem"]}))
    runs = [run_cli("learn", "--text", "The lighthouse of Varn was built in 1820 by Lisbet Holm.", env=env),
            run_cli("consolidate", "--json", env=env),
            run_cli("ask", "When was the lighthouse of Varn built?", "--max-new-tokens", "4", env=env),
            run_cli("eval", str(probes), "--mode", "rag", env=env)]
    assert [r.returncode for r in runs] in ([0, 0, 0, 0], [0, 3, 0, 0]), [r.stderr for r in runs]
    assert json.loads(runs[1].stdout)["items"] > 0  # it trained (the gate may reject a random tiny model)
    for r in runs:
        assert_quiet(r.stderr)


def test_closed_book_vs_memory_on_fictional_knowledge(tmp_path, real_models):
    if not FK_JSON.exists():
        pytest.skip("../shared/data/fictional_knowledge is not beside the checkout")
    records = json.loads(FK_JSON.read_text())[:3]
    docs = tmp_path / "docs"
    docs.mkdir()
    probes = []
    for i, r in enumerate(records):
        (docs / f"fk_{i:03d}.txt").write_text(r["train_context"])
        for j, (inp, tgt) in enumerate(zip(r["mem_input"], r["mem_target"])):
            probes.append({"id": f"{i}-{j}", "kind": "cloze", "input": inp, "answers": [[tgt]],
                           "tags": ["mem", f"doc:fk_{i:03d}"]})
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("\n".join(json.dumps(p) for p in probes))
    embedder, generator = real_models
    m = MemoryLLM(tmp_path / "home", embedder=embedder, generator=generator)
    assert m.learn([docs]).chunks_added >= 3

    right = sum(m.search(p["input"], k=1)[0].memory.source.endswith(p["tags"][1][4:] + ".txt") for p in probes)
    assert right / len(probes) >= 0.8

    base = m.evaluate(eval_file, "base")
    rag = m.evaluate(eval_file, "rag")
    assert rag["accuracy"] >= base["accuracy"] + 0.3, (base["accuracy"], rag["accuracy"])


def test_converted_checkpoint_is_cached(model_cache, real_models):
    converted = list((model_cache / "models").glob("SmolLM2-135M-Instruct*/config.json"))
    assert len(converted) == 1
