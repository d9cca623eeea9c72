"""Build the general-knowledge probe set: easy questions the BASE model already answers correctly.

Used to check that a consolidation (LoRA) adapter does not damage general behaviour: the base model scores
1.0 on this set by construction, so any drop after consolidation is damage.

Procedure: a hand-written list of easy candidate questions (capitals, colours, animals, arithmetic,
opposites, famous people, units, days and months, science basics, misc) with short unambiguous answers is
run through the base model closed-book (build_messages(question) with no context, greedy, 64 new tokens,
batches of 8); a candidate is kept when `memory_llm.evaluate.is_correct` accepts the output and, to rule
out accidental substring matches, an alternative also occurs as a whole word (strict_correct). Up to --max
probes are kept, taken round-robin across categories so that every category is represented.

Candidates are also screened statically: no answer alternative may occur in the question itself, and
alternatives must not be so short that they match by accident (words of >= 3 letters, numbers >= 10).

Output (the eval format of docs/eval-format.md), one probe per line:
    {"id": "gk-001", "kind": "qa", "input": "What is the capital of France?", "answers": [["Paris"]],
     "tags": ["general", "capital"]}

Candidates whose output passed but was wrong around the answer on hand review (REVIEWED_WRONG) and
candidates that repeat a line of memory_llm/resources/generic_prompts.txt are dropped too.

    python scripts/build_general_probes.py --out data/general_probes.jsonl --max 80 --report /tmp/gk_report.jsonl
    # after changing a filter, rebuild without re-running the model (~50 min on 2 busy CPU cores):
    python scripts/build_general_probes.py --reuse-report /tmp/gk_report.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

# (category, question, answers): answers is a list of groups; every group needs one alternative in the output.
CANDIDATES: list[tuple[str, str, list[list[str]]]] = [
    # capitals
    ("capital", "What is the capital of France?", [["Paris"]]),
    ("capital", "What is the capital of Japan?", [["Tokyo"]]),
    ("capital", "What is the capital of Italy?", [["Rome"]]),
    ("capital", "What is the capital of Germany?", [["Berlin"]]),
    ("capital", "What is the capital of Spain?", [["Madrid"]]),
    ("capital", "What is the capital of the United Kingdom?", [["London"]]),
    ("capital", "What is the capital of Russia?", [["Moscow"]]),
    ("capital", "What is the capital of Egypt?", [["Cairo"]]),
    ("capital", "What is the capital of China?", [["Beijing", "Peking"]]),
    ("capital", "What is the capital of Canada?", [["Ottawa"]]),
    ("capital", "What is the capital of Australia?", [["Canberra"]]),
    ("capital", "What is the capital of the United States?", [["Washington"]]),
    ("capital", "What is the capital of India?", [["Delhi"]]),
    ("capital", "What is the capital of Greece?", [["Athens"]]),
    ("capital", "What is the capital of Portugal?", [["Lisbon"]]),
    ("capital", "What is the capital of Ireland?", [["Dublin"]]),
    ("capital", "What is the capital of Norway?", [["Oslo"]]),
    ("capital", "What is the capital of Sweden?", [["Stockholm"]]),
    ("capital", "What is the capital of Argentina?", [["Buenos Aires"]]),
    ("capital", "What is the capital of Kenya?", [["Nairobi"]]),
    ("capital", "What is the capital of Turkey?", [["Ankara"]]),
    ("capital", "What is the capital of South Korea?", [["Seoul"]]),
    ("capital", "What is the capital of Thailand?", [["Bangkok"]]),
    ("capital", "What is the capital of Austria?", [["Vienna", "Wien"]]),
    ("capital", "What is the capital of Poland?", [["Warsaw"]]),
    ("capital", "What is the capital of Cuba?", [["Havana"]]),
    ("capital", "What is the capital of Peru?", [["Lima"]]),
    ("capital", "Paris is the capital of which country?", [["France"]]),
    ("capital", "Rome is the capital city of which country?", [["Italy"]]),
    # colours
    ("colour", "What colour is the sky on a clear sunny day?", [["blue"]]),
    ("colour", "What colour is fresh grass?", [["green"]]),
    ("colour", "What colour is a ripe banana?", [["yellow"]]),
    ("colour", "What colour is fresh snow?", [["white"]]),
    ("colour", "What colour is coal?", [["black"]]),
    ("colour", "What colour is a ripe tomato?", [["red"]]),
    ("colour", "What colour do you get when you mix blue and yellow paint?", [["green"]]),
    ("colour", "What colour do you get when you mix red and white paint?", [["pink"]]),
    ("colour", "What colour do you get when you mix red and blue paint?", [["purple", "violet"]]),
    ("colour", "What colour is a flamingo?", [["pink"]]),
    ("colour", "What colour is milk chocolate?", [["brown"]]),
    ("colour", "What colour is a typical stop sign?", [["red"]]),
    ("colour", "What colour are the leaves of most healthy plants?", [["green"]]),
    # animals
    ("animal", "What is the largest mammal on Earth?", [["whale", "whales"]]),
    ("animal", "Which animal has the longest neck?", [["giraffe"]]),
    ("animal", "What is the fastest land animal?", [["cheetah"]]),
    ("animal", "Which farm animal says moo?", [["cow", "cows", "cattle"]]),
    ("animal", "Which animal is known as the king of the jungle?", [["lion"]]),
    ("animal", "Which flightless bird lives in Antarctica?", [["penguin"]]),
    ("animal", "Which African animal has black and white stripes?", [["zebra"]]),
    ("animal", "What is a baby dog called?", [["puppy", "puppies", "pup"]]),
    ("animal", "What is a baby cat called?", [["kitten"]]),
    ("animal", "What is a baby sheep called?", [["lamb"]]),
    ("animal", "What is a young frog called?", [["tadpole"]]),
    ("animal", "How many legs does a spider have?", [["eight", "8 legs"]]),
    ("animal", "How many legs does an insect have?", [["six", "6 legs"]]),
    ("animal", "Which insect makes honey?", [["bee", "bees", "honeybee", "honeybees"]]),
    ("animal", "Which large grey animal has a trunk?", [["elephant"]]),
    ("animal", "What is the largest bird in the world?", [["ostrich"]]),
    ("animal", "What does a caterpillar turn into?", [["butterfly", "butterflies", "moth"]]),
    ("animal", "Which animal is called the ship of the desert?", [["camel"]]),
    ("animal", "What do giant pandas mainly eat?", [["bamboo"]]),
    ("animal", "Which mammal can truly fly?", [["bat", "bats"]]),
    ("animal", "Which Australian animal hops and carries its baby in a pouch?", [["kangaroo"]]),
    ("animal", "What animal is Dumbo in the Disney film?", [["elephant"]]),
    # arithmetic (results >= 10)
    ("arithmetic", "What is 7 times 8?", [["56", "fifty-six", "fifty six"]]),
    ("arithmetic", "What is 12 plus 15?", [["27", "twenty-seven", "twenty seven"]]),
    ("arithmetic", "What is 100 minus 37?", [["63", "sixty-three", "sixty three"]]),
    ("arithmetic", "What is 9 times 9?", [["81", "eighty-one", "eighty one"]]),
    ("arithmetic", "What is 6 times 7?", [["42", "forty-two", "forty two"]]),
    ("arithmetic", "What is 25 plus 25?", [["50", "fifty"]]),
    ("arithmetic", "What is 15 times 3?", [["45", "forty-five", "forty five"]]),
    ("arithmetic", "What is 50 minus 18?", [["32", "thirty-two", "thirty two"]]),
    ("arithmetic", "What is 11 times 11?", [["121"]]),
    ("arithmetic", "What is 20 times 5?", [["100", "hundred"]]),
    ("arithmetic", "What is 64 divided by 4?", [["16", "sixteen"]]),
    ("arithmetic", "What is 200 divided by 8?", [["25", "twenty-five", "twenty five"]]),
    ("arithmetic", "What is 13 plus 28?", [["41", "forty-one", "forty one"]]),
    ("arithmetic", "What is 12 squared?", [["144"]]),
    ("arithmetic", "What is the square root of 169?", [["13", "thirteen"]]),
    ("arithmetic", "What is half of 86?", [["43", "forty-three", "forty three"]]),
    ("arithmetic", "I have 12 apples and buy 8 more. How many apples do I have?", [["20", "twenty"]]),
    ("arithmetic", "How many eggs are in a dozen?", [["12", "twelve"]]),
    ("arithmetic", "What is 10 plus 10?", [["20", "twenty"]]),
    ("arithmetic", "What is 3 times 5?", [["15", "fifteen"]]),
    # opposites
    ("opposite", "What is the opposite of hot?", [["cold"]]),
    ("opposite", "What is the opposite of up?", [["down"]]),
    ("opposite", "What is the opposite of big?", [["small", "little"]]),
    ("opposite", "What is the opposite of happy?", [["sad", "unhappy"]]),
    ("opposite", "What is the opposite of day?", [["night"]]),
    ("opposite", "What is the opposite of fast?", [["slow"]]),
    ("opposite", "What is the opposite of wet?", [["dry"]]),
    ("opposite", "What is the opposite of full?", [["empty"]]),
    ("opposite", "What is the opposite of black?", [["white"]]),
    ("opposite", "What is the opposite of left?", [["right"]]),
    ("opposite", "What is the opposite of early?", [["late"]]),
    ("opposite", "What is the opposite of rich?", [["poor"]]),
    ("opposite", "What is the opposite of love?", [["hate"]]),
    ("opposite", "What is the opposite of tall?", [["short"]]),
    ("opposite", "What is the opposite of open?", [["closed", "shut"]]),
    # famous people
    ("people", "Who wrote Romeo and Juliet?", [["Shakespeare"]]),
    ("people", "Who painted the Mona Lisa?", [["Leonardo", "Vinci"]]),
    ("people", "Who developed the theory of relativity?", [["Einstein"]]),
    ("people", "Who was the first president of the United States?", [["Washington"]]),
    ("people", "Who discovered penicillin?", [["Fleming"]]),
    ("people", "Who is credited with inventing the telephone?", [["Bell"]]),
    ("people", "Who invented the practical light bulb?", [["Edison"]]),
    ("people", "Who wrote the Harry Potter books?", [["Rowling"]]),
    ("people", "Who formulated the laws of motion and universal gravitation?", [["Newton"]]),
    ("people", "Who painted The Starry Night?", [["Gogh"]]),
    ("people", "Who proposed the theory of evolution by natural selection?", [["Darwin"]]),
    ("people", "Who co-founded Microsoft with Paul Allen?", [["Gates"]]),
    ("people", "Which French emperor was defeated at Waterloo?", [["Napoleon"]]),
    ("people", "Who was the first woman to win a Nobel Prize?", [["Curie"]]),
    ("people", "Who became South Africa's president after 27 years in prison?", [["Mandela"]]),
    ("people", "Who gave the famous \"I Have a Dream\" speech?", [["Martin Luther King"]]),
    ("people", "Who wrote A Christmas Carol?", [["Dickens"]]),
    ("people", "Who composed the Fifth Symphony that begins da-da-da-dum?", [["Beethoven"]]),
    ("people", "Who wrote the Odyssey?", [["Homer"]]),
    ("people", "Which brothers flew the first powered airplane?", [["Wright"]]),
    ("people", "Who wrote Hamlet?", [["Shakespeare"]]),
    # units
    ("units", "How many centimeters are in a meter?", [["100", "hundred"]]),
    ("units", "How many grams are in a kilogram?", [["1000", "1,000", "thousand"]]),
    ("units", "How many minutes are in an hour?", [["60", "sixty"]]),
    ("units", "How many seconds are in a minute?", [["60", "sixty"]]),
    ("units", "How many hours are in a day?", [["24", "twenty-four", "twenty four"]]),
    ("units", "How many days are in a leap year?", [["366"]]),
    ("units", "How many days are in a normal year?", [["365"]]),
    ("units", "How many meters are in a kilometer?", [["1000", "1,000", "thousand"]]),
    ("units", "How many inches are in a foot?", [["12", "twelve"]]),
    ("units", "How many months are in a year?", [["12", "twelve"]]),
    ("units", "How many weeks are in a year?", [["52", "fifty-two", "fifty two"]]),
    ("units", "How many years are in a century?", [["100", "hundred"]]),
    ("units", "How many years are in a decade?", [["10 years", "ten"]]),
    ("units", "How many ounces are in a pound?", [["16", "sixteen"]]),
    ("units", "What is the unit of electrical resistance?", [["ohm"]]),
    ("units", "What is the SI unit of force?", [["newton"]]),
    ("units", "What is the SI unit of electric current?", [["ampere", "amperes", "amp", "amps"]]),
    ("units", "How many millimeters are in a centimeter?", [["ten", "10 millimeters", "10 millimetres", "10 mm"]]),
    # days and months
    ("calendar", "What day comes after Monday?", [["Tuesday"]]),
    ("calendar", "What day comes before Friday?", [["Thursday"]]),
    ("calendar", "What month comes after January?", [["February"]]),
    ("calendar", "What month comes before December?", [["November"]]),
    ("calendar", "What is the first month of the year?", [["January"]]),
    ("calendar", "What is the last month of the year?", [["December"]]),
    ("calendar", "How many days does February have in a non-leap year?", [["28", "twenty-eight", "twenty eight"]]),
    ("calendar", "What day comes after Saturday?", [["Sunday"]]),
    ("calendar", "In which month is Halloween celebrated?", [["October"]]),
    ("calendar", "Which day is between Tuesday and Thursday?", [["Wednesday"]]),
    ("calendar", "What month comes after June?", [["July"]]),
    ("calendar", "Which season comes after winter?", [["spring"]]),
    ("calendar", "In which month is Christmas Day?", [["December"]]),
    ("calendar", "How many days are in a week?", [["seven", "7 days"]]),
    # science basics
    ("science", "What is the chemical formula of water?", [["H2O", "H₂O"]]),
    ("science", "Which gas do plants absorb from the air for photosynthesis?", [["carbon dioxide", "CO2", "CO₂"]]),
    ("science", "Which gas do humans need to breathe in to stay alive?", [["oxygen"]]),
    ("science", "At what temperature in Celsius does water boil at sea level?", [["100"]]),
    ("science", "Which organ pumps blood around the body?", [["heart"]]),
    ("science", "What is the largest organ of the human body?", [["skin"]]),
    ("science", "How many bones are in the adult human body?", [["206"]]),
    ("science", "What force pulls objects toward the ground?", [["gravity", "gravitation"]]),
    ("science", "What is the hardest natural substance?", [["diamond"]]),
    ("science", "What process do plants use to make food from sunlight?", [["photosynthesis"]]),
    ("science", "Which gas makes up most of Earth's atmosphere?", [["nitrogen"]]),
    ("science", "Which organ do we use to think?", [["brain"]]),
    ("science", "What are the three states of matter?", [["solid"], ["liquid"], ["gas"]]),
    ("science", "Which metal is liquid at room temperature?", [["mercury"]]),
    ("science", "What does a thermometer measure?", [["temperature"]]),
    ("science", "What instrument measures air pressure?", [["barometer"]]),
    ("science", "Which vitamin is made in the skin from sunlight?", [["vitamin D"]]),
    ("science", "What is at the center of an atom?", [["nucleus"]]),
    ("science", "How many sides does a hexagon have?", [["six", "6 sides"]]),
    ("science", "How many sides does an octagon have?", [["eight", "8 sides"]]),
    ("science", "How many degrees are in a right angle?", [["90", "ninety"]]),
    ("science", "How many degrees are in a full circle?", [["360"]]),
    ("science", "What do the angles of a triangle add up to?", [["180"]]),
    # geography and misc
    ("misc", "What is the largest ocean on Earth?", [["Pacific"]]),
    ("misc", "What is the longest river in Africa?", [["Nile"]]),
    ("misc", "What is the largest continent?", [["Asia"]]),
    ("misc", "What is the tallest mountain in the world?", [["Everest"]]),
    ("misc", "What is the largest country in the world by area?", [["Russia"]]),
    ("misc", "What language is mainly spoken in Brazil?", [["Portuguese"]]),
    ("misc", "What language is mainly spoken in Mexico?", [["Spanish"]]),
    ("misc", "What is the currency of Japan?", [["yen"]]),
    ("misc", "What is the currency of the United States?", [["dollar"]]),
    ("misc", "How many players does a soccer team have on the field?", [["11", "eleven"]]),
    ("misc", "Which sport uses a shuttlecock?", [["badminton"]]),
    ("misc", "Which sport is the Wimbledon tournament famous for?", [["tennis"]]),
    ("misc", "How many strings does a standard guitar have?", [["six", "6 strings"]]),
    ("misc", "How many colours are in a rainbow?", [["seven", "7 colors", "7 colours"]]),
    ("misc", "Which country is home to the Great Wall?", [["China"]]),
    ("misc", "In which city is the Eiffel Tower?", [["Paris"]]),
    ("misc", "Which country gave the Statue of Liberty to the United States?", [["France"]]),
    ("misc", "How many continents are there?", [["seven", "7 continents"]]),
]

# Hand review of the base model's outputs (greedy, 64 tokens): these pass both checks, but the output around
# the answer is wrong ("one gram is equal to 1000 grams", penicillin "attributed to Carl Sagan"), so the
# match is luck rather than knowledge; they are dropped.
REVIEWED_WRONG = {
    "How many centimeters are in a meter?",
    "How many grams are in a kilogram?",
    "Who discovered penicillin?",
    "Which country gave the Statue of Liberty to the United States?",
}

GENERIC_PROMPTS = Path(__file__).resolve().parents[1] / "memory_llm/resources/generic_prompts.txt"

# The topics of the test memories: general probes must not touch them.
FORBIDDEN = ("mars", "moon", "planet", "observator", "province", "astronom", "telescope")


def static_problems(question: str, answers: list[list[str]]) -> list[str]:
    """Reasons a candidate is unsuitable without running the model (empty list: fine)."""
    problems, low = [], question.lower()
    if question in REVIEWED_WRONG:
        problems.append("hand review: the base output is right only by accident")
    if GENERIC_PROMPTS.is_file() and low in GENERIC_PROMPTS.read_text(encoding="utf-8").lower().splitlines():
        problems.append("also in generic_prompts.txt (the locality prompts)")
    if any(f in low for f in FORBIDDEN):
        problems.append("touches a test-memory topic")
    for group in answers:
        for alt in group:
            if alt.lower() in low:
                problems.append(f"answer {alt!r} occurs in the question")
            digits = re.sub(r"\D", "", alt)
            if alt.strip().isdigit() and int(digits) < 10:
                problems.append(f"answer {alt!r} is a single digit")
            elif not alt.strip().isdigit() and len(alt.strip()) < 3:
                problems.append(f"answer {alt!r} is too short")
    return problems


def strict_correct(output: str, answers: list[list[str]]) -> bool:
    """Like is_correct, but each alternative must occur as a whole word (so "red" does not match "covered").

    Used only while building: a probe is kept when the base output passes both checks, so the base model's
    answers are not accidental substring matches."""
    return all(any(re.search(r"(?<!\w)" + re.escape(a) + r"(?!\w)", output, re.IGNORECASE) for a in group)
               for group in answers)


def round_robin(items: list[dict], limit: int) -> list[dict]:
    """Up to `limit` items, one category at a time, each category in its original order."""
    by_cat: dict[str, list[dict]] = {}
    for it in items:
        by_cat.setdefault(it["category"], []).append(it)
    out, queues = [], list(by_cat.values())
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    order = {id(it): i for i, it in enumerate(items)}
    return sorted(out, key=lambda it: order[id(it)])  # keep the candidates' order (grouped by category)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/general_probes.jsonl", help="output JSON Lines file")
    ap.add_argument("--max", type=int, default=80, help="keep at most this many probes")
    ap.add_argument("--model", default="smollm2", help="base model name (default: smollm2)")
    ap.add_argument("--cache", default=os.environ.get("MLLM_CACHE", "/tmp/mcache"), help="converted-model cache")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--report", default=None, help="optionally write every candidate's output and verdict here")
    ap.add_argument("--reuse-report", default=None,
                    help="take the outputs from a --report file of an earlier run instead of running the model "
                         "(greedy decoding is deterministic; lets the static filters change without a re-run)")
    args = ap.parse_args(argv)

    os.environ.setdefault("MLLM_CACHE", args.cache)
    import torch

    torch.set_num_threads(args.threads)
    from memory_llm.evaluate import is_correct
    from memory_llm.generate import TransformersGenerator, build_messages

    seen, cands = set(), []
    for cat, q, ans in CANDIDATES:
        if q in seen:
            raise SystemExit(f"duplicate candidate: {q!r}")
        seen.add(q)
        probs = static_problems(q, ans)
        if probs:
            print(f"skip (static) {q!r}: {'; '.join(probs)}", file=sys.stderr)
            continue
        cands.append({"category": cat, "input": q, "answers": ans})
    print(f"{len(CANDIDATES)} candidates, {len(cands)} pass the static checks", file=sys.stderr)

    if args.reuse_report:
        previous = {}
        for line in Path(args.reuse_report).read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                previous[rec["input"]] = rec["output"]
        missing = [c["input"] for c in cands if c["input"] not in previous]
        if missing:
            raise SystemExit(f"{args.reuse_report}: no output for {len(missing)} candidates, e.g. {missing[0]!r}")
        for c in cands:
            c["output"] = previous[c["input"]]
    else:
        g = TransformersGenerator.load(args.model, args.cache)
        ids = [g.chat_ids(build_messages(c["input"]))[0].tolist() for c in cands]
        order = sorted(range(len(cands)), key=lambda i: len(ids[i]))  # similar lengths per batch: less padding
        t0 = time.time()
        for b in range(0, len(order), args.batch_size):
            chunk = order[b:b + args.batch_size]
            outs = g.generate_batch([ids[i] for i in chunk], max_new_tokens=args.max_new_tokens)
            for i, out in zip(chunk, outs):
                cands[i]["output"] = out
            print(f"  {min(b + args.batch_size, len(order))}/{len(order)}  {time.time() - t0:.0f}s", file=sys.stderr)
    for c in cands:
        c["loose"] = is_correct(c["output"], c["answers"])
        c["correct"] = c["loose"] and strict_correct(c["output"], c["answers"])

    passed = [c for c in cands if c["correct"]]
    kept = round_robin(passed, args.max)
    if args.report:
        Path(args.report).write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in cands), encoding="utf-8")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for n, c in enumerate(kept, 1):
            f.write(json.dumps({"id": f"gk-{n:03d}", "kind": "qa", "input": c["input"], "answers": c["answers"],
                                "tags": ["general", c["category"]]}, ensure_ascii=False) + "\n")
    cats = sorted({c["category"] for c in cands})
    for cat in cats:
        tot = sum(c["category"] == cat for c in cands)
        ok = sum(c["category"] == cat for c in passed)
        k = sum(c["category"] == cat for c in kept)
        print(f"  {cat:11s} {ok:3d}/{tot:3d} correct, {k:3d} kept", file=sys.stderr)
    print(f"{len(CANDIDATES)} candidates, {len(passed)} answered correctly, {len(kept)} written to {out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
