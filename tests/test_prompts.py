"""The prompt library, feedback, chat and namespaces through the facade, on fakes (fake embedder, tiny Llama)."""

import json
import threading
import time

import numpy as np
import pytest

from memory_llm import InputError
from memory_llm.generate import build_messages
from memory_llm.prompts import Exemplar, Template
from memory_llm.prompts.files import default_templates, read_library


def test_shipped_default_template_renders_exactly_like_the_builtin_prompt():
    default = next(t for t in default_templates() if t.name == "default")
    for context in ([], ["Herons nest in trees.", "Owls hunt at night."]):
        assert build_messages("Where?", context, template=default) == build_messages("Where?", context)


def test_sources_stay_delimited_whatever_the_template_says():
    t = Template("bare", "d", "Be brief.", "Q: {question} (no context slot) {other}")
    msgs = build_messages("why {context}?", ["a source"], template=t, shots=[("q1", "a1")],
                          history=[{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "ok"}])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    user = msgs[-1]["content"]
    assert user.startswith("<sources>\n[1] a source\n</sources>")
    assert "Q: why {context}? (no context slot) {other}" in user


def test_new_home_has_the_shipped_templates_and_a_removed_one_stays_removed(mem):
    names = [t.name for t in mem.prompts.templates()]
    assert {"default", "summarize", "howto", "chat"} <= set(names)
    mem.prompts.remove("howto")
    mem.close()
    assert "howto" not in [t.name for t in mem.prompts.templates()]  # a fresh library over the same home


def test_template_by_name_by_similarity_and_fallback(mem):
    mem.learn(text="The quarterly meeting notes: budget approved, hiring paused, office moves in May.")
    named = mem.ask("What was decided?", prompt="howto")
    assert named.template == "howto" and named.prompt.how == "named"
    summary = mem.ask("Summarize the main points of the meeting notes")
    assert summary.template == "summarize" and summary.prompt.how == "similarity"
    other = mem.ask("zzz qqq xxx")
    assert other.template == "default" and other.prompt.how == "fallback"
    assert other.as_dict()["template"] == "default"


@pytest.mark.parametrize("template,fragment", [
    (Template("ok-name", "d", "s", "no slot here"), "no {question} slot"),
    (Template("bad name!", "d", "s", "{question}"), "invalid template name"),
    (Template("x", "  ", "s", "{question}"), "description must be a non-empty text"),
])
def test_bad_templates_are_refused(mem, template, fragment):
    with pytest.raises(InputError, match=fragment.replace("{", r"\{").replace("}", r"\}")):
        mem.prompts.add(template)
    assert template.name not in [t.name for t in mem.prompts.templates()]


def test_unknown_template_is_a_clear_error(mem):
    with pytest.raises(InputError, match=r"unknown template 'nope' \(known: chat, default"):
        mem.ask("hello", prompt="nope")


def test_add_refuses_to_overwrite_without_replace(mem):
    mem.prompts.add(Template("pirate", "talk like a pirate", "Arr.", "{context}\n{question}"))
    with pytest.raises(InputError, match="exists; use --replace"):
        mem.prompts.add(Template("pirate", "x", "y", "{question}"))
    mem.prompts.add(Template("pirate", "x", "y", "{question}"), replace=True)
    assert mem.prompts.get("pirate").system == "y"


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_export_import_round_trip(mem, tmp_path, fake_embedder, tiny_generator, suffix):
    from memory_llm import MemoryLLM

    mem.prompts.add(Template("multi", "multi-line", 'He said "hi".\nTwo lines.', "{context}\n\n{question} {x}"))
    mem.store.add_exemplars([Exemplar(None, "alice", "Who is Ada?", "A mathematician.", 3)])
    path = tmp_path / f"lib{suffix}"
    assert mem.prompts.export_file(path) == (5, 1)
    other = MemoryLLM(tmp_path / "other", embedder=fake_embedder, generator=tiny_generator)
    other.prompts.remove("default")
    assert other.prompts.import_file(path, "ignored") == (5, 1)
    assert other.prompts.get("multi") == mem.prompts.get("multi")
    assert [e.as_dict() | {"id": 0} for e in other.store.exemplars()] == \
           [e.as_dict() | {"id": 0, "source": "import"} for e in mem.store.exemplars()]
    assert other.prompts.import_file(path, "x") == (5, 0)  # exemplars already there are not duplicated
    other.close()


