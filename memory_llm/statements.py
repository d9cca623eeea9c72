"""How a statement reads: its sentences, its words marked as values (numbers, codes, times, dates, names, places)
or not, the values it names only to deny them, what a pronoun opening it stands for, and dates given by users. Text
only: the supersession detector (memory_llm.supersede) and consolidation's gate read memories through it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time as dtime
from functools import lru_cache
from typing import Sequence

from memory_llm.errors import InputError

WORD = re.compile(r"[A-Za-z0-9](?:[\w'’\-:./@#]*[A-Za-z0-9])?(?:,\d{3}(?!\d))*")
_SENTENCE = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n+")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec")
STOP = frozenset("""a an the is are was were be been being am of for to in on at by with from into onto and or but
it its it's this that these those there here as so than then now currently today still just only also too very
our my your their his her we i you they he she me us them has have had do does did will would can could should
shall may might must not no yes any some all each every which who whom whose what when where why how about after
before over under up down out off again once per via s new changed change changes moved move now anymore longer
became become becomes got gets set updated update note correction actually btw fyi reminder heads please
effective starting since until instead rather""".split())
COPULAS = frozenset("is are was were be been am".split())
LOCATIVE = frozenset("in at on under behind inside near beside by above below into onto outside opposite".split())
PLACE_BREAK = frozenset("""and but so because which who that when while if since until now is are was were be been
am has have had for with every each per""".split())
VERBS = frozenset("""has have had meets opens closes starts begins ends finishes runs holds costs charges leaves
lives works sits keeps goes gets takes comes stays parks stores plays teaches leads hangs stands lies arrives departs
uses needs lands expires happens""".split())
TIME_WORDS = frozenset("""weekday weekdays weekend weekends morning mornings afternoon afternoons evening evenings
night nights day days week weeks month months year years noon midnight""".split())
_CLOCK = re.compile(r"\d{1,2}[:.]\d{2}(am|pm)?|\d{1,2}(am|pm)")
_NUMBER = re.compile(r"[\d,]+(\.\d+)?")
_DAY_OF_MONTH = re.compile(r"\d{1,2}(st|nd|rd|th)")
_DENYING = frozenset("not never isn't wasn't aren't weren't".split())
_DENYING_PAIRS = frozenset({"instead of", "rather than", "no longer", "except for"})
# words that frame a new value ("... was changed to ...", "Update: ...", "now ...") and say nothing themselves
FRAMING = frozenset("""update updated note correction actually btw fyi reminder heads now currently changed change
moved move became become becomes new newly switched switch replaced replace instead anymore longer today latest
nowadays upgraded upgrade downgraded raised lowered increased reduced bumped renamed relocated rescheduled
reassigned promoted pushed brought put kept stored located placed held ugh oh hey hi ok okay well hmm yay argh lol
guess""".split())


def stem(word: str) -> str:
    """A word lower-cased, without a possessive, a plural, -ing, -ed or -ly, and a final e ("hiring" and "hire",
    "monthly" and "month", "closes" and "close" compare equal)."""
    w = word.lower().replace("’", "'")
    if w.endswith("'s"):
        w = w[:-2]
    for suffix in ("ing", "ed", "es", "ly", "s"):
        if len(w) > len(suffix) + 2 and w.endswith(suffix) and not w.endswith("ss"):
            w = w[: -len(suffix)]
            break
    return w[:-1] if len(w) > 3 and w.endswith("e") else w


FRAMING_KEYS = frozenset(stem(w) for w in FRAMING)


@dataclass(frozen=True)
class Token:
    text: str
    key: str  # how it compares: numbers and codes exactly, other words lower-cased and stemmed
    value: bool  # carries what a fact says (see the module docstring)
    stop: bool
    kind: str = ""  # a value's kind: time, number, date, code, day, name, place


@lru_cache(maxsize=4096)
def sentences(text: str) -> tuple[str, ...]:
    """A text's sentences (also split at line breaks: a correction is its question, then the answer), verbatim;
    cached."""
    return tuple(s.strip() for s in _SENTENCE.split(text) if s and s.strip())


@lru_cache(maxsize=8192)
def tokens(sentence: str) -> tuple[Token, ...]:
    """A sentence's tokens, each marked as a value (or not, with its kind) and as a stop word (or not); cached."""
    found = WORD.findall(sentence)
    lows = [w.lower() for w in found]
    head = next((i for i, w in enumerate(lows) if i and (w in COPULAS or w in VERBS)), None)
    out: list[Token] = []
    place = 0  # words still to take as a place after a preposition of place (in the predicate)
    for i, raw in enumerate(found):
        word = raw[:-2] if raw.lower().endswith(("'s", "’s")) else raw
        low = word.lower()
        named = word[:1].isupper() and (i > 0 or (len(found) > 1 and found[1][:1].isupper())
                                         or raw.lower().endswith(("'s", "’s")))
        exact = any(c.isdigit() for c in word)  # numbers, times, codes: compared as written
        kind = _kind(word, low, exact, named)
        stop = kind is None and low in STOP
        if low in PLACE_BREAK or low in COPULAS or low in TIME_WORDS:
            place = 0
        elif place and kind is None and not stop and low not in FRAMING and low not in LOCATIVE:
            kind, place = "place", place - 1
        if low in LOCATIVE and (head is None or i > head):
            place = 3
        out.append(Token(word, word if exact else stem(word), kind is not None, stop, kind or ""))
    return tuple(out)


