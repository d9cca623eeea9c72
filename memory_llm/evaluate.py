"""Evaluation: probe files (docs/eval-format.md), modes, accuracy overall and by tag."""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from memory_llm.errors import EvalFormatError, InputError

logger = logging.getLogger(__name__)

HYBRID_MARGIN = 0.5  # eval --mode hybrid keeps the closed answer when its confidence (mean log-probability of
# its first tokens) beats the rag answer's by more than this (nats); docs/lab-notes.md, "Hybrid by confidence"

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


def evaluate_file(path: str | Path, mode: str, *, answerer, search: Callable, k: int | None, namespace: str,
                  limit: int | None = None, progress=None, prompt: str | None = None, exemplars: bool = True,
                  qa_new_tokens: int = 64) -> dict:
    """Run an eval file (docs/eval-format.md) in a mode; returns accuracy overall and by tag. `qa` probes
    are prompted as `ask` does (template by name or similarity, exemplars of the namespace) and get
    qa_new_tokens; `cloze` probes are raw continuations (12 tokens)."""
    from memory_llm.retrieve import pack

    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    probes = load_probes(Path(path))[:limit]
    if prompt is not None:
        answerer.prompts.get(prompt)  # an unknown template fails before any model loads
    served = answerer.served_for(namespace)  # a tenant namespace is evaluated on its own adapter
    gen = served.generator
    served.sync_staleness()
    adapted = mode in ("closed", "hybrid")
    if adapted and served.adapter_version is None:
        raise InputError(f"mode {mode} needs a consolidated adapter: run `mllm consolidate` first")
    start = time.perf_counter()

    def outputs_of(retrieval: bool, confidence: bool = False) -> tuple[list[str], list[float]]:
        """Every probe's output with retrieval (the base model reads the sources) or without (the adapter
        answers, when adapted), and with `confidence` each output's confidence (else none)."""
        asked: dict[str, tuple] = {}  # probe id → its prompt ids
        sure: dict[tuple, float] = {}

        def prompt_ids(p: Probe) -> list[int]:
            if p.kind == "qa":
                ids = answerer.prepare(p.input, k=k, namespace=namespace, use_memory=retrieval, prompt=prompt,
                                    exemplars=exemplars)[1][0].tolist()
            else:
                context = []
                if retrieval:
                    hits = pack(search(p.input, k, namespace), gen.count_tokens,
                                answerer.settings.context_tokens)
                    context = [h.memory.live_text for h in hits]
                text = ("\n\n".join(context) + "\n\n" + p.input) if context else p.input
                ids = gen.tokenizer(text, add_special_tokens=False)["input_ids"]
            asked[p.id] = tuple(ids)
            return ids

        def generate(prompts: list, new_tokens: int) -> list[str]:
            if not confidence:
                return gen.generate_batch(prompts, new_tokens)
            pairs = gen.generate_batch(prompts, new_tokens, confidence=True)
            sure.update((tuple(ids), value) for ids, (_, value) in zip(prompts, pairs))
            return [text for text, _ in pairs]

        with (nullcontext() if adapted and not retrieval else served.base_context()):
            outputs = run(probes, prompt_ids, generate, progress=progress,
                             max_new_tokens={"cloze": 12, "qa": qa_new_tokens})
        return outputs, [sure[asked[p.id]] for p in probes] if confidence else []

    paths: dict[str, str] = {}
    if mode == "served":
        outputs = _served_outputs(answerer, probes, paths, k=k, namespace=namespace, prompt=prompt,
                                  exemplars=exemplars, progress=progress, new_tokens=qa_new_tokens)
    elif mode != "hybrid":
        outputs = outputs_of(mode == "rag")[0]
    else:  # per probe, the more confident of the adapter without sources and the base model reading them
        (closed, sure_closed), (rag, sure_rag) = outputs_of(False, True), outputs_of(True, True)
        outputs = [c if sc > sr + HYBRID_MARGIN else r for c, r, sc, sr in zip(closed, rag, sure_closed, sure_rag)]
    result = score(probes, outputs, mode)
    if mode == "served":
        for record in result["probes"]:
            record["path"] = paths[record["id"]]
        result["paths"] = {p: sum(r["path"] == p for r in result["probes"]) for p in sorted(set(paths.values()))}
    result["adapter"] = served.adapter_version if adapted or mode == "served" else None
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["model"] = answerer.settings.model
    return result

def _served_outputs(answerer, probes: list, paths: dict, *, k, namespace: str, prompt, exemplars: bool,
                    progress, new_tokens: int) -> list[str]:
    """Every probe answered as `ask` answers it by default (its prompt, retrieval or its skip, the adapter
    where its router lets it act, greedy), batched; `paths` gets each probe's path (see Answer.path)."""

    asked: dict[tuple, list] = {}  # prompt ids → [(probe id, sources?, retrieval skipped?)] (ids may repeat)

    def prompt_ids(p) -> list[int]:
        hits, ids, *_, skipped = answerer.prepare(p.input, k=k, namespace=namespace, use_memory=True,
                                               prompt=prompt, exemplars=exemplars)
        ids = ids[0].tolist()
        asked.setdefault(tuple(ids), []).append((p.id, bool(hits), skipped is not None))
        return ids

    def generate(prompts: list, new: int) -> list[str]:
        served = answerer.served_for(namespace)
        texts = served.generator.generate_batch(prompts, new)
        acted = served.acted_rows(len(prompts))
        for ids, on in zip(prompts, acted):
            for pid, sources, skipped in asked[tuple(ids)]:
                paths[pid] = "adapter" if skipped or (on and not sources) else \
                    ("retrieval+adapter" if on else "retrieval") if sources else "model"
        return texts

    return run(probes, prompt_ids, generate, progress=progress,
                  max_new_tokens={"cloze": new_tokens, "qa": new_tokens})
