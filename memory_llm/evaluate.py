"""Evaluation: probe files (design.md's format), modes, accuracy overall and by tag."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from memory_llm.errors import EvalFormatError

logger = logging.getLogger(__name__)

KINDS = ("qa", "cloze")
MODES = ("base", "rag", "closed", "hybrid", "served")  # closed/hybrid use the consolidated adapter; served is
# `ask`'s own path (retrieval, the adapter where its router lets it act, every probe asked as a chat question)


@dataclass
class Probe:
    id: str
    kind: str
    input: str
    answers: list[list[str]]
    tags: list[str] = field(default_factory=list)


def load_probes(path: Path) -> list[Probe]:
    """Parse a JSON Lines eval file; raises EvalFormatError naming the line and the problem."""
    path = Path(path)
    try:
        if not path.is_file():
            raise EvalFormatError(f"{path}: no such eval file")
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise EvalFormatError(f"{path}: not UTF-8 text") from None
    except OSError as exc:  # unreadable, a name too long, ...
        raise EvalFormatError(f"{path}: cannot read ({exc.strerror})") from None
    probes, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalFormatError(f"{where}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise EvalFormatError(f"{where}: JSON nested too deeply to read") from None
        if not isinstance(obj, dict):
            raise EvalFormatError(f"{where}: a probe must be a JSON object")
        probes.append(_probe(obj, where, len(probes)))
        if probes[-1].id in seen:
            raise EvalFormatError(f"{where}: duplicate probe id {probes[-1].id!r}")
        seen.add(probes[-1].id)
    if not probes:
        raise EvalFormatError(f"{path}: no probes")
    return probes


def _probe(obj: dict, where: str, index: int) -> Probe:
    kind = obj.get("kind", "qa")
    if kind not in KINDS:
        raise EvalFormatError(f"{where}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
    text = obj.get("input")
    if not isinstance(text, str) or not text.strip():
        raise EvalFormatError(f"{where}: 'input' must be a non-empty string")
    answers = obj.get("answers")
    if isinstance(answers, str):
        answers = [[answers]]
    if (not isinstance(answers, list) or not answers
            or not all(isinstance(g, list) and g and all(isinstance(a, str) and a for a in g) for g in answers)):
        raise EvalFormatError(f"{where}: 'answers' must be a non-empty list of non-empty lists of strings")
    tags = obj.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise EvalFormatError(f"{where}: 'tags' must be a list of strings")
    return Probe(str(obj.get("id", index)), kind, text, answers, tags)


def is_correct(output: str, answers: list[list[str]]) -> bool:
    """Every group has at least one alternative in the output (case-insensitive)."""
    low = output.lower()
    return all(any(a.lower() in low for a in group) for group in answers)


def lost(before: dict, after: dict) -> list[str]:
    """The ids of probes one result (of `MemoryLLM.evaluate`) got right and a later one, on the same file, wrong."""
    return [b["id"] for b, a in zip(before["probes"], after["probes"]) if b["correct"] and not a["correct"]]


def score(probes: list[Probe], outputs: list[str], mode: str) -> dict:
    """Accuracy overall and by tag, plus per-probe records."""
    records, by_tag = [], {}
    for p, out in zip(probes, outputs):
        ok = is_correct(out, p.answers)
        records.append({"id": p.id, "kind": p.kind, "tags": p.tags, "correct": ok, "output": out})
        for t in p.tags:
            by_tag.setdefault(t, []).append(ok)
    n = len(records)
    return {"mode": mode, "n": n, "accuracy": sum(r["correct"] for r in records) / n if n else 0.0,
            "by_tag": {t: sum(v) / len(v) for t, v in sorted(by_tag.items())},
            "by_tag_n": {t: len(v) for t, v in sorted(by_tag.items())}, "probes": records}


def run(probes: list[Probe], prompt_ids: Callable[[Probe], list[int]], generate_batch, *, batch_size: int = 8,
        max_new_tokens: dict | None = None, progress=None) -> list[str]:
    """Greedy outputs for every probe, batched by kind and similar length."""
    max_new_tokens = max_new_tokens or {"cloze": 12, "qa": 64}
    outputs: list[str | None] = [None] * len(probes)
    for kind in KINDS:
        items = [(i, prompt_ids(p)) for i, p in enumerate(probes) if p.kind == kind]
        items.sort(key=lambda x: len(x[1]))
        for b in range(0, len(items), batch_size):
            chunk = items[b:b + batch_size]
            texts = generate_batch([ids for _, ids in chunk], max_new_tokens[kind])
            for (i, _), text in zip(chunk, texts):
                outputs[i] = text
            if progress is not None:
                progress(len(chunk))
    return [o or "" for o in outputs]
