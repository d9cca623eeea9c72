"""The default embedder on plain transformers (embed.PlainEmbedder) gives sentence-transformers' vectors: the cold
`ask` skips importing sentence-transformers without changing a single search result."""

import numpy as np
import pytest

from memory_llm.config import DEFAULT_EMBEDDER
from memory_llm.embed import PlainEmbedder, SentenceEmbedder, load
from memory_llm.models import resolve_embedder

pytestmark = pytest.mark.e2e

TEXTS = ["When did the Larkspur Observatory open?", "Herons nest in tall trees near the lake.", "x",
         "A long text " * 200, "Ünïcödé and emoji 🙂 survive", "", "Short.", "Another question about the ferry?"]


def test_plain_embedder_equals_sentence_transformers(real_models):
    st = real_models[0]
    plain = load(DEFAULT_EMBEDDER)
    assert isinstance(plain, PlainEmbedder) and plain.dim == st.dim == 384 and plain.max_tokens == st.max_tokens
    for texts in (TEXTS[:3], TEXTS):  # the few-texts path and the batched one
        a, b = plain.encode(texts), st.encode(texts)
        assert a.dtype == np.float32 and a.shape == b.shape
        assert np.min(np.sum(a * b, axis=1)) > 0.999999, np.sum(a * b, axis=1)
    assert plain.count_tokens(TEXTS[1]) == st.count_tokens(TEXTS[1])


def test_other_pipelines_stay_on_sentence_transformers(tmp_path):
    import json
    import shutil

    other = tmp_path / "cls-model"
    shutil.copytree(resolve_embedder(DEFAULT_EMBEDDER), other)
    (other / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 384,
                                                                "pooling_mode_cls_token": True}))
    assert not PlainEmbedder.fits(other) and PlainEmbedder.fits(type(other)(resolve_embedder(DEFAULT_EMBEDDER)))
    assert isinstance(load(str(other)), SentenceEmbedder) and not isinstance(load(str(other)), PlainEmbedder)


def test_numpy_query_embedder_equals_the_transformers_one():
    """A one-shot ask embeds its question in numpy (embed_numpy.QueryEmbedder): the same vectors and token counts,
    and more than a few texts go to the transformers embedder."""
    from memory_llm.embed_numpy import QueryEmbedder

    plain = load(DEFAULT_EMBEDDER)
    quick = load(DEFAULT_EMBEDDER, quick=True)
    assert isinstance(quick, QueryEmbedder) and quick.dim == plain.dim and not quick.full_loaded
    for i in range(0, len(TEXTS), 4):  # a long text is truncated as transformers truncates it
        a, b = quick.encode(TEXTS[i:i + 4]), plain.encode(TEXTS[i:i + 4])
        assert a.dtype == np.float32 and a.shape == b.shape
        assert np.min(np.sum(a * b, axis=1)) > 0.99999, np.sum(a * b, axis=1)
    assert not quick.full_loaded  # no torch model was loaded for those
    assert [quick.count_tokens(t) for t in TEXTS] == [plain.count_tokens(t) for t in TEXTS]
    many = quick.encode(TEXTS)
    assert quick.full_loaded and np.min(np.sum(many * plain.encode(TEXTS), axis=1)) > 0.999999


def test_bf16_batches_stay_within_a_hair_of_float32():
    """embed_precision bfloat16 (auto's choice on a CPU that multiplies bf16 natively) changes learning's vectors
    by a cosine of at most 1e-4; questions (a few texts) stay float32, identical."""
    full, half = load(DEFAULT_EMBEDDER), load(DEFAULT_EMBEDDER, precision="bfloat16")
    assert half.bf16 and not full.bf16
    a, b = full.encode(TEXTS), half.encode(TEXTS)
    assert np.min(np.sum(a * b, axis=1)) > 0.9999, np.sum(a * b, axis=1)
    assert np.array_equal(full.encode(TEXTS[:2]), half.encode(TEXTS[:2]))
