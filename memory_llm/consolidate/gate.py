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

from memory_llm.consolidate.recipe import closed_prompt_ids, student_prompt_ids
from memory_llm.consolidate.synth import Item

_WORD = re.compile(r"\w+")


@dataclass
class Floors:
    """What a candidate must reach to be promoted (settings; see design.md)."""

    reliability: float = 0.5
    locality: float = 0.95
    retention: float = 0.9  # of the current adapter's value on the same items
    tolerance: float = 0.02  # allowed drop against the current adapter (locality, generalization)

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


def item_accuracy(generator, items: Sequence[Item], batch_size: int = 8) -> float | None:
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


def locality(generator, prompts: Sequence[str], base_context, tokens: int = 32, strict_tokens: int = 16,
             batch_size: int = 8) -> dict:
    """Teacher-forced agreement with the base model on generic prompts.

    base_context: a context manager under which generator.model behaves as the base (peft's
    disable_adapter()); the current weights are the adapted ones.
    """
    import torch

    prompt_ids = [closed_prompt_ids(generator, p) for p in prompts]
    with base_context():  # the base model's own tokens (decoding and re-tokenizing text would change some)
        base_ids = []
        for i in range(0, len(prompt_ids), batch_size):
            base_ids += generator.generate_batch(prompt_ids[i:i + batch_size], tokens, return_ids=True)
    agree = total = 0
    device = generator.device
    for p, b in zip(prompt_ids, base_ids):
        if not b:
            continue
        with torch.inference_mode():  # the prompt, then the continuation on its cache: as generation runs it (a
            # routed adapter decides on the prompt alone, route.py)
            first = generator.model(input_ids=torch.as_tensor([p], device=device), use_cache=True)
            pred = [int(first.logits[0, -1].argmax())]
            if len(b) > 1:
                rest = generator.model(input_ids=torch.as_tensor([b[:-1]], device=device),
                                       past_key_values=first.past_key_values, use_cache=True)
                pred += rest.logits[0].argmax(-1).tolist()
        agree += sum(int(x == y) for x, y in zip(pred, b))
        total += len(b)
    strict = 0
    for i in range(0, len(prompt_ids), batch_size):
        outs = generator.generate_batch(prompt_ids[i:i + batch_size], strict_tokens, return_ids=True)
        strict += sum(int(o == b[:strict_tokens]) for o, b in zip(outs, base_ids[i:i + batch_size]))
    return {"agreement": agree / total if total else 1.0, "strict": strict / len(prompts) if prompts else 1.0}


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
    if current:
        if current.get("retention") is not None and candidate.get("retention") is not None:
            need(candidate["retention"] >= floors.retention * current["retention"] - 1e-9,
                 f"retention {_f(candidate['retention'])} ≥ {floors.retention} × current {_f(current['retention'])}")
        need(candidate["locality"] >= current["locality"] - floors.tolerance,
             f"locality {_f(candidate['locality'])} not below current {_f(current['locality'])} - {floors.tolerance}")
    return ok, reasons


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"