def _kind(word: str, low: str, exact: bool, named: bool) -> str | None:
    """What kind of value a word is (None: not a value)."""
    if exact:
        return "time" if _CLOCK.fullmatch(low) else "number" if _NUMBER.fullmatch(low) else \
            "date" if _DAY_OF_MONTH.fullmatch(low) else "code"
    if low.rstrip("s") in WEEKDAYS:
        return "day"
    if low in MONTHS or low in ORDINALS:
        return "date"
    if named and low not in STOP and low not in FRAMING:
        return "name"
    return None


def asserted(found, old_keys: set[str] = frozenset()) -> list[Token]:
    """The tokens without the values a text names only to deny or leave them ("not 4471", "no longer 7:30",
    "instead of Tuesdays", "from Tuesdays to Thursdays" where Thursdays is new to `old_keys`)."""
    low = [t.text.lower().replace("’", "'") for t in found]
    denied: set[int] = set()
    for i, word in enumerate(low):
        pair = " ".join(low[i - 1:i + 1]) if i else ""
        moved = word == "from" and any(low[j] == "to" and j + 1 < len(found) and found[j + 1].value
                                       and found[j + 1].key not in old_keys for j in range(i + 1, min(i + 6, len(low))))
        if not (word in _DENYING or pair in _DENYING_PAIRS or moved):
            continue
        j = i + 1
        while j < len(found) and not found[j].value and j - i <= 3:
            j += 1
        while j < len(found) and found[j].value:
            denied.add(j)
            j += 1
    return [t for i, t in enumerate(found) if i not in denied]


def values(text: str) -> list[str]:
    """The value tokens of a text, in order, once each."""
    return list(dict.fromkeys(t.text for t in tokens(text) if t.value))


def stale_values(old: str, new: str, named: Sequence[str] | None = None) -> list[str]:
    """The values an old statement held that its successor does not: those the detector `named`, else the old
    text's values the new text lacks."""
    return list(named) if named else [v for v in values(old) if v not in set(values(new))]


PRONOUNS = {"it": "", "its": "'s", "they": "", "their": "'s", "he": "", "his": "'s", "she": "", "her": "'s",
            "this": "", "there": ""}


def subject_of(sentence: str) -> str:
    """A sentence's subject, roughly: its words before the first copula or verb-like word ("" when none)."""
    words = sentence.split()
    for i, w in enumerate(words):
        if w.lower().strip(",;:") in COPULAS or i and w.lower().strip(",;:") in VERBS:
            return " ".join(words[:i]).strip(",;:")
    return ""


def resolve(sentence: str, subject: str) -> str:
    """The sentence with an opening pronoun replaced by what it stands for (unchanged without a subject)."""
    first, _, rest = sentence.partition(" ")
    tail = PRONOUNS.get(first.lower())
    if not subject or tail is None or not rest:
        return sentence
    return f"{subject}{tail} {rest}"


# ---- dates ----------------------------------------------------------------------------------------------------
def parse_date(text: str) -> float:
    """A time given by a user (ISO 8601: a date, or a date and time, with or without a zone; a date is its local
    midnight) as a Unix time; a clear InputError otherwise."""
    value = (text or "").strip()
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), dtime()).astimezone().timestamp()
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return (moment if moment.tzinfo else moment.astimezone()).timestamp()
    except ValueError:
        raise InputError(f"not a date: {text!r} (give ISO 8601, e.g. 2026-12-03 or 2026-12-03T14:30)") from None


def as_time(when) -> float | None:
    """A date as a Unix time: ISO 8601 text (parse_date), a datetime, a number, or None."""
    if when is None or isinstance(when, (int, float)) and not isinstance(when, bool):
        return None if when is None else float(when)
    if isinstance(when, datetime):
        return (when if when.tzinfo else when.astimezone()).timestamp()
    if isinstance(when, str):
        return parse_date(when)
    raise InputError(f"not a date: {when!r}")
