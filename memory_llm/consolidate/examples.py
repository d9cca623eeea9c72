"""Training examples: the prompts the student and the teacher see (`ask`'s own closed-book prompt for qa items),
and the teacher's top-k next-token targets, computed once with the memory in context."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from memory_llm.adapters.routing import common_prefix
from memory_llm.generate import cache_kwargs, output_cache
from memory_llm.store.records import Item

if TYPE_CHECKING:
    from memory_llm.consolidate.recipe import Recipe


@dataclass
class Example:
    """One training sequence: ids, the positions whose next token is supervised, and the teacher's top-k."""

    ids: list[int]
    positions: list[int]  # index i: logits at i predict ids[i + 1]
    top_idx: object  # LongTensor (len(positions), k)
    top_p: object  # FloatTensor (len(positions), k), teacher probabilities at the temperature
    kind: str  # "item" | "locality"


def closed_prompt_ids(generator, question: str) -> list[int]:
    """The prompt `ask` builds for a question without retrieval (the closed-book system prompt): the form the
    adapter is trained, routed and measured on, so it is the form it serves."""
    from memory_llm.generate import build_messages

    return generator.chat_ids(build_messages(question))[0].tolist()


def student_prompt_ids(generator, item: Item) -> list[int]:
    """What the student sees: the bare prompt (cloze: raw text; qa: the question as `ask` closed-book puts it)."""
    if item.kind == "qa":
        return closed_prompt_ids(generator, item.prompt)
    return generator.tokenizer(item.prompt, add_special_tokens=False)["input_ids"]


def teacher_prompt_ids(generator, item: Item, context: str) -> list[int]:
    """What the teacher sees: the same prompt with the memory chunk in context."""
    from memory_llm.generate import build_messages

    if item.kind == "qa":
        return generator.chat_ids(build_messages(item.prompt, [context]))[0].tolist()
    return generator.tokenizer(context + "\n\n" + item.prompt, add_special_tokens=False)["input_ids"]


def answer_ids(generator, item: Item) -> list[int]:
    tok = generator.tokenizer
    ids = tok(" " + item.answer if item.kind == "cloze" else item.answer, add_special_tokens=False)["input_ids"]
    if item.kind == "qa" and tok.eos_token_id is not None:
        end = tok.convert_tokens_to_ids("<|im_end|>")
        ids = ids + [end if isinstance(end, int) and end != tok.unk_token_id else tok.eos_token_id]
    return ids


