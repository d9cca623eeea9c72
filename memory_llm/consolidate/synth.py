"""Training items synthesized by the model itself from each memory chunk (the teacher has the chunk in context).

- cloze: statement completions cut from the chunk's sentences (prefix → the words that follow);
- rewrite: the model rewrites the chunk; cloze items cut from the rewrite teach the facts in other words
  (the last rewrite is held out: paraphrased probes never trained on, for generalization);
- qa: questions sampled at high temperature, answered by the teacher (the model with the chunk in context); with
  `sentence_questions`, also questions asked about each sentence in turn (every fact gets a question: question
  coverage is what carries knowledge into chat-form answers; docs/lab-notes.md), answered by the teacher or, with
  `sentence_answers`, by the sentence asked about.
"""

from __future__ import annotations

import logging
import random
import re

from memory_llm.generate import build_messages
from memory_llm.ingest.chunker import split_sentences
from memory_llm.consolidate.recipe import Recipe
from memory_llm.store.records import Item

logger = logging.getLogger(__name__)

REWRITE_PROMPT = "Rewrite the following text in different words. Keep every name, number and fact.\n\n{text}"
QUESTION_PROMPT = "{text}\n\nWrite one short question about a fact stated in the text above. Write only the question."
SENTENCE_QUESTION_PROMPT = ("{text}\n\nWrite one short question that this sentence of the text above answers:"
                            " \"{sentence}\"\nWrite only the question.")


_DEFAULT = Recipe()  # synthesize's defaults are the recipe's (one source of defaults)

def cloze_items(memory_id: int, text: str, held_out: bool = False, fractions=(0.4, 0.6, 0.8),
                max_answer_words: int = 8) -> list[Item]:
    """Statement completions: each sentence of ≥ 6 words cut at several points."""
    items = []
    for sentence in split_sentences(text):
        words = sentence.split()
        if len(words) < 6:
            continue
        cuts = sorted({max(3, round(len(words) * f)) for f in fractions})
        for cut in cuts:
            if cut < len(words):
                items.append(Item(memory_id, "cloze", " ".join(words[:cut]),
                                  " ".join(words[cut:cut + max_answer_words]), held_out))
    return items


def _clean_question(text: str) -> str | None:
    for line in text.strip().splitlines():
        line = line.strip().strip('"').strip()
        line = re.sub(r"^(question|q)\s*[:.]\s*", "", line, flags=re.I)
        if line.endswith("?") and 3 <= len(line.split()) <= 40:
            return line
    return None


def synthesize(generator, memories: list, *, rewrites: int = _DEFAULT.rewrites, questions: int = _DEFAULT.questions,
               held_out_qa: int = 1, held_out_rewrite: bool = _DEFAULT.held_out_rewrite, seed: int = _DEFAULT.seed,
               batch_size: int = 16, cuts=_DEFAULT.cloze_cuts, answer_words: int = _DEFAULT.cloze_answer_words,
               sentence_questions: int = _DEFAULT.sentence_questions,
               sentence_answers: bool = _DEFAULT.sentence_answers) -> dict[int, list[Item]]:
    """Items for each memory (id → items): `rewrites` trained rewrites plus one held out (`held_out_rewrite`).
    Cloze items cut each sentence at `cuts` (fractions of its words) and answer with up to `answer_words` words.
    `questions` are sampled about the whole memory, `sentence_questions` about each of its sentences (of ≥ 4
    words); with `sentence_answers` those are answered by their sentence (the memory's own words) instead of
    the teacher. Generation is batched across memories."""
    rng = random.Random(seed)
    _seed_sampling(seed)

    def clozes(memory_id: int, text: str, held_out: bool = False) -> list[Item]:
        return cloze_items(memory_id, text, held_out, fractions=cuts, max_answer_words=answer_words)

    out: dict[int, list[Item]] = {m.id: clozes(m.id, m.text) for m in memories}
    tok = generator.tokenizer

    def chat(content: str) -> list[int]:
        return generator.chat_ids([{"role": "user", "content": content}])[0].tolist()

    def sample(prompts: list[list[int]], max_new: int, temperature: float) -> list[str]:
        """Batches of similar length (less left padding), answers in the prompts' order."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        texts: list[str] = [""] * len(prompts)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            for j, text in zip(idx, generator.generate_batch([prompts[j] for j in idx], max_new, temperature)):
                texts[j] = text
        return texts

    # rewrites: the last one of each memory is held out (paraphrased probes, never trained on)
    jobs = [(m, r) for m in memories for r in range(rewrites + int(held_out_rewrite))]
    if jobs:
        longest = max((len(tok(m.text)["input_ids"]) for m in memories), default=0)
        texts = sample([chat(REWRITE_PROMPT.format(text=m.text)) for m, _ in jobs],
                       max_new=min(320, int(longest * 1.3) + 16), temperature=0.7)
        for (m, r), text in zip(jobs, texts):
            out[m.id] += clozes(m.id, text, held_out=(r == rewrites))
    # questions sampled hot, answered by the teacher (greedy, chunk in context) or, with `sentence_answers`, a
    # sentence's questions by that sentence itself
    if questions or sentence_questions:
        jobs = [(m, QUESTION_PROMPT.format(text=m.text), 1.0, None) for m in memories for _ in range(questions)]
        jobs += [(m, SENTENCE_QUESTION_PROMPT.format(text=m.text, sentence=sentence), 0.7, sentence)
                 for m in memories for sentence in split_sentences(m.text) if len(sentence.split()) >= 4
                 for _ in range(sentence_questions)]
        jobs.sort(key=lambda job: -job[2])  # (stable) one sampling run per temperature
        qs = []
        for hot in sorted({job[2] for job in jobs}, reverse=True):
            qs += sample([chat(job[1]) for job in jobs if job[2] == hot], max_new=40, temperature=hot)
        pairs = []
        seen: set[tuple[int, str]] = set()
        for (m, _, _, sentence), q in zip(jobs, qs):
            q = _clean_question(q)
            if q and (m.id, q.lower()) not in seen:
                seen.add((m.id, q.lower()))
                pairs.append((m, q, sentence if sentence_answers else None))
        ask = [(m, q) for m, q, own in pairs if own is None]
        told = iter(sample([generator.chat_ids(build_messages(q, [m.text]))[0].tolist() for m, q in ask],
                           max_new=48, temperature=0.0) if ask else [])
        by_memory: dict[int, list[Item]] = {}
        for m, q, own in pairs:
            a = (own if own is not None else next(told)).strip()
            if a:
                by_memory.setdefault(m.id, []).append(Item(m.id, "qa", q, a))
        for mid, qa in by_memory.items():
            rng.shuffle(qa)
            for i, item in enumerate(qa):
                item.held_out = i < held_out_qa and len(qa) > held_out_qa
            out[mid] += qa
    return out


def _seed_sampling(seed: int) -> None:
    """Seed the generator's sampling (torch's global RNG), so one recipe's seed always synthesizes the same items."""
    try:
        import torch
    except ImportError:  # fakes without torch
        return
    torch.manual_seed(seed)
