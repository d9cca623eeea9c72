"""SQLite records of the prompt library: templates, rated exemplars and the answer log (a part of Store)."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from memory_llm.store.db import Database, execute_in


@dataclass
class Template:
    """A named prompt: system prompt, user template with {context} and {question} slots, a description
    that questions are matched against, and the system prompt used when no sources were found."""

    name: str
    description: str
    system: str
    user: str
    closed_system: str | None = None

    def as_dict(self) -> dict:
        """The template as it is written to a prompt file."""
        d = {"name": self.name, "description": self.description, "system": self.system, "user": self.user}
        if self.closed_system:
            d["closed_system"] = self.closed_system
        return d


@dataclass
class Exemplar:
    """A rated question/answer pair, used as a few-shot turn; rating > 0 means good."""

    id: int | None
    namespace: str
    question: str
    answer: str
    rating: int = 1
    source: str = "import"
    answer_id: int | None = None
    created_at: float = 0.0

    def as_dict(self) -> dict:
        """The exemplar as JSON-ready fields."""
        return {"id": self.id, "namespace": self.namespace, "question": self.question, "answer": self.answer,
                "rating": self.rating, "source": self.source, "answer_id": self.answer_id}


@dataclass
class LoggedAnswer:
    """One row of the answer log: what was asked and answered, and what the answer was built from."""

    id: int
    namespace: str
    session_id: str | None
    question: str
    answer: str
    template: str | None
    exemplar_ids: list[int] = field(default_factory=list)
    memory_ids: list[int] = field(default_factory=list)
    model: str | None = None
    adapter: str | None = None
    feedback: str | None = None
    correction: str | None = None
    created_at: float = 0.0

    def as_dict(self) -> dict:
        """The logged answer as JSON-ready fields."""
        return dict(self.__dict__)


_TEMPLATE_COLS = "name, description, system, user, closed_system"
_EXEMPLAR_COLS = "id, namespace, question, answer, rating, source, answer_id, created_at"
_ANSWER_COLS = ("id, namespace, session_id, question, answer, template, exemplar_ids, memory_ids, model, adapter,"
                " feedback, correction, created_at")


def _answer(row: Sequence[Any]) -> LoggedAnswer:
    """A row of _ANSWER_COLS as a LoggedAnswer (the id lists are stored as JSON)."""
    a = LoggedAnswer(*row)
    a.exemplar_ids, a.memory_ids = json.loads(a.exemplar_ids), json.loads(a.memory_ids)
    return a


class PromptRecords:
    """Templates, exemplars and the answer log of one home."""

    def __init__(self, database: Database):
        self.database = database

    # ---- templates ----------------------------------------------------------------------------------
    def templates(self) -> list[Template]:
        """Every template, by name."""
        with self.database.lock:
            rows = self.database.conn.execute("SELECT " + _TEMPLATE_COLS + " FROM templates"
                                              " ORDER BY name").fetchall()
        return [Template(*r) for r in rows]

    def template(self, name: str) -> Template | None:
        """The template of that name, or None."""
        with self.database.lock:
            row = self.database.conn.execute("SELECT " + _TEMPLATE_COLS + " FROM templates"
                                             " WHERE name = ?", (name,)).fetchone()
        return Template(*row) if row else None

    def seed_templates(self, templates: Sequence[Template]) -> None:
        """Install the shipped templates once per home (a template the user removed stays removed)."""
        if self.database.meta("prompts_seeded"):
            return
        with self.database.write() as db:
            if db.execute("SELECT 1 FROM meta WHERE key = 'prompts_seeded'").fetchone():
                return
            self._put_templates(db, templates, replace=False)
            db.execute("INSERT INTO meta VALUES ('prompts_seeded', '1')")

    def put_templates(self, templates: Sequence[Template], exemplars: Sequence[Exemplar] = ()) -> tuple[int, int]:
        """Add or replace templates (by name) and add exemplars, in ONE transaction.
        Returns (templates written, exemplars added); an exemplar already stored is skipped."""
        with self.database.write() as db:
            self._put_templates(db, templates, replace=True)
            added = self._add_exemplars(db, exemplars)
        return len(templates), len(added)

    @staticmethod
    def _put_templates(db: sqlite3.Connection, templates: Sequence[Template], replace: bool) -> None:
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        now = time.time()
        db.executemany(f"{verb} INTO templates (name, description, system, user, closed_system, embedding,"
                       " created_at) VALUES (?, ?, ?, ?, ?, NULL, ?)",
                       [(t.name, t.description, t.system, t.user, t.closed_system, now) for t in templates])

    def remove_template(self, name: str) -> bool:
        """Remove a template; False when there was none of that name."""
        with self.database.write() as db:
            return db.execute("DELETE FROM templates WHERE name = ?", (name,)).rowcount > 0

    def template_vectors(self) -> tuple[list[Template], list[np.ndarray | None]]:
        """Every template with its description embedding (None where not embedded yet)."""
        with self.database.lock:
            rows = self.database.conn.execute("SELECT " + _TEMPLATE_COLS + ", embedding FROM templates"
                                              " ORDER BY name").fetchall()
        return [Template(*r[:5]) for r in rows], [_vector(r[5]) for r in rows]

    def set_template_vectors(self, pairs: Sequence[tuple[str, np.ndarray]]) -> None:
        """Store the description embeddings of templates, as (name, vector) pairs."""
        with self.database.write() as db:
            db.executemany("UPDATE templates SET embedding = ? WHERE name = ?",
                           [(_blob(v), name) for name, v in pairs])

    # ---- exemplars ----------------------------------------------------------------------------------
    def exemplars(self, namespace: str | None = None, min_rating: int | None = None) -> list[Exemplar]:
        """Exemplars (of one namespace if given) rated at least min_rating, best rated first; retired ones (their
        answer superseded) are left out.

        For consolidation: `store.exemplars(min_rating=1)` are the good ones, to distil into the adapter.
        """
        sql = f"SELECT {_EXEMPLAR_COLS} FROM exemplars WHERE retired_at IS NULL"
        args: list = []
        if namespace is not None:
            sql += " AND namespace = ?"
            args.append(namespace)
        if min_rating is not None:
            sql += " AND rating >= ?"
            args.append(min_rating)
        with self.database.lock:
            return [Exemplar(*r) for r in self.database.conn.execute(sql + " ORDER BY rating DESC, id", args)]

    def exemplar_vectors(self, namespace: str, min_rating: int) -> tuple[list[Exemplar], list[np.ndarray | None]]:
        """A namespace's exemplars rated at least min_rating (not retired), with their question embeddings (None if
        not yet)."""
        with self.database.lock:
            rows = self.database.conn.execute(f"SELECT {_EXEMPLAR_COLS}, embedding FROM exemplars WHERE namespace = ?"
                                              " AND rating >= ? AND retired_at IS NULL ORDER BY id",
                                              (namespace, min_rating)).fetchall()
        return [Exemplar(*r[:8]) for r in rows], [_vector(r[8]) for r in rows]

    def set_exemplar_vectors(self, pairs: Sequence[tuple[int, np.ndarray]]) -> None:
        """Store the question embeddings of exemplars, as (id, vector) pairs."""
        with self.database.write() as db:
            db.executemany("UPDATE exemplars SET embedding = ? WHERE id = ?", [(_blob(v), i) for i, v in pairs])

    def add_exemplars(self, exemplars: Sequence[Exemplar]) -> list[int]:
        """Add exemplars in one transaction; returns the new ids (one already stored is skipped)."""
        with self.database.write() as db:
            return self._add_exemplars(db, exemplars)

    @staticmethod
    def _add_exemplars(db: sqlite3.Connection, exemplars: Sequence[Exemplar]) -> list[int]:
        ids, now = [], time.time()
        for e in exemplars:
            cur = db.execute("INSERT OR IGNORE INTO exemplars (namespace, question, answer, rating, source, answer_id,"
                             " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (e.namespace, e.question, e.answer, e.rating, e.source, e.answer_id, now))
            if cur.rowcount:
                ids.append(cur.lastrowid)
        return ids

    def retire(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Retire exemplars whose answer a supersession made stale: (exemplar id, supersession id) pairs. A retired
        exemplar is no longer a shot nor distilled; reverting the supersession brings it back."""
        if pairs:
            with self.database.write() as db:
                db.executemany("UPDATE exemplars SET retired_at = ?, retired_by = ? WHERE id = ? AND retired_at IS"
                               " NULL", [(time.time(), sid, eid) for eid, sid in pairs])

    @staticmethod
    def unretire(db: sqlite3.Connection, supersession_ids: Sequence[int]) -> None:
        """Inside a write transaction: the exemplars these (reverted) supersessions retired return."""
        if supersession_ids:
            db.execute(f"UPDATE exemplars SET retired_at = NULL, retired_by = NULL WHERE retired_by IN"
                       f" ({','.join('?' * len(supersession_ids))})", list(supersession_ids))

    def retired(self, exemplar_ids: Sequence[int]) -> set[int]:
        """Which of these exemplars are retired (or gone)."""
        ids = [int(i) for i in exemplar_ids]
        with self.database.lock:
            rows = execute_in(self.database.conn, "SELECT id FROM exemplars WHERE retired_at IS NULL AND id IN"
                              " ({marks})", ids)
        kept = {r[0] for r in rows}
        return {i for i in ids if i not in kept}

    def remove_exemplar(self, exemplar_id: int, namespace: str | None = None) -> bool:
        """Remove an exemplar (only of `namespace`, when given); False when there was none."""
        sql = "DELETE FROM exemplars WHERE id = ?" + (" AND namespace = ?" if namespace is not None else "")
        with self.database.write() as db:
            return db.execute(sql, [exemplar_id] + ([namespace] if namespace is not None else [])).rowcount > 0

    # ---- answer log and feedback --------------------------------------------------------------------
    def log_answer(self, *, namespace: str, question: str, answer: str, template: str | None,
                   exemplar_ids: Sequence[int], memory_ids: Sequence[int], model: str | None,
                   adapter: str | None, session_id: str | None = None) -> int:
        """Log an answer with what it was built from; returns its id (feedback names it)."""
        with self.database.write() as db:
            cur = db.execute(
                "INSERT INTO answers (namespace, session_id, question, answer, template, exemplar_ids, memory_ids,"
                " model, adapter, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (namespace, session_id, question, answer, template, json.dumps(list(exemplar_ids)),
                 json.dumps(list(memory_ids)), model, adapter, time.time()))
            return cur.lastrowid

    def logged_answer(self, answer_id: int, namespace: str | None = None) -> LoggedAnswer | None:
        """An answer of the log (only if it belongs to `namespace`, when given)."""
        sql = f"SELECT {_ANSWER_COLS} FROM answers WHERE id = ?" + (" AND namespace = ?" if namespace else "")
        with self.database.lock:
            row = self.database.conn.execute(sql, [answer_id] + ([namespace] if namespace else [])).fetchone()
        return _answer(row) if row else None

    def answers(self, namespace: str, session_id: str | None = None, limit: int = 100) -> list[LoggedAnswer]:
        """The latest answers of a namespace (of one chat session if given), oldest first."""
        sql = f"SELECT {_ANSWER_COLS} FROM answers WHERE namespace = ?"
        args: list = [namespace]
        if session_id is not None:
            sql += " AND session_id = ?"
            args.append(session_id)
        with self.database.lock:
            rows = self.database.conn.execute(sql + " ORDER BY id DESC LIMIT ?", [*args, limit]).fetchall()
        return [_answer(r) for r in reversed(rows)]

    def record_feedback(self, answer: LoggedAnswer, kind: str, correction: str | None = None) -> list[int]:
        """Apply feedback in ONE transaction. good: the answer becomes an exemplar (or its exemplar gains a
        point); bad: the exemplars it used and its own exemplar lose a point; correct: as bad, and the
        correction becomes an exemplar rated 2. Returns the ids of the exemplars added or rated up."""
        with self.database.write() as db:
            db.execute("UPDATE answers SET feedback = ?, correction = ? WHERE id = ?", (kind, correction, answer.id))
            own = db.execute("SELECT id FROM exemplars WHERE answer_id = ? AND source = 'feedback'",
                             (answer.id,)).fetchone()
            if kind == "good":
                if own:
                    db.execute("UPDATE exemplars SET rating = rating + 1 WHERE id = ?", (own[0],))
                    return [own[0]]
                return self._add_exemplars(db, [Exemplar(None, answer.namespace, answer.question, answer.answer, 1,
                                                         "feedback", answer.id)])
            lowered = list(answer.exemplar_ids) + ([own[0]] if own else [])
            if lowered:
                db.execute(f"UPDATE exemplars SET rating = rating - 1 WHERE id IN ({','.join('?' * len(lowered))})",
                           lowered)
            if kind == "correct":
                new = self._add_exemplars(db, [Exemplar(None, answer.namespace, answer.question, correction, 2,
                                                        "correction", answer.id)])
                if not new:  # the same correction again: trust it more
                    db.execute("UPDATE exemplars SET rating = rating + 1 WHERE namespace = ? AND question = ?"
                               " AND answer = ?", (answer.namespace, answer.question, correction))
                return new
            return []


def _vector(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype=np.float32)


def _blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=np.float32).tobytes()