def right_pad(sequences: list[list[int]]):
    """Right-padded ids and attention mask for token sequences."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, s in enumerate(sequences):
        ids[r, :len(s)] = torch.as_tensor(s)
        mask[r, :len(s)] = 1
    return ids, mask


def position_logits(model, sequences: list[list[int]], positions: list[list[int]], prefix: Sequence[int] = ()) -> list:
    """Logits at the given positions of each sequence, one forward for the batch. The vocabulary projection
    runs only at those positions (transformers' boolean `logits_to_keep`), not at every token: most of a
    training sequence is prompt, and the projection onto a 49k vocabulary is a large share of the work.

    prefix: tokens that come before every sequence (positions count from the sequence's start, after it); they
    run once, and their cache serves every row (the teacher's memory chunk is shared by all of its items)."""
    import torch

    # the mask yields positions in ascending order per row; callers pass ascending ranges, so a split suffices
    assert all(p == sorted(set(p)) for p in positions), "positions must be ascending and distinct"
    ids, mask = right_pad(sequences)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for r, pos in enumerate(positions):
        keep[r, pos] = True
    device = next(model.parameters()).device
    cached = {}
    if len(prefix):
        past = output_cache(model(input_ids=torch.as_tensor([list(prefix)], device=device), use_cache=True))
        past.batch_repeat_interleave(len(sequences))
        mask = torch.cat([torch.ones((len(sequences), len(prefix)), dtype=mask.dtype), mask], dim=1)
        cached = {**cache_kwargs(model, past), "use_cache": True}
    flat = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep.to(device),
                 **cached).logits
    flat = flat.reshape(-1, flat.shape[-1])  # rows in order, positions ascending within a row
    return list(torch.split(flat, [len(p) for p in positions]))


def top_k_targets(model, sequences: list[list[int]], spans: list[tuple[int, int]], k: int, temperature: float,
                   batch_size: int = 8, groups: Sequence | None = None):
    """Teacher top-k probabilities at the positions span=(start, end) of each sequence.

    groups: a key per sequence; sequences of one key are batched together and the tokens they share ahead of
    every span (the memory chunk in context) run once per batch. None: batches by length."""
    import torch

    if groups is None:
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        batches = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    else:
        by_key: dict = {}
        for i, key in enumerate(groups):
            by_key.setdefault(key, []).append(i)
        batches = [idx[b:b + batch_size] for idx in by_key.values() for b in range(0, len(idx), batch_size)]
    results: dict[int, tuple] = {}
    for idx in batches:
        shared = 0 if groups is None else \
            min(len(common_prefix([sequences[i] for i in idx])), *(spans[i][0] for i in idx))
        with torch.inference_mode():
            logits = position_logits(model, [sequences[i][shared:] for i in idx],
                                     [list(range(spans[i][0] - shared, spans[i][1] - shared)) for i in idx],
                                     prefix=sequences[idx[0]][:shared])
        for i, lg in zip(idx, logits):
            probs = torch.softmax(lg.float() / temperature, dim=-1)
            p, j = probs.topk(k, dim=-1)
            results[i] = (j.cpu(), (p / p.sum(-1, keepdim=True)).cpu())
    return [results[i] for i in range(len(sequences))]


def prepare_items(generator, items: Sequence[Item], contexts: dict[int, str], recipe: Recipe,
                  progress: Callable[[int], None] | None = None) -> list[Example]:
    """Teacher targets for items: the base model with the memory chunk in context, teacher-forced on the answer.
    A memory's items of one kind share their prompt up to the item (the chunk), which runs once per batch."""
    students, teachers, spans, student_pos = [], [], [], []
    for item in items:
        s_prompt, t_prompt, ans = student_prompt_ids(generator, item), \
            teacher_prompt_ids(generator, item, contexts[item.memory_id]), answer_ids(generator, item)
        students.append(s_prompt + ans)
        student_pos.append(list(range(len(s_prompt) - 1, len(s_prompt) + len(ans) - 1)))
        teachers.append(t_prompt + ans)
        spans.append((len(t_prompt) - 1, len(t_prompt) + len(ans) - 1))
    targets = top_k_targets(generator.model, teachers, spans, recipe.top_k, recipe.temperature,
                             groups=[(item.memory_id, item.kind) for item in items])
    if progress:
        progress(len(items))
    return [Example(s, pos, j, p, "item") for s, pos, (j, p) in zip(students, student_pos, targets)]


def open_book_items(items: Sequence[Item], contexts: dict[int, str], share: float, seed: int) -> list[tuple]:
    """(item, sources, teacher context) triples for open-book training (Recipe.open_book): a seeded `share` of the
    qa items, each once with its memory and a distractor (another memory) as sources, in random order, read by the
    teacher too, and once with the distractor alone while the teacher reads the memory."""
    rng = random.Random(seed)
    qa = [it for it in items if it.kind == "qa" and it.memory_id > 0 and it.memory_id in contexts]
    others = sorted(m for m in contexts if m > 0)  # memories (exemplars have negative ids)
    if share <= 0 or len(others) < 2 or not qa:
        return []
    out = []
    for it in rng.sample(qa, max(1, round(len(qa) * min(share, 1.0)))):
        distractor = contexts[rng.choice([m for m in others if m != it.memory_id])]
        both = [contexts[it.memory_id], distractor]
        rng.shuffle(both)
        out += [(it, both, None), (it, [distractor], contexts[it.memory_id])]
    return out


def prepare_open_book(generator, triples: Sequence[tuple], recipe: Recipe) -> list[Example]:
    """Teacher targets for open-book items (see open_book_items): the student's prompt carries the sources as `ask`
    puts them; the teacher reads that same prompt, or, where a teacher context is given, the memory alone."""
    from memory_llm.generate import build_messages

    students, teachers, spans, student_pos = [], [], [], []
    for item, sources, context in triples:
        s_prompt = generator.chat_ids(build_messages(item.prompt, sources))[0].tolist()
        t_prompt = s_prompt if context is None else teacher_prompt_ids(generator, item, context)
        ans = answer_ids(generator, item)
        students.append(s_prompt + ans)
        student_pos.append(list(range(len(s_prompt) - 1, len(s_prompt) + len(ans) - 1)))
        teachers.append(t_prompt + ans)
        spans.append((len(t_prompt) - 1, len(t_prompt) + len(ans) - 1))
    targets = top_k_targets(generator.model, teachers, spans, recipe.top_k, recipe.temperature)
    return [Example(s, pos, j, p, "item") for s, pos, (j, p) in zip(students, student_pos, targets)]


def prepare_locality(generator, prompts: Sequence[str], recipe: Recipe) -> list[Example]:
    """Base-model targets on generic prompts: its greedy continuation, teacher-forced, top-k per position."""
    chats = [closed_prompt_ids(generator, p) for p in prompts]
    conts = generator.generate_batch(chats, recipe.locality_tokens, return_ids=True)
    sequences, spans = [], []
    for prompt, cont_ids in ((p, c) for p, c in zip(chats, conts) if c):  # (an immediate end teaches nothing)
        sequences.append(prompt + cont_ids)
        spans.append((len(prompt) - 1, len(prompt) + len(cont_ids) - 1))
    targets = top_k_targets(generator.model, sequences, spans, recipe.top_k, recipe.temperature)
    return [Example(s, list(range(a, b)), j, p, "locality") for s, (a, b), (j, p) in zip(sequences, spans, targets)]
