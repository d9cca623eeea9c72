
from hypothesis import given, settings
from hypothesis import strategies as st

from memory_llm.ingest.chunker import chunk_text, content_hash, split_sentences


def words(text):
    return len(text.split())


def test_sentences_split_on_punctuation_and_blank_lines():
    assert split_sentences("One. Two! Three?\n\nFour") == ["One.", "Two!", "Three?", "Four"]


def test_chunks_respect_budget_and_overlap():
    text = " ".join(f"Sentence number {i} has five words." for i in range(40))  # 6 tokens each
    chunks = chunk_text([text], words, max_tokens=30, overlap=12)
    assert len(chunks) > 5
    assert all(words(c.text) <= 30 for c in chunks)
    assert [c.position for c in chunks] == list(range(len(chunks)))
    for a, b in zip(chunks, chunks[1:]):  # the next chunk starts with the tail of the previous one
        first = b.text.split(".")[0] + "."
        assert first in a.text


def test_long_sentence_is_split_on_words():
    text = " ".join(f"w{i}" for i in range(100))
    chunks = chunk_text([text], words, max_tokens=30, overlap=0)
    assert [words(c.text) for c in chunks] == [30, 30, 30, 10]


def test_chunks_never_span_sections():
    chunks = chunk_text(["Alpha one.", "Beta two."], words, max_tokens=100, overlap=10)
    assert [c.text for c in chunks] == ["Alpha one.", "Beta two."]


def test_content_hash_folds_space_not_case():
    assert content_hash("Hello   World") == content_hash("Hello World")
    assert content_hash("Tulip9") != content_hash("tulip9")  # another password
    assert content_hash("hello world") != content_hash("hello there")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="abc .!?\n", min_size=0, max_size=60), min_size=1, max_size=4),
       st.integers(2, 40), st.integers(0, 20))
def test_every_word_survives_in_order(sections, max_tokens, overlap):
    overlap = min(overlap, max_tokens - 1)
    chunks = chunk_text(sections, words, max_tokens=max_tokens, overlap=overlap)
    assert all(words(c.text) <= max_tokens for c in chunks)
    expected = [w for s in sections for w in s.split()]
    got = " ".join(c.text for c in chunks).split()
    it = iter(got)  # expected is a subsequence of got (overlap only repeats)
    assert all(any(w == g for g in it) for w in expected)