@pytest.mark.parametrize("content,fragment", [
    ("[[template]\nname = 'x'", "not valid TOML"),
    ("[[template]]\nname = 'x'\ndescription = 'd'\nsystem = 's'\nuser = 'no slot'", "no {question} slot"),
    ("[[template]]\nname = 'x'\nsystem = 's'\nuser = '{question}'", "template #2: missing 'description'"),
    ("[[template]]\nname = 'x'\ndescription = 'd'\nsystem = 's'\nuser = '{question}'\ncolour = 1", "unknown key"),
    ("[[exemplar]]\nquestion = 'q'\nanswer = 'a'\nrating = 'high'", "rating must be an integer"),
    ("[[exemplar]]\nquestion = 'q'", "'answer' must be a non-empty text"),
    ("title = 'x'", "expected only 'template' and 'exemplar'"),
    ("", "no [[template]] or [[exemplar]] entries"),
])
def test_malformed_import_file_changes_nothing(mem, tmp_path, content, fragment):
    # a valid template first: the file is all or nothing
    path = tmp_path / "lib.toml"
    path.write_text("[[template]]\nname = 'good'\ndescription = 'd'\nsystem = 's'\nuser = '{question}'\n\n"
                    + content if content.startswith("[[") else content)
    before = [t.name for t in mem.prompts.templates()]
    with pytest.raises(InputError, match=fragment.replace("[", r"\[").replace("{", r"\{").replace("}", r"\}")):
        mem.prompts.import_file(path, "default")
    assert [t.name for t in mem.prompts.templates()] == before and mem.store.exemplars() == []


