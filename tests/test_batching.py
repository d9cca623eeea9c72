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
