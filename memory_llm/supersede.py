"""What a new memory makes stale: a detector of restatements with new values (rules over the words, and sentence
embeddings of what is left once the values are taken out); the words themselves are read by statements.

A small model's judgement cannot be trusted to decide that one statement replaces another, so the detector reads
signals that can be measured (docs/updates.md has the rule and its precision and recall on
data/supersession_pairs.jsonl; scripts/bench_updates.py measures them):

- **values**: the words that carry what a fact says: numbers, codes, times and dates (anything with a digit),
  weekday and month names, ordinals, names (capitalised words), and the words of a place after a preposition of
  place ("in the blue drawer"). Codes and numbers compare exactly ("Tulip9" and "tulip9" are different values);
  names, places and other words lower-cased and lightly stemmed.
- **one slot**: the old sentence's values the new text lacks, grouped into runs (a word the new text keeps ends a
  run; a copula always does). A restatement changes ONE such slot and brings a value of its own: "The door code
  for room 12 is 4471" / "... room 14 is 9921" changes two (a look-alike: both stay), "Alice's locker code is
  4471" / "... 4472" one.
- **the same statement**: with the changed values taken out of both, the old sentence and the new text say the
  same thing: their sentence embeddings' cosine reaches MIN_CONTEXT ("Alice's locker code is" / "Alice's locker
  code is now"), where another attribute does not ("The bakery opens at" / "The bakery closes at" is also caught
  by a list of opposed words: opens / closes, arrives / departs).
- **markers**: a new text that adds ("also", "another", "extra") or speaks of the past ("used to", "until 2022",
  "opened" against "opens") supersedes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

from memory_llm.statements import (COPULAS, FRAMING, FRAMING_KEYS, LOCATIVE, VERBS, WORD, Token, asserted, resolve,
                                   sentences, stem, subject_of, tokens)

# ---- the detector's weights: fitted on the tuning split of data/supersession_pairs.jsonl by
# labs/fit_supersession.py (docs/updates.md has the run); the threshold is the lowest whose cross-validated
# precision reaches 0.95
FEATURES = ("coverage", "lost_outside", "lost_inside", "introduced", "swapped", "subject_swap", "changed_values",
            "order", "same_kind", "masked", "full")
WEIGHTS = {"coverage": 0.998, "lost_outside": -0.482, "lost_inside": -1.296, "introduced": -0.618,
           "swapped": -0.633, "subject_swap": -1.344, "changed_values": -0.271, "order": -1.201, "same_kind": 1.394,
           "masked": 0.258, "full": 1.169}
BIAS = 0.716
COSINES = ("masked", "full")  # the features that need the embedder
PROBABILITY = 0.8  # a candidate at least this probable supersedes
CONFLICT_PROBABILITY = 0.5  # from this to PROBABILITY two live memories retrieved together are in conflict: the
# newer one leads (Retriever.read_as); chosen on the tuning pairs (cross-validated precision about 0.9)
CANDIDATE_SIMILARITY = 0.35  # a stored memory this close to a new one (whole texts) is checked sentence by sentence
MAX_SENTENCES = 6  # a new text of more sentences is a document: it is not checked for restatements

_PAIRS = [("open", "close"), ("open", "shut"), ("start", "end"), ("start", "finish"), ("begin", "end"),
          ("arrive", "depart"), ("arrive", "leave"), ("earliest", "latest"), ("minimum", "maximum"), ("min", "max"),
          ("morning", "evening"), ("morning", "afternoon"), ("weekday", "weekend"), ("lunch", "dinner"),
          ("breakfast", "lunch"), ("phone", "email"), ("phone", "fax"), ("home", "work"), ("home", "mobile"),
          ("entry", "exit"), ("in", "out"), ("buy", "sell"), ("deposit", "withdraw"), ("deposit", "rent"),
          ("upstairs", "downstairs"), ("adult", "child"), ("monthly", "yearly"), ("monthly", "annual"),
          ("daily", "weekly"), ("pickup", "dropoff"), ("collect", "deliver"), ("first", "last")]
CONTRASTS: dict[str, set[str]] = {}  # an attribute word → the words that name its counterpart (stemmed)
for _a, _b in _PAIRS:
    for _x, _y in ((_a, _b), (_b, _a)):
        for _form in (_x, _x + "s", _x + "ing", _x + "ed"):
            CONTRASTS.setdefault(stem(_form), set()).update({stem(_y), stem(_y + "s"), stem(_y + "ing")})
_HEADING = re.compile(r"^[^:.?!]{1,40}:\s+")  # "Wedding planning: the venue is ..."
_MONTHS_RE = "january|february|march|april|may|june|july|august|september|october|november|december"
_DAYS_RE = "monday|tuesday|wednesday|thursday|friday|saturday|sunday"
_WHEN = re.compile(  # when a change takes effect: neither subject nor value ("as of 1 May", "from next week")
    r"\b(from|starting|beginning|as of|effective|with effect from|since)\s+(in\s+|on\s+)?("
    rf"(next|this|today|tomorrow|now|immediately|{_DAYS_RE})(\s+(week|month|year|term|season|on))?|"
    rf"(\d{{1,2}}(st|nd|rd|th)?\s+)?({_MONTHS_RE})(\s+\d{{1,2}}(st|nd|rd|th)?)?)\b|\brevised schedule\b|"
    r"\b(these days|from now on|going forward|last night|this morning|this week|yesterday)\b", re.I)
_ADDING = re.compile(r"\b(also|too|as well|another(?! (update|change|correction))|second|additional|extra|in addition|"
                     r"plus|besides|both)\b", re.I)
_PAST = re.compile(r"\bbefore [A-Z]\w*")  # "before Oakridge Primary": a name, case-sensitively
_PAST_I = re.compile(r"\b(used to|previously|formerly|originally|back in|back when|before (19|20)\d\d|until (19|20)\d\d|"
                     r"in the past|years ago|last year|was once|when \w+(\s\w+)? (started|began|opened|joined)|"
                     r"before the \w+|in (its|their|our|his|her) first)\b", re.I)
# "was at 10:00" speaks of the past; "was changed to" of a change
_WAS = re.compile(r"\b(was|were)\b(?!\s+(\w+\s+)?(changed|moved|updated|replaced|switched|set|increased|reduced|"
                  r"raised|lowered|upgraded|downgraded|put|bumped|pushed|brought|renamed|reset|relocated|"
                  r"rescheduled|reassigned|promoted|taken|handed|given|cut|extended|shortened|issued|renewed))", re.I)


@dataclass
class Restatement:
    """The evidence that a new text restates an old sentence with other values."""

    sentence: str  # the old sentence made stale
    old_values: list[str]  # its values the new text no longer holds
    new_values: list[str]  # the new text's values the old sentence did not hold
    coverage: float  # the share of the old sentence's other words the new text keeps
    similarity: float | None  # the cosine of the two texts without their changed values (None: not measured)
    context: tuple[str, str] = ("", "")  # the two texts without their changed values
    features: dict = field(default_factory=dict)  # what `detect` weighs (restates, candidates)
    probability: float = 0.0  # the detector's probability that this is a restatement

    def as_dict(self) -> dict:
        return {"sentence": self.sentence, "old_values": self.old_values, "new_values": self.new_values,
                "probability": round(self.probability, 3), "coverage": round(self.coverage, 3),
                "similarity": None if self.similarity is None else round(self.similarity, 3)}


def speaks_of_the_past(old_sentence: str, new_text: str) -> bool:
    """Whether the new text states something as past ("used to", "until 2022", "was at 10:00", "opened" where
    the old sentence says "opens"), or adds to the old one ("also", "another") instead of replacing it."""
    if _ADDING.search(new_text) or _PAST.search(new_text) or _PAST_I.search(new_text) \
            or _WAS.search(new_text) and not _WAS.search(old_sentence):
        return True
    present = {t.lower() for t in WORD.findall(old_sentence)}
    for word in WORD.findall(new_text):
        w = word.lower()
        if w.endswith("ed") and w not in FRAMING and any(f in present for f in (w[:-2] + "s", w[:-1] + "s",
                                                                                 w[:-2] + "es", w[:-2], w[:-1])):
            return True
    return False


def restates(old_sentence: str, new_text: str, *, subject: str = "", question: str = "") -> Restatement | None:
    """Whether `new_text` may restate `old_sentence` with a different value, by the rules on words (the module
    docstring): one changed slot, a new value, no marker, no opposed word. `subject` is what a pronoun opening the
    old sentence stands for ("Its wifi password ..." in a note about an office); `question` is the question a
    correction answers (it names the subject, the answer the new value). The evidence carries the two texts
    without their changed values and the features `detect` weighs; None when the words rule it out."""
    if speaks_of_the_past(old_sentence, new_text):
        return None
    old = tokens(_HEADING.sub("", resolve(old_sentence, subject)))
    new = asserted(tokens(_WHEN.sub(" ", new_text)), {t.key for t in old})
    asked = list(tokens(question))
    said = {t.key for t in new + asked}
    kept = [t.key in said for t in old]

    def word(t: Token) -> bool:
        return not t.value and not t.stop and t.key not in FRAMING_KEYS and t.text.lower() not in LOCATIVE

    runs: list[list[int]] = []  # runs of the old sentence's tokens the new text lacks (a kept word or a copula
    current: list[int] = []     # ends one)
    for i, (t, k) in enumerate(zip(old, kept)):
        if k and not t.stop or t.text.lower() in COPULAS:
            runs, current = runs + [current] * bool(current), []
        else:
            current.append(i)
    runs += [current] * bool(current)
    slots = [r for r in runs if any(old[i].value and not kept[i] for i in r)]
    if len(slots) != 1:
        return None  # two values changed (another subject: room 12 / room 14), or none
    slot = set(slots[0])
    old_keys = {t.key for t in old}
    fresh = [j for j, t in enumerate(new) if t.value and t.key not in old_keys]
    if not fresh:
        return None
    lost = [old[i].key for i in range(len(old)) if not kept[i] and word(old[i])]
    introduced = [j for j, t in enumerate(new) if word(t) and t.key not in old_keys]
    if any(CONTRASTS.get(w, set()) & {new[j].key for j in introduced} for w in lost):
        return None  # "opens" / "closes"
    context = [i for i, t in enumerate(old) if (t.value or word(t)) and i not in slot]
    outside = [i for i in context if not kept[i] and word(old[i])]
    head_old = _head(old)
    head_new = _head(new)
    features = {
        "coverage": sum(kept[i] for i in context) / len(context) if context else 0.0,
        "lost_outside": float(len(outside)),
        "lost_inside": float(sum(1 for i in slot if not kept[i] and word(old[i]))),
        "introduced": float(len(introduced)),
        "swapped": float(bool(outside and introduced)),
        "subject_swap": float(any(i < head_old for i in outside) and any(j < head_new for j in introduced)),
        "changed_values": float(sum(1 for i in slot if old[i].value and not kept[i])),
        "order": _order(old, new),
        "same_kind": float({old[i].kind for i in slot if old[i].value and not kept[i]}
                           == {new[j].kind for j in fresh}),
    }
    masked_old = " ".join(t.text for i, t in enumerate(old) if i not in slot)
    masked_new = " ".join([t.text for t in asked] + [t.text for j, t in enumerate(new) if j not in set(fresh)
                                                      and t.key not in FRAMING_KEYS])
    return Restatement(old_sentence, [old[i].text for i in sorted(slot) if old[i].value and not kept[i]],
                       list(dict.fromkeys(new[j].text for j in fresh)), features["coverage"], None,
                       (masked_old, masked_new), features)


def _head(found: list[Token]) -> int:
    """Where a sentence's predicate starts, roughly: its first copula or verb-like word (else its end)."""
    return next((i for i, t in enumerate(found) if i and (t.text.lower() in COPULAS or t.text.lower() in VERBS)),
                len(found))


