"""Batched generation (memory_llm.batching) on the tiny model: concurrent streams share forward passes and each
gets what it would alone (greedy tokens, its own seed, budget and stop), and the server batches concurrent clients."""

import copy
import threading

from memory_llm.generate import Sampling, TransformersGenerator

PROMPTS = [[1, 5, 9, 33, 7], [1, 12], [1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 3, 3]]


def fresh(tiny, batching: bool) -> TransformersGenerator:
    from memory_llm.batching import Batcher

    gen = TransformersGenerator(copy.deepcopy(tiny.model), tiny.tokenizer, tiny.name)
    if batching:
        gen.batcher = Batcher(gen, 8)
    return gen


def run_together(gen, jobs):
    """Each (ids, kwargs) streamed on its own thread, started together: (texts, reports)."""
    import torch

    texts, reports = [None] * len(jobs), [dict() for _ in jobs]
    barrier = threading.Barrier(len(jobs))

    def one(i, ids, kw):
        barrier.wait()
        texts[i] = "".join(gen.stream(torch.tensor([ids]), report=reports[i], **kw))

    threads = [threading.Thread(target=one, args=(i, ids, kw)) for i, (ids, kw) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return texts, reports


def test_concurrent_greedy_streams_share_batches_and_match_lone_generation(tiny_generator):
    import torch

    alone = fresh(tiny_generator, batching=False)
    want = ["".join(alone.stream(torch.tensor([p]), max_new_tokens=12)) for p in PROMPTS]
    gen = fresh(tiny_generator, batching=True)
    texts, reports = run_together(gen, [(p, {"max_new_tokens": 12}) for p in PROMPTS])
    assert texts == want
    assert max(gen.batcher.batch_sizes) > 1  # they did share forward passes
    assert all(r["finish_reason"] in ("stop", "length") and r["completion_tokens"] <= 12 for r in reports)
    assert [r["finish_reason"] for r in reports] == ["length" if r["completion_tokens"] == 12 else "stop"
                                                    for r in reports]


def test_each_row_keeps_its_own_seed_budget_and_stop(tiny_generator):
    gen = fresh(tiny_generator, batching=True)
    seeded = {"max_new_tokens": 10, "sampling": Sampling(1.5, 1.0, 7)}
    alone, _ = run_together(gen, [(PROMPTS[0], seeded)])
    stop = threading.Event()
    stop.set()  # this client left before its answer began
    texts, reports = run_together(gen, [(PROMPTS[0], seeded), (PROMPTS[1], {"max_new_tokens": 3}),
                                        (PROMPTS[2], {"max_new_tokens": 10, "stop": stop}),
                                        (PROMPTS[3], {"max_new_tokens": 10, "sampling": Sampling(1.5, 1.0, 8)})])
    assert texts[0] == alone[0]  # the same seed gives the same sample whatever shares its batch
    assert texts[3] != texts[0] or PROMPTS[3] != PROMPTS[0]
    assert reports[1]["completion_tokens"] <= 3 and texts[2] == ""
    greedy_top_p, _ = run_together(gen, [(PROMPTS[1], {"max_new_tokens": 8, "sampling": Sampling(1.5, 1e-9, 3)})])
    plain, _ = run_together(gen, [(PROMPTS[1], {"max_new_tokens": 8})])
    assert greedy_top_p == plain  # a nucleus of one token is greedy


def test_server_batches_concurrent_clients(mem):
    from fastapi.testclient import TestClient

    from memory_llm.server import create_app

    mem.learn(text="Herons nest in tall trees near the lake.", source="herons")
    body = {"model": "mllm", "max_tokens": 8, "messages": [{"role": "user", "content": "Where do herons nest?"}]}
    with TestClient(create_app(mem)) as client:
        one = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        answers = [None] * 4

        def ask(i):
            answers[i] = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert answers == [one] * 4
        assert max(mem.served.generator.batcher.batch_sizes) > 1
        assert client.get("/health").json()["largest_batch"] == max(mem.served.generator.batcher.batch_sizes)


def test_answers_join_a_running_batch_and_leave_it_when_their_client_goes(tiny_generator):
    import torch

    alone = fresh(tiny_generator, batching=False)
    want = ["".join(alone.stream(torch.tensor([p]), max_new_tokens=30)) for p in PROMPTS[:3]]
    gen = fresh(tiny_generator, batching=True)
    texts, left, first_started = [None] * 3, threading.Event(), threading.Event()

    def one(i, stop=None):
        pieces = []
        for piece in gen.stream(torch.tensor([PROMPTS[i]]), max_new_tokens=30, stop=stop):
            pieces.append(piece)
            first_started.set()
            if stop is not None and len(pieces) == 2:
                stop.set()  # this client goes after two pieces
                left.set()
        texts[i] = "".join(pieces)

    threads = [threading.Thread(target=one, args=(0,))]
    threads[0].start()
    assert first_started.wait(30)  # the first answer is decoding before the others arrive
    threads += [threading.Thread(target=one, args=(1, threading.Event())), threading.Thread(target=one, args=(2,))]
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(60)
    assert texts[0] == want[0] and texts[2] == want[2]  # joining or being joined changes no greedy token
    assert left.is_set() and len(texts[1]) < len(want[1])
    assert gen.batcher.joined_running >= 2 and max(gen.batcher.step_rows) == 3
    assert list(gen.batcher.step_rows)[-1] == 1  # the rows that ended (or whose client left) were freed


def test_each_row_keeps_its_adapter_gate_when_rows_join_and_leave(tiny_generator):
    """A routed adapter acts on some rows and not others; rows joining a running batch keep their own gates."""
    import torch
    from peft import LoraConfig, get_peft_model

    from memory_llm.adapters.routing import Router, row_gates, set_row_gates

    class ByToken(Router):  # scores a prompt by its second token (left padding skipped): 12 or above routes on
        def score_rows(self, input_ids, attention_mask=None):
            pads = [0] * len(input_ids) if attention_mask is None else (attention_mask == 0).sum(-1).tolist()
            self.last_chat = [False] * len(input_ids)
            return [float(row[p + 1]) for row, p in zip(input_ids.tolist(), pads)]

    model = get_peft_model(copy.deepcopy(tiny_generator.model), LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "v_proj", "down_proj"], lora_dropout=0.0)).eval()
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # an adapter that changes the answers
    router = ByToken(model, threshold=12.0).install()
    prompts = [PROMPTS[2], PROMPTS[1], PROMPTS[0]]  # on (40), on (12), off (5)
    lone = TransformersGenerator(model, tiny_generator.tokenizer, "tiny")
    want = ["".join(lone.stream(torch.tensor([p]), max_new_tokens=16)) for p in prompts]
    with model.disable_adapter():
        base = "".join(lone.stream(torch.tensor([prompts[2]]), max_new_tokens=16))
        adapted_off = "".join(lone.stream(torch.tensor([prompts[0]]), max_new_tokens=16))
    assert want[2] == base and want[0] != adapted_off  # the gate decides: the adapter changes routed answers
    from memory_llm.batching import Batcher

    gen = TransformersGenerator(model, tiny_generator.tokenizer, "tiny")
    gen.batcher = Batcher(gen, 8)
    gen.row_gates = lambda n: row_gates(router, n)
    gen.set_row_gates = lambda rows: set_row_gates(router, rows, "cpu")
    texts, started = [None] * 3, threading.Event()

    def one(i):
        pieces = []
        for piece in gen.stream(torch.tensor([prompts[i]]), max_new_tokens=16 if i else 40):
            pieces.append(piece)
            started.set()
        texts[i] = "".join(pieces)

    first = threading.Thread(target=one, args=(0,))
    first.start()
    assert started.wait(30)
    others = [threading.Thread(target=one, args=(i,)) for i in (1, 2)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(60)
    assert texts[0].startswith(want[0]) and texts[1:] == want[1:]
    assert gen.batcher.joined_running >= 1
