"""Canary for API drift in transformers and peft: the places where memory_llm reaches into a model's forward
(cached generation under a routed adapter, the teacher's shared-prefix cache, the gate's batched locality pass)
checked on a tiny model against definitions that do not use those mechanisms. transformers 5.24 renamed the
cache keyword (`past_key_values` → `cache`): routed adapters then acted on the prefill only, and the fast suite
did not notice. `make test-latest` runs these (with the rest of the fast suite) on the newest releases."""

import logging
import warnings

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from memory_llm.consolidate.examples import closed_prompt_ids
from memory_llm.consolidate.recipe import Recipe
from memory_llm.consolidate.train import attach_lora
from memory_llm.adapters.routing import Router, common_prefix
from memory_llm.adapters.stack import RouterStack
from memory_llm.generate import TransformersGenerator

QUESTIONS = ["Name a colour.", "What is two plus two?", "Say hello.", "Describe rain in a sentence.", "Hi",
             "Count to three, please.", "Why is the sky blue?", "Tell me a word.", "Spell cat.", "Go on."]


@pytest.fixture(autouse=True)
def no_deprecation_notices():
    """The calls under test get no deprecation notice from the libraries (a renamed keyword warns a release or
    more before it breaks): neither a Python warning nor a transformers log line saying "deprecated"."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    hf = logging.getLogger("transformers")
    handler, level = Keep(logging.WARNING), hf.level
    clear = getattr(getattr(hf, "warning_once", None), "cache_clear", None)  # transformers logs some notices once
    if clear:
        clear()
    hf.addHandler(handler)
    hf.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        hf.removeHandler(handler)
        hf.setLevel(level)
    notices = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))
               and _from_library(w.filename)]
    notices += [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()]
    assert not [n for n in notices if not any(known in n for known in NOT_OURS)], notices


# Notices that the libraries give each other, not our calls (each with the release where it was seen).
NOT_OURS = {
    "`is_gradient_checkpointing` is deprecated": "peft 0.21.2 reads it on transformers 5.24 (PeftModel.__init__)",
}


def _from_library(filename: str) -> bool:
    return any(part in filename for part in ("/transformers/", "/peft/", "/memory_llm/"))


def _two_adapters():
    """A tiny generator with two random LoRA adapters, "default" and "b", both active."""
    tok = tiny_tokenizer()
    gen = TransformersGenerator(tiny_model(tok), tok, "tiny-llama")
    model = attach_lora(gen.model, Recipe(rank=4, alpha=8))
    model.add_adapter("b", model.peft_config["default"])
    model.base_model.set_adapter(["default", "b"], inference_mode=True)
    torch.manual_seed(1)  # drawn so that both adapters' greedy outputs are long and unlike the base's
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    gen.model = model.eval()
    return gen, model


def _only(model, name):
    """A context under which only adapter `name` acts (the others' layers skipped)."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        model.base_model.set_adapter([name], inference_mode=True)
        try:
            yield
        finally:
            model.base_model.set_adapter(["default", "b"], inference_mode=True)
    return ctx()


def _acting_rows(model, routers, names):
    """For each router (of adapter names[k]), per forward of the model, which batch rows its adapter changed (its
    gated LoRA output in the last layer is non-zero), recorded after the gate; forwards nested in another (the
    routers' scoring) are not counted. Returns (one list per router, a function that removes the hooks)."""
    inner, depth = model.get_base_model(), [0]
    seen: list[list[list[bool]]] = [[] for _ in routers]

    def record(k):
        def hook(mod, args, out):
            if depth[0] == 1:
                seen[k].append([bool(row.abs().sum() > 0) for row in out])
        return hook

    def enter(mod, args, kwargs):
        depth[0] += 1

    def leave(mod, args, kwargs, out):
        depth[0] -= 1

    handles = [inner.register_forward_pre_hook(enter, with_kwargs=True, prepend=True),
               inner.register_forward_hook(leave, with_kwargs=True, always_call=True)]
    handles += [r.layers[-1].lora_B[name].register_forward_hook(record(k))
                for k, (r, name) in enumerate(zip(routers, names))]
    return seen, lambda: [h.remove() for h in handles]


def test_a_routed_adapter_acts_on_every_decoding_step_of_its_rows_and_on_no_other():
    gen, model = _two_adapters()
    model.base_model.set_adapter(["default"], inference_mode=True)
    prompts = [closed_prompt_ids(gen, q) for q in QUESTIONS[:4]]
    router = Router(model, head=common_prefix(prompts))
    scores = router.scores(prompts)
    order = sorted(range(len(prompts)), key=scores.__getitem__)
    router.threshold = (scores[order[1]] + scores[order[2]]) / 2  # the two highest-scoring prompts route on
    want = [scores[i] >= router.threshold for i in range(len(prompts))]
    assert sum(want) == 2
    with model.disable_adapter():
        base = [gen.generate_batch([p], 8, return_ids=True)[0] for p in prompts]
    adapted = [gen.generate_batch([p], 8, return_ids=True)[0] for p in prompts]
    assert all(a != b for a, b in zip(adapted, base))  # the adapter changes every prompt's greedy output

    router.install()
    (seen,), unhook = _acting_rows(model, [router], ["default"])
    try:
        routed = gen.generate_batch(prompts, 8, return_ids=True)
    finally:
        unhook()
        router.remove()
    assert len(seen) == max(len(r) for r in routed)  # the prefill and its decoding steps (one forward each)
    assert all(step == want for step in seen), seen
    assert routed == [a if on else b for a, b, on in zip(adapted, base, want)]


def test_stacked_adapters_each_act_on_every_decoding_step_of_the_rows_that_chose_them():
    gen, model = _two_adapters()
    prompts = [closed_prompt_ids(gen, q) for q in QUESTIONS[:4]]
    routers = [Router(model, threshold=0.0, head=common_prefix(prompts), name=n) for n in ("default", "b")]
    a_rows = [True, False, False, True]  # which prompts hold "default"'s key (the others hold "b"'s)
    holds_a = {tuple(p[len(routers[0].head):]): a for p, a in zip(prompts, a_rows)}  # a prompt's own tokens

    def embed(rows, head=()):
        return [[1.0, 0.0] if holds_a.get(tuple(r)) else [0.0, 1.0] for r in rows]

    stack = RouterStack(routers, keys=[[[1.0, 0.0]], [[0.0, 1.0]]], embed=embed).install()
    (seen_a, seen_b), unhook = _acting_rows(model, routers, ["default", "b"])
    try:
        routed = gen.generate_batch(prompts, 8, return_ids=True)
    finally:
        unhook()
        stack.remove()
    assert len(seen_a) == len(seen_b) == max(len(r) for r in routed)
    assert all(step == a_rows for step in seen_a), seen_a
    assert all(step == [not a for a in a_rows] for step in seen_b), seen_b
    alone = []
    for p, a in zip(prompts, a_rows):
        with _only(model, "default" if a else "b"):
            alone.append(gen.generate_batch([p], 8, return_ids=True)[0])
    assert routed == alone


def test_teacher_targets_run_a_shared_chunk_once_and_match_the_full_forward(tiny_generator):
    from memory_llm.consolidate.examples import top_k_targets

    chunk = [5, 9, 12, 7, 3, 22, 14]
    seqs = [chunk + [4, 8, 15, 16], chunk + [4, 30, 31], chunk + [40, 41, 42, 43, 44], [6, 9, 12, 7, 50, 51]]
    spans = [(9, 11), (8, 10), (7, 12), (3, 6)]
    groups = ["a", "a", "a", "b"]
    forwards = []
    hook = tiny_generator.model.register_forward_pre_hook(lambda mod, args, kw: forwards.append(kw["input_ids"].shape),
                                                          with_kwargs=True)
    try:
        shared = top_k_targets(tiny_generator.model, seqs, spans, k=5, temperature=2.0, groups=groups)
    finally:
        hook.remove()
    plain = top_k_targets(tiny_generator.model, seqs, spans, k=5, temperature=2.0)
    assert (1, 7) in forwards and (3, 5) in forwards  # the chunk once, then the three items' own tokens
    for (js, ps), (jp, pp) in zip(shared, plain):
        assert torch.equal(js, jp) and torch.allclose(ps, pp, atol=1e-4)


def test_batched_locality_matches_its_definitions_one_prompt_at_a_time():
    """agreement: the candidate's teacher-forced greedy tokens on the base's continuation, one prompt at a time;
    strict: the first tokens of the candidate's own greedy output are the base's."""
    from memory_llm.consolidate.gate import base_continuations, locality

    tok = tiny_tokenizer()
    gen = TransformersGenerator(tiny_model(tok), tok, "tiny-llama")
    model = attach_lora(gen.model, Recipe(rank=4, alpha=8))
    gen.model = model
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)  # strict 0.5, agreement 0.81 from the recipe-seeded start
    got = locality(gen, QUESTIONS, model.disable_adapter, tokens=12, strict_tokens=6, batch_size=4)
    assert got == _locality_one_at_a_time(gen, model, QUESTIONS, [True] * len(QUESTIONS))
    base = base_continuations(gen, QUESTIONS, model.disable_adapter, tokens=12)  # made once, for several adapters
    assert locality(gen, QUESTIONS, strict_tokens=6, batch_size=4, base_ids=base) == got
    assert 0 < got["strict"] < 1 and 0 < got["agreement"] < 1  # the perturbation tells the two apart somewhere