def _order(old: list[Token], new: list[Token]) -> float:
    """How much of the old sentence's word order the new text keeps (difflib's ratio of their content keys)."""
    import difflib

    a = [t.key for t in old if not t.stop]
    b = [t.key for t in new if not t.stop]
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() if a and b else 0.0


def candidates(old_text: str, new_text: str,
               similarity: Callable[[list[tuple[str, str]]], list[float]] | None = None,
               floor: float = 0.0) -> list[Restatement]:
    """Every (old sentence, new text) pair the word rules let through, with its features and probability. A text
    with a question is read as a correction: the question, then its answer (each sentence of it, and all of it).
    `similarity` gives the cosines of pairs of texts (pair_similarities over the home's embedder); without it the
    share of kept words stands in for both cosines. A pair whose probability cannot reach `floor` whatever its
    cosines is left out before any text is embedded (what `detect` does with its threshold: the same result,
    fewer texts to embed)."""
    olds, said = list(sentences(old_text)), list(sentences(new_text))
    asked = next((i for i, x in enumerate(said) if x.endswith("?")), None)
    question = said[asked] if asked is not None else ""
    answer = said[asked + 1:] if asked is not None else said
    news = answer + ([" ".join(answer)] if len(answer) > 1 and question else [])
    found: list[Restatement] = []
    readings: list[tuple[str, str]] = []
    if len(news) > MAX_SENTENCES:  # a document, not a restatement: its source's own chunks are superseded by source
        return found
    asked = {t.key for t in tokens(question)}
    keys = {n: _keys(n) for n in news}
    for i, sentence in enumerate(olds):
        subject = subject_of(olds[i - 1]) if i else ""
        old_values, old_words = _keys(resolve(sentence, subject))
        for candidate in news:
            new_values, new_words = keys[candidate]
            if not new_values - old_values or not (old_values | old_words) & (new_values | new_words | asked):
                continue  # no new value, or nothing in common: not a restatement (cheap to tell)
            r = restates(sentence, candidate, subject=subject, question=question)
            if r is not None and (not floor or probability(r.features, best_case=True) >= floor):
                found.append(r)
                readings.append((resolve(sentence, subject), f"{question} {candidate}".strip()))
    if found:
        sims = similarity([r.context for r in found] + readings) if similarity is not None else None
        for k, r in enumerate(found):
            r.features["masked"] = float(sims[k]) if sims is not None else r.coverage
            r.features["full"] = float(sims[len(found) + k]) if sims is not None else r.coverage
            r.similarity = r.features["masked"]
            r.probability = probability(r.features)
    return found