def test_malformed_yaml_and_unknown_format(mem, tmp_path):
    bad = tmp_path / "lib.yaml"
    bad.write_text("template: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        mem.prompts.import_file(bad, "default")
    with pytest.raises(InputError, match="unknown prompt file format '.json'"):
        mem.prompts.import_file(tmp_path / "lib.json", "default")
    with pytest.raises(InputError, match="no such file"):
        mem.prompts.import_file(tmp_path / "missing.toml", "default")


def test_exemplars_similar_good_within_namespace_and_budget(mem):
    mem.settings.exemplar_tokens = 120  # the tiny tokenizer counts characters
    mem.store.add_exemplars([
        Exemplar(None, "default", "When did the Larkspur Observatory open?", "In 1897.", 2),
        Exemplar(None, "default", "When did the Larkspur Observatory close?", "It never closed.", 1),
        Exemplar(None, "default", "When did the Larkspur Observatory open to visitors?", "Bad.", 0),  # rated down
        Exemplar(None, "other", "When did the Larkspur Observatory open?", "Other tenant.", 5),
        Exemplar(None, "default", "What colour are herons?", "Grey.", 3),  # not similar
        Exemplar(None, "default", "When did the Larkspur Observatory open? " * 5, "Too long " * 20, 3),
    ])
    a = mem.ask("When did the Larkspur Observatory open?")
    used = [e.answer for e in a.prompt.exemplars]
    assert used[0] == "In 1897." and set(used) <= {"In 1897.", "It never closed."}
    assert "Bad." not in used and "Other tenant." not in used and "Grey." not in used
    assert all(not u.startswith("Too long") for u in used)
    d = a.as_dict()
    assert d["exemplars"][0]["question"] == "When did the Larkspur Observatory open?" and d["id"] == a.id
    assert mem.ask("When did the Larkspur Observatory open?", exemplars=False).prompt.exemplars == []
    assert [e.answer for e in mem.ask("When did the Larkspur Observatory open?",
                                      namespace="other").prompt.exemplars] == ["Other tenant."]


def test_exemplars_become_few_shot_turns_in_the_prompt(mem, tiny_generator, monkeypatch):
    mem.store.add_exemplars([Exemplar(None, "default", "Where do herons nest?", "In tall trees.", 1)])
    seen = []
    real = tiny_generator.chat_ids
    monkeypatch.setattr(tiny_generator, "chat_ids", lambda msgs: seen.append(msgs) or real(msgs))
    mem.ask("Where do herons nest?")
    assert seen[-1][1:3] == [{"role": "user", "content": "Where do herons nest?"},
                             {"role": "assistant", "content": "In tall trees."}]


def test_feedback_good_bad_and_correction(mem):
    mem.learn(text="The observatory opened in 1897.")
    a = mem.ask("When did the observatory open?")
    assert mem.store.logged_answer(a.id).question == "When did the observatory open?"
    good = mem.feedback(a.id, good=True)
    assert good["feedback"] == "good" and len(good["exemplar_ids"]) == 1
    (ex,) = mem.store.exemplars()
    assert (ex.question, ex.answer, ex.rating, ex.source, ex.answer_id) == (a.question, a.text, 1, "feedback", a.id)
    assert mem.feedback(a.id, good=True)["exemplar_ids"] == [ex.id]  # again: one more point, no new exemplar
    assert mem.store.exemplars()[0].rating == 2

    b = mem.ask("When did the observatory open?")
    assert [e.id for e in b.prompt.exemplars] == [ex.id]
    mem.feedback(b.id, bad=True)  # the exemplar it used loses a point
    assert mem.store.exemplars()[0].rating == 1

    c = mem.ask("When did the observatory open?")
    result = mem.feedback(c.id, correction="It opened in 1897, on a Tuesday.")
    assert result["memory_ids"] and result["feedback"] == "correct"
    learned = mem.store.get(result["memory_ids"])[result["memory_ids"][0]]
    assert "Tuesday" in learned.text and learned.namespace == "default"
    good_ones = {e.answer: e.rating for e in mem.store.exemplars(min_rating=1)}
    assert good_ones == {"It opened in 1897, on a Tuesday.": 2}  # the used exemplar fell to 0
    assert mem.store.logged_answer(c.id).feedback == "correct"
    assert any("Tuesday" in h.memory.text for h in mem.search("observatory Tuesday"))


def test_feedback_bad_input(mem):
    a = mem.ask("hello there")
    with pytest.raises(InputError, match="unknown answer id 999"):
        mem.feedback(999, good=True)
    with pytest.raises(InputError, match="exactly one"):
        mem.feedback(a.id, good=True, bad=True)
    with pytest.raises(InputError, match="correction is empty"):
        mem.feedback(a.id, correction="  ")
    with pytest.raises(InputError, match="unknown answer id .* in namespace 'bob'"):
        mem.feedback(a.id, good=True, namespace="bob")  # another tenant cannot rate it
    assert mem.store.exemplars() == []


def test_store_exemplars_api_for_consolidation(mem):
    mem.store.add_exemplars([Exemplar(None, "a", "q1", "a1", 2), Exemplar(None, "b", "q2", "a2", 1),
                             Exemplar(None, "a", "q3", "a3", 0)])
    assert [e.question for e in mem.store.exemplars(min_rating=1)] == ["q1", "q2"]
    assert [e.question for e in mem.store.exemplars("a")] == ["q1", "q3"]
    assert [e.question for e in mem.store.exemplars("a", min_rating=1)] == ["q1"]


def test_chat_retrieves_for_the_conversation_not_only_the_last_turn(mem):
    mem.learn(text="The Larkspur Observatory opened in 1897 on Merrow Hill.")
    mem.learn(text="Tuesday is bin day; the recycling goes out first.")
    for i in range(6):
        mem.learn(text=f"Unrelated note number {i} about gardening and tomatoes.")
    messages = [{"role": "user", "content": "Tell me about the Larkspur Observatory."},
                {"role": "assistant", "content": "It is an observatory."},
                {"role": "user", "content": "Which year was that?"}]  # no word of the memory's
    only_last = mem.search("Which year was that?", k=1)
    assert "Larkspur" not in only_last[0].memory.text if only_last else True
    answer = mem.chat(messages, k=1).result()
    assert "Larkspur" in answer.sources[0].memory.text
    assert answer.id is not None and answer.question == "Which year was that?"


def test_chat_streams_logs_the_session_and_resumes(mem):
    stream = mem.chat([{"role": "user", "content": "hello"}], session_id="s1", max_new_tokens=4)
    pieces = list(stream)
    assert pieces and stream.answer.text == "".join(pieces).strip() and stream.answer.session_id == "s1"
    mem.chat([{"role": "user", "content": "again"}], session_id="s1").result()
    mem.chat([{"role": "user", "content": "elsewhere"}], session_id="s2").result()
    history = mem.history("s1")
    assert [m["content"] for m in history if m["role"] == "user"] == ["hello", "again"]
    assert mem.history("s1", namespace="other") == []


def test_chat_remember_stores_statements_in_the_namespace_only(mem):
    a = mem.chat([{"role": "user", "content": "My dog is called Rex. What is my dog called?"}],
                 namespace="alice", remember=True).result()
    assert a.remembered and "Rex" in a.sources[0].memory.text  # stored before answering, so it is used
    assert mem.store.get(a.remembered)[a.remembered[0]].text == "My dog is called Rex."
    assert mem.search("dog called Rex", namespace="alice") and not mem.search("dog called Rex", namespace="bob")
    again = mem.chat([{"role": "user", "content": "My dog is called Rex."}], namespace="alice", remember=True).result()
    assert again.remembered == []  # the same statement adds nothing
    q = mem.chat([{"role": "user", "content": "What is my dog called?"}], namespace="bob", remember=True).result()
    assert q.remembered == [] and q.sources == []
    off = mem.chat([{"role": "user", "content": "My cat is called Tom."}], namespace="alice").result()
    assert off.remembered == [] and not any("Tom" in h.memory.text for h in mem.search("cat Tom", namespace="alice"))


@pytest.mark.parametrize("messages,fragment", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "x"}], "role must be one of"),
    ([{"role": "user", "content": 3}], "content must be a text"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "last message must be"),
])
def test_chat_bad_messages(mem, messages, fragment):
    with pytest.raises(InputError, match=fragment):
        mem.chat(messages)


