"""The detector on its own (memory_llm/supersede.py): texts in, restatements out; no store, no model."""

import difflib
import json
from pathlib import Path

from memory_llm.supersede import CONFLICT_PROBABILITY, PROBABILITY, candidates, detect

PAIRS = Path(__file__).resolve().parents[1] / "data" / "supersession_pairs.jsonl"


class CountingSimilarity:
    """A stand-in for the embedder's cosines (difflib's ratio of the words, in [0, 1]) that counts the texts it is
    asked to embed."""

    def __init__(self):
        self.texts = 0

    def __call__(self, pairs):
        self.texts += 2 * len(pairs)
        return [difflib.SequenceMatcher(None, a.lower().split(), b.lower().split()).ratio() for a, b in pairs]


def test_detect_embeds_only_what_can_reach_its_threshold_and_finds_the_same():
    rows = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines() if line.strip()]
    for threshold in (PROBABILITY, CONFLICT_PROBABILITY):
        every, pruned = CountingSimilarity(), CountingSimilarity()
        for row in rows:
            expected = {}
            for r in candidates(row["old"], row["new"], every):
                if r.probability >= threshold and r.probability > expected.get(r.sentence, -1.0):
                    expected[r.sentence] = r.probability
            found = {r.sentence: r.probability for r in detect(row["old"], row["new"], pruned, threshold=threshold)}
            assert found == expected, row["id"]
        assert pruned.texts < 0.8 * every.texts  # the point: fewer texts embedded


def test_a_restated_value_is_found_and_a_look_alike_is_not():
    found = detect("Alice's locker code is 4471.", "Alice's locker code is 4472.")
    assert [r.sentence for r in found] == ["Alice's locker code is 4471."]
    assert detect("The door code for room 12 is 4471.", "The door code for room 14 is 9921.") == []
    assert detect("The bakery opens at 7:30 on weekdays.", "The bakery closes at 18:00 on weekdays.") == []