def test_batched_locality_under_a_router_decides_each_prompt_on_the_prompt():
    """With a routed adapter, the batched pass gives each prompt the adapter exactly when the router, shown the
    prompt alone, switches it on: the same figures as forcing that choice one prompt at a time."""
    from memory_llm.consolidate.gate import locality

    gen, model = _two_adapters()
    model.base_model.set_adapter(["default"], inference_mode=True)
    prompts = [closed_prompt_ids(gen, q) for q in QUESTIONS]
    router = Router(model, head=common_prefix(prompts))
    scores = router.scores(prompts)
    router.threshold = sorted(scores)[len(scores) // 2]
    on = [s >= router.threshold for s in scores]
    assert 0 < sum(on) < len(on)
    router.install()
    try:
        got = locality(gen, QUESTIONS, model.disable_adapter, tokens=12, strict_tokens=6, batch_size=4)
    finally:
        router.remove()
    assert got == _locality_one_at_a_time(gen, model, QUESTIONS, on)
    assert got["strict"] < 1 and got["agreement"] < 1


def _locality_one_at_a_time(gen, model, questions, on):
    """Locality by its definition, one prompt at a time, the adapter on for prompt i exactly when on[i]."""
    import contextlib

    agree = total = strict = 0
    for text, acts in zip(questions, on):
        p = closed_prompt_ids(gen, text)
        with model.disable_adapter():
            b = gen.generate_batch([p], 12, return_ids=True)[0]
        with contextlib.nullcontext() if acts else model.disable_adapter():
            out = gen.generate_batch([p], 6, return_ids=True)[0]
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([p + b])).logits[0, len(p) - 1:len(p) + len(b) - 1]
        strict += int(out == b[:6])
        agree += sum(int(x == y) for x, y in zip(logits.argmax(-1).tolist(), b))
        total += len(b)
    return {"agreement": agree / total, "strict": strict / len(questions)}