@lru_cache(maxsize=8192)
def _keys(sentence: str) -> tuple[frozenset, frozenset]:
    """A sentence's value keys and content-word keys."""
    found = tokens(sentence)
    return (frozenset(t.key for t in found if t.value),
            frozenset(t.key for t in found if not t.value and not t.stop))


def probability(features: dict, best_case: bool = False) -> float:
    """The detector's probability that a candidate is a restatement (logistic, WEIGHTS and BIAS); `best_case`: the
    highest it can be whatever the two cosines (each in [-1, 1]) turn out to be."""
    import math

    z = BIAS + sum(WEIGHTS[f] * float(features.get(f, 0.0)) for f in FEATURES if not best_case or f not in COSINES)
    if best_case:
        z += sum(abs(WEIGHTS[f]) for f in COSINES) + 1e-9
    return 1.0 / (1.0 + math.exp(-z))


def detect(old_text: str, new_text: str, similarity: Callable[[list[tuple[str, str]]], list[float]] | None = None,
           threshold: float | None = None) -> list[Restatement]:
    """The sentences of `old_text` that `new_text` restates with other values, each at most once: the candidate
    (`candidates`) of highest probability, where it reaches `threshold` (default PROBABILITY)."""
    threshold = PROBABILITY if threshold is None else threshold
    best: dict[str, Restatement] = {}
    for r in candidates(old_text, new_text, similarity, floor=threshold):
        if r.probability >= threshold and (r.sentence not in best or r.probability > best[r.sentence].probability):
            best[r.sentence] = r
    order = sentences(old_text)
    return sorted(best.values(), key=lambda r: order.index(r.sentence))


