import json

import pytest

from memory_llm import EvalFormatError
from memory_llm.evaluate import is_correct, load_probes, score


def write(tmp_path, lines):
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


def test_correctness_needs_every_group():
    answers = [["Paris", "paris, france"], ["1911"]]
    assert is_correct("It opened in PARIS in 1911.", answers)
    assert not is_correct("It opened in Paris.", answers)


def test_load_and_score_by_tag(tmp_path):
    path = write(tmp_path, [
        {"id": "a", "kind": "cloze", "input": "The sky is", "answers": [["blue"]], "tags": ["mem", "x"]},
        {"id": "b", "kind": "qa", "input": "Colour of grass?", "answers": "green", "tags": ["gen"]},
    ])
    probes = load_probes(path)
    assert [p.kind for p in probes] == ["cloze", "qa"] and probes[1].answers == [["green"]]
    result = score(probes, ["blue, clearly", "red"], "rag")
    assert result["accuracy"] == 0.5 and result["by_tag"] == {"gen": 0.0, "mem": 1.0, "x": 1.0}


@pytest.mark.parametrize("line,message", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"kind": "essay", "input": "x", "answers": [["y"]]}', "kind must be one of"),
    ('{"kind": "qa", "answers": [["y"]]}', "'input' must be"),
    ('{"kind": "qa", "input": "x", "answers": []}', "'answers' must be"),
    ('{"kind": "qa", "input": "x", "answers": [[1]]}', "'answers' must be"),
    ('{"kind": "qa", "input": "x", "answers": [["y"]], "tags": "mem"}', "'tags' must be"),
])
def test_malformed_lines_name_the_line(tmp_path, line, message):
    path = write(tmp_path, ['{"id": "ok", "kind": "qa", "input": "x", "answers": [["y"]]}', line])
    with pytest.raises(EvalFormatError, match=rf"eval.jsonl:2: .*{message}"):
        load_probes(path)


def test_empty_and_duplicate(tmp_path):
    with pytest.raises(EvalFormatError, match="no probes"):
        load_probes(write(tmp_path, [""]))
    dup = {"id": "a", "input": "x", "answers": [["y"]]}
    with pytest.raises(EvalFormatError, match="duplicate probe id"):
        load_probes(write(tmp_path, [dup, dup]))


def test_evaluate_base_and_rag_with_tiny_model(mem, tmp_path):
    mem.learn(text="The secret word is zebra.")
    path = write(tmp_path, [
        {"id": "c1", "kind": "cloze", "input": "The secret word is", "answers": [["zebra"]], "tags": ["mem"]},
        {"id": "q1", "kind": "qa", "input": "What is the secret word?", "answers": [["zebra"]], "tags": ["gen"]},
    ])
    for mode in ("base", "rag"):
        result = mem.evaluate(path, mode)
        assert result["mode"] == mode and result["n"] == 2 and set(result["by_tag"]) == {"mem", "gen"}
        assert len(result["probes"]) == 2 and all(isinstance(p["output"], str) for p in result["probes"])
    with pytest.raises(Exception, match="needs a consolidated adapter"):
        mem.evaluate(path, "closed")
