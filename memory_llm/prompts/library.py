"""The prompt library: templates chosen by name or by similarity, exemplars chosen as few-shot turns."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from memory_llm.errors import InputError
from memory_llm.prompts.files import check_template, default_templates, read_library, write_library
from memory_llm.store import Exemplar, Store, Template

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "default"


@dataclass
class PromptChoice:
    """The template and exemplars chosen for one question, and why."""

    template: Template | None
    how: str  # "named", "similarity", "fallback" (nothing matched well: the default) or "builtin" (no templates)
    score: float | None = None
    exemplars: list[Exemplar] = field(default_factory=list)
    exemplar_scores: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.template.name if self.template is not None else "builtin"

    def shots(self) -> list[tuple[str, str]]:
        """Few-shot turns, the most similar last (nearest the question)."""
        return [(e.question, e.answer) for e in reversed(self.exemplars)]

    def as_dict(self) -> dict:
        return {"template": self.name, "template_chosen_by": self.how,
                "template_score": None if self.score is None else round(self.score, 4),
                "exemplars": [{"id": e.id, "question": e.question, "rating": e.rating, "score": round(s, 4)}
                              for e, s in zip(self.exemplars, self.exemplar_scores)]}


class PromptLibrary:
    """Templates and exemplars of one home (SQLite), with the selection used at ask time.

    Args:
        store: the home's Store.
        embed: maps texts to L2-normalised vectors with the home's embedder (called only when needed).
        settings: exemplar_k, exemplar_tokens, exemplar_min_rating, exemplar_min_similarity,
            template_min_similarity.
    """

    def __init__(self, store: Store, embed: Callable[[list[str]], np.ndarray], settings):
        self.store, self._embed, self.settings = store, embed, settings
        if not self.store.meta("prompts_seeded"):  # parse the shipped file only for a home not seeded yet
            self.store.seed_templates(default_templates())

    # ---- templates ----------------------------------------------------------------------------------
    def templates(self) -> list[Template]:
        return self.store.templates()

    def get(self, name: str) -> Template:
        t = self.store.template(name)
        if t is None:
            known = ", ".join(t.name for t in self.store.templates()) or "none"
            raise InputError(f"unknown template {name!r} (known: {known})")
        return t

    def add(self, template: Template, replace: bool = False) -> None:
        check_template(template)
        if not replace and self.store.template(template.name) is not None:
            raise InputError(f"template {template.name!r} exists; use --replace to overwrite it")
        self.store.put_templates([template])

    def remove(self, name: str) -> None:
        if not self.store.remove_template(name):
            self.get(name)  # raises the unknown-template error

    # ---- files --------------------------------------------------------------------------------------
    def import_file(self, path: str | Path, namespace: str) -> tuple[int, int]:
        """Add/replace the file's templates and add its exemplars, all or nothing. Returns (templates,
        exemplars added)."""
        templates, exemplars = read_library(Path(path), namespace)
        return self.store.put_templates(templates, exemplars)

    def export_file(self, path: str | Path, namespace: str | None = None, exemplars: bool = True) -> tuple[int, int]:
        """Write the templates and (the namespace's, or all) exemplars to a TOML or YAML file."""
        templates = self.templates()
        ex = self.store.exemplars(namespace) if exemplars else []
        write_library(Path(path), templates, ex)
        return len(templates), len(ex)

    # ---- selection ----------------------------------------------------------------------------------
    def choose(self, question_vector: Callable[[], np.ndarray], namespace: str, name: str | None = None,
               use_exemplars: bool = True, count_tokens: Callable[[str], int] | None = None) -> PromptChoice:
        """The template (named, or the one whose description is most similar to the question) and the most
        similar good exemplars of the namespace that fit the token budget.

        Args:
            question_vector: returns the question's embedding (called only if something needs it).
        """
        s = self.settings
        if name is not None:
            choice = PromptChoice(self.get(name), "named")
        else:
            choice = self._by_similarity(question_vector)
        if use_exemplars and s.exemplar_k > 0:
            self._add_exemplars(choice, question_vector, namespace, count_tokens or (lambda t: len(t.split())))
        return choice

    def _by_similarity(self, question_vector) -> PromptChoice:
        templates, vectors = self.store.template_vectors()
        if not templates:
            return PromptChoice(None, "builtin")
        vectors = self._complete(vectors, [t.description for t in templates], [t.name for t in templates],
                                 self.store.set_template_vectors)
        scores = np.vstack(vectors) @ question_vector()
        best = int(np.argmax(scores))
        if scores[best] >= self.settings.template_min_similarity:
            return PromptChoice(templates[best], "similarity", float(scores[best]))
        fallback = next((i for i, t in enumerate(templates) if t.name == DEFAULT_TEMPLATE), best)
        return PromptChoice(templates[fallback], "fallback", float(scores[fallback]))

    def _complete(self, vectors: list, texts: list[str], keys: list, save) -> list[np.ndarray]:
        """Embed the texts whose vector is not stored yet (once: save(pairs of key, vector) stores them)."""
        missing = [i for i, v in enumerate(vectors) if v is None]
        if missing:
            new = self._embed([texts[i] for i in missing])
            save([(keys[i], v) for i, v in zip(missing, new)])
            for i, v in zip(missing, new):
                vectors[i] = v
        return vectors

    def _add_exemplars(self, choice: PromptChoice, question_vector, namespace: str, count_tokens) -> None:
        s = self.settings
        exemplars, vectors = self.store.exemplar_vectors(namespace, s.exemplar_min_rating)
        if not exemplars:
            return
        vectors = self._complete(vectors, [e.question for e in exemplars], [e.id for e in exemplars],
                                 self.store.set_exemplar_vectors)
        scores = np.vstack(vectors) @ question_vector()
        used = 0
        for i in np.argsort(-scores, kind="stable"):
            if scores[i] < s.exemplar_min_similarity or len(choice.exemplars) >= s.exemplar_k:
                break
            cost = count_tokens(exemplars[i].question) + count_tokens(exemplars[i].answer)
            if used + cost > s.exemplar_tokens:
                continue
            used += cost
            choice.exemplars.append(exemplars[i])
            choice.exemplar_scores.append(float(scores[i]))