def test_statements_heuristic():
    from memory_llm.chat import statements

    assert statements("My dog is called Rex. What is his name? Please tell me a joke. Hi there! "
                      "I moved to Lyon in 2021.\nOk") == ["My dog is called Rex.", "I moved to Lyon in 2021."]
    # a greeting before a statement is left out of it, not the statement with it
    assert statements("hey I changed the streaming password to otterbank82") == [
        "I changed the streaming password to otterbank82"]
    assert statements("Hello, how are you?") == [] and statements("no, the code is 5512.") == ["the code is 5512."]


def test_namespaces_isolate_memories_exemplars_answers_and_eval(mem, tmp_path):
    mem.learn(text="The secret word is zebra.", namespace="alice")
    mem.store.add_exemplars([Exemplar(None, "alice", "What is the secret word?", "zebra", 2)])
    a = mem.ask("What is the secret word?", namespace="alice")
    b = mem.ask("What is the secret word?", namespace="bob")
    assert a.sources and a.prompt.exemplars and b.sources == [] and b.prompt.exemplars == []
    assert mem.store.answers("bob")[0].id == b.id and [x.id for x in mem.store.answers("alice")] == [a.id]
    probe = tmp_path / "p.jsonl"
    probe.write_text(json.dumps({"id": "1", "kind": "cloze", "input": "The secret word is", "answers": [["zebra"]]}))
    seen = []
    real = mem.search
    mem.search = lambda q, k=None, namespace="default": seen.append(real(q, k, namespace)) or seen[-1]
    mem.evaluate(probe, "rag", namespace="bob")
    mem.evaluate(probe, "rag", namespace="alice")
    assert seen[0] == [] and "zebra" in seen[1][0].memory.text
    assert mem.forget(everything=True, namespace="bob") == 0 and mem.search("secret word", namespace="alice")


def test_eval_qa_probes_go_through_the_prompt_library(mem, tmp_path, tiny_generator, monkeypatch):
    probe = tmp_path / "p.jsonl"
    probe.write_text(json.dumps({"id": "1", "kind": "qa", "input": "Summarize the main points of the meeting notes",
                                 "answers": [["x"]]}))
    seen = []
    real = tiny_generator.chat_ids
    monkeypatch.setattr(tiny_generator, "chat_ids", lambda msgs: seen.append(msgs) or real(msgs))
    mem.evaluate(probe, "base")
    mem.evaluate(probe, "base", prompt="howto")
    assert seen[0][0]["content"] == mem.prompts.get("summarize").closed_system
    assert seen[1][0]["content"] == mem.prompts.get("howto").closed_system
    with pytest.raises(InputError, match="unknown template"):
        mem.evaluate(probe, "base", prompt="nope")


def test_cancelled_stream_stops_generating_and_is_not_logged(mem):
    stream = mem.ask_stream("hello there", max_new_tokens=200)
    it = iter(stream)
    next(it)
    stream.cancel()
    rest = list(it)
    assert len(rest) < 50 and stream.answer is None and mem.store.answers("default") == []


def test_query_embeds_never_leave_torch_on_one_thread():
    """Concurrent short embeds (server requests) must restore the process-wide thread count."""
    import torch

    from memory_llm.embed import SentenceEmbedder

    class SlowModel:
        def encode(self, texts, **kw):
            time.sleep(0.01)
            return np.zeros((len(texts), 4), dtype=np.float32)

    emb = SentenceEmbedder.__new__(SentenceEmbedder)
    emb.model, emb.dim = SlowModel(), 4
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    try:
        threads = [threading.Thread(target=lambda: [emb.encode(["q"]) for _ in range(5)]) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert torch.get_num_threads() == max(2, before)
    finally:
        torch.set_num_threads(before)


def test_question_is_embedded_once_and_library_vectors_are_stored(mem, fake_embedder):
    mem.learn(text="Herons nest in tall trees.")
    mem.store.add_exemplars([Exemplar(None, "default", "Where do herons nest?", "In trees.", 1)])
    mem.ask("Where do herons nest?")  # embeds the template descriptions and the exemplar once, and stores them
    calls = fake_embedder.calls
    mem.ask("Where do herons sleep?")
    assert fake_embedder.calls == calls + 1  # only the question
    assert all(v is not None for v in mem.store.template_vectors()[1])


@pytest.mark.parametrize("field,value", [("exemplar_k", -1), ("exemplar_tokens", -5),
                                         ("exemplar_min_similarity", 1.5), ("template_min_similarity", -2)])
def test_prompt_settings_are_validated(field, value):
    from memory_llm import Settings

    with pytest.raises(InputError, match=f"setting {field}="):
        Settings(**{field: value})