def pair_similarities(encode: Callable[[list[str]], "object"]) -> Callable[[list[tuple[str, str]]], list[float]]:
    """The cosines of pairs of texts by an embedder's encode (unit vectors), both sides encoded in one batch."""

    def run(pairs: list[tuple[str, str]]) -> list[float]:
        if not pairs:
            return []
        vectors = encode([t for pair in pairs for t in pair])
        return [float(vectors[2 * k] @ vectors[2 * k + 1]) for k in range(len(pairs))]
    return run


def batched_similarity(encode: Callable[[list[str]], "object"], pairs: list[tuple[str, str]],
                       threshold: float | None = None) -> Callable[[list[tuple[str, str]]], list[float]]:
    """A similarity function for `detect(old, new, ..., threshold)` over these (old, new) text pairs, with every
    text it will be asked about embedded beforehand in one batch (detecting pair by pair would embed a few texts
    per call); a text it was not told of is embedded when asked. `encode` gives unit vectors."""
    asked: list[str] = []

    def record(texts: list[tuple[str, str]]) -> list[float]:
        asked.extend(t for pair in texts for t in pair)
        return [1.0] * len(texts)  # the best case: every pair that could be asked about is

    for old, new in pairs:
        detect(old, new, record, threshold)
    texts = list(dict.fromkeys(asked))
    known = dict(zip(texts, encode(texts))) if texts else {}

    def similarity(texts: list[tuple[str, str]]) -> list[float]:
        missing = list(dict.fromkeys(t for pair in texts for t in pair if t not in known))
        if missing:
            known.update(zip(missing, encode(missing)))
        return [float(known[a] @ known[b]) for a, b in texts]
    return similarity

