"""Evaluate a candidate adapter and decide whether to promote it.

reliability: closed-book accuracy on trained items; generalization: on held-out (paraphrased) items;
locality: teacher-forced agreement with the base model's greedy continuation on held-out generic prompts;
retention: accuracy on earlier rounds' trained items (those this round does not replay), relative to the current
adapter.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Sequence

from memory_llm.consolidate.examples import closed_prompt_ids, student_prompt_ids
from memory_llm.consolidate.synth import Item
from memory_llm.generate import cache_kwargs, output_cache

_WORD = re.compile(r"\w+")
GENERATE_BATCH = 32  # rows a batched generation of short closed-book prompts runs at once: a decode step costs
# about the same for 8 or 32 rows on a CPU (weights are read once a step); 32 prompts of ~40 tokens took 8.1 s
# against 16-19 s in batches of 8 on 2 cores (BENCHMARKS.md)


@dataclass
class Floors:
    """What a candidate must reach to be promoted (settings; docs/eval-format.md, "Metrics built on probes")."""

    reliability: float = 0.5
    locality: float = 0.95
    retention: float = 0.9  # of the current adapter's value on the same items
    tolerance: float = 0.02  # allowed drop against the current adapter (locality, generalization)
    stale_answers: int = 0  # questions about what went stale the candidate may answer with an old value

    def as_dict(self) -> dict:
        return asdict(self)


def item_correct(item: Item, output: str) -> bool:
    """cloze: the continuation starts with the answer's first words (up to 3, punctuation ignored);
    qa: at least half of the teacher answer's content words (4+ letters, max 8) appear in the output."""
    out = [w.lower() for w in _WORD.findall(output)]
    ans = [w.lower() for w in _WORD.findall(item.answer)]
    if not ans:
        return False
    if item.kind == "cloze":
        need = ans[:3]
        return out[:len(need)] == need
    content = [w for w in dict.fromkeys(ans) if len(w) >= 4][:8] or ans[:3]
    return sum(w in out for w in content) >= max(1, len(content) / 2)


def item_accuracy(generator, items: Sequence[Item], batch_size: int = GENERATE_BATCH) -> float | None:
    """Closed-book (no context) greedy accuracy of the generator's current weights on items."""
    if not items:
        return None
    correct = 0
    for kind, new in (("cloze", 10), ("qa", 48)):  # batched by kind: a cloze answer needs few tokens
        same = [it for it in items if it.kind == kind]
        for i in range(0, len(same), batch_size):
            batch = same[i:i + batch_size]
            outs = generator.generate_batch([student_prompt_ids(generator, it) for it in batch], new)
            correct += sum(item_correct(it, o) for it, o in zip(batch, outs))
    return correct / len(items)


def base_continuations(generator, prompts: Sequence[str], base_context, tokens: int = 32,
                       batch_size: int = GENERATE_BATCH) -> list[list[int]]:
    """The base model's greedy continuations of the prompts (as `ask` puts them without retrieval), as token ids:
    its own tokens (decoding and re-tokenizing text would change some). base_context: see `locality`."""
    prompt_ids = [closed_prompt_ids(generator, p) for p in prompts]
    with base_context():
        return [ids for i in range(0, len(prompt_ids), batch_size)
                for ids in generator.generate_batch(prompt_ids[i:i + batch_size], tokens, return_ids=True)]


def locality(generator, prompts: Sequence[str], base_context=None, tokens: int = 32, strict_tokens: int = 16,
             batch_size: int = 8, base_ids: list[list[int]] | None = None) -> dict:
    """Teacher-forced agreement with the base model on generic prompts, and the strict share: prompts whose
    first `strict_tokens` greedy tokens are the base model's (all of them predicted under teacher forcing, the
    end of sequence included where the base stops sooner: the same thing as identical greedy outputs).

    base_context: a context manager under which generator.model behaves as the base (peft's
    disable_adapter()); the current weights are the adapted ones. base_ids: the base continuations, when
    already made (`base_continuations`; one set serves every adapter compared on the same prompts).
    """
    prompt_ids = [closed_prompt_ids(generator, p) for p in prompts]
    if base_ids is None:
        base_ids = base_continuations(generator, prompts, base_context, tokens)
    stop = {generator.tokenizer.eos_token_id, generator.tokenizer.pad_token_id}
    agree = total = strict = 0
    for i in range(0, len(prompt_ids), batch_size):
        conts = base_ids[i:i + batch_size]
        preds = _forced_greedy(generator, prompt_ids[i:i + batch_size], conts)
        for pred, b in zip(preds, conts):
            agree += sum(int(x == y) for x, y in zip(pred, b))
            total += len(b)
            n = min(len(b), strict_tokens)
            strict += int(pred[:n] == b[:n] and (n == strict_tokens or pred[n] in stop))
    return {"agreement": agree / total if total else 1.0, "strict": strict / len(prompts) if prompts else 1.0}


def _forced_greedy(generator, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[int]]:
    """The model's greedy prediction at every position of each continuation, teacher-forced, plus the one after
    it: the prompts first (left-padded, as generation runs them: a routed adapter decides on the prompt), then
    the continuations on their cache."""
    import torch

    n, width, cont_width = len(prompts), max(len(p) for p in prompts), max(len(c) for c in continuations)
    ids = torch.full((n, width + cont_width), generator.tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (p, c) in enumerate(zip(prompts, continuations)):
        ids[r, width - len(p):width + len(c)] = torch.as_tensor(p + c, dtype=torch.long)
        mask[r, width - len(p):width + len(c)] = 1
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    device = generator.device
    with torch.inference_mode():
        first = generator.model(input_ids=ids[:, :width].to(device), attention_mask=mask[:, :width].to(device),
                                position_ids=position[:, :width].to(device), use_cache=True)
        preds = first.logits[:, -1].argmax(-1).unsqueeze(1)
        if cont_width:
            rest = generator.model(input_ids=ids[:, width:].to(device), attention_mask=mask.to(device),
                                   position_ids=position[:, width:].to(device), use_cache=True,
                                   **cache_kwargs(generator.model, output_cache(first)))
            preds = torch.cat([preds, rest.logits.argmax(-1)], dim=1)
    return [row[:len(c) + 1] for row, c in zip(preds.tolist(), continuations)]


def decide(candidate: dict, current: dict | None, floors: Floors) -> tuple[bool, list[str]]:
    """Promote or not, and why (one reason per failed rule, or the passed rules)."""
    reasons, ok = [], True

    def need(cond: bool, text: str) -> None:
        nonlocal ok
        ok = ok and cond
        reasons.append(("ok: " if cond else "failed: ") + text)

    need(candidate["reliability"] is not None and candidate["reliability"] >= floors.reliability,
         f"reliability {_f(candidate['reliability'])} ≥ floor {floors.reliability}")
    need(candidate["locality"] >= floors.locality, f"locality {_f(candidate['locality'])} ≥ floor {floors.locality}")
    if candidate.get("stale_answers") is not None:
        need(candidate["stale_answers"] <= floors.stale_answers,
             f"old values answered {candidate['stale_answers']} of {candidate.get('stale_probes')} questions about"
             f" what went stale ≤ {floors.stale_answers}")
    if current:
        if current.get("retention") is not None and candidate.get("retention") is not None:
            need(candidate["retention"] >= floors.retention * current["retention"] - 1e-9,
                 f"retention {_f(candidate['retention'])} ≥ {floors.retention} × current {_f(current['retention'])}")
        need(candidate["locality"] >= current["locality"] - floors.tolerance,
             f"locality {_f(candidate['locality'])} not below current {_f(current['locality'])} - {floors.tolerance}")
    return ok, reasons


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"
