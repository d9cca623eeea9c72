"""Append-only schema migrations. Never edit one that has shipped; add a new one at the end."""

from __future__ import annotations

import sqlite3
from typing import Callable

MIGRATIONS: list[tuple[str, Callable[[sqlite3.Connection], None]]] = []


def migration(fn: Callable[[sqlite3.Connection], None]) -> Callable[[sqlite3.Connection], None]:
    MIGRATIONS.append((fn.__name__, fn))
    return fn


def run_script(db: sqlite3.Connection, script: str) -> None:
    """Execute statements one by one: executescript() would COMMIT the caller's transaction."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            db.execute(statement)
            statement = ""
    if statement.strip():
        raise ValueError(f"incomplete SQL statement: {statement.strip()[:80]}")


@migration
def m001_initial(db: sqlite3.Connection) -> None:
    run_script(
        db,
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE sources (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            namespace TEXT NOT NULL,
            uri TEXT NOT NULL,
            content_hash TEXT NOT NULL,
            created_at REAL NOT NULL,
            UNIQUE (namespace, uri)
        );
        CREATE TABLE memories (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            source_id INTEGER NOT NULL REFERENCES sources(id) ON DELETE CASCADE,
            namespace TEXT NOT NULL,
            position INTEGER NOT NULL,
            text TEXT NOT NULL,
            content_hash TEXT NOT NULL,
            created_at REAL NOT NULL,
            embedding BLOB NOT NULL
        );
        CREATE INDEX memories_source ON memories(source_id);
        CREATE INDEX memories_ns_hash ON memories(namespace, content_hash);
        CREATE VIRTUAL TABLE memories_fts USING fts5(text, content='memories', content_rowid='id');
        CREATE TRIGGER memories_ai AFTER INSERT ON memories BEGIN
            INSERT INTO memories_fts(rowid, text) VALUES (new.id, new.text);
        END;
        CREATE TRIGGER memories_ad AFTER DELETE ON memories BEGIN
            INSERT INTO memories_fts(memories_fts, rowid, text) VALUES ('delete', old.id, old.text);
        END;
        """
    )


@migration
def m002_consolidation(db: sqlite3.Connection) -> None:
    run_script(
        db,
        """
        CREATE TABLE training_items (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            memory_id INTEGER NOT NULL REFERENCES memories(id) ON DELETE CASCADE,
            namespace TEXT NOT NULL,
            kind TEXT NOT NULL,
            prompt TEXT NOT NULL,
            answer TEXT NOT NULL,
            held_out INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL
        );
        CREATE INDEX training_items_memory ON training_items(memory_id);
        CREATE TABLE ledger (
            memory_id INTEGER NOT NULL,
            adapter_version TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (memory_id, adapter_version)
        );
        """,
    )


@migration
def m003_prompt_library(db: sqlite3.Connection) -> None:
    """Prompt templates, rated exemplars and the answer log (feedback and exemplars point at answers)."""
    run_script(
        db,
        """
        CREATE TABLE templates (
            name TEXT PRIMARY KEY,
            description TEXT NOT NULL,
            system TEXT NOT NULL,
            user TEXT NOT NULL,
            closed_system TEXT,
            embedding BLOB,
            created_at REAL NOT NULL
        );
        CREATE TABLE answers (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            namespace TEXT NOT NULL,
            session_id TEXT,
            question TEXT NOT NULL,
            answer TEXT NOT NULL,
            template TEXT,
            exemplar_ids TEXT NOT NULL DEFAULT '[]',
            memory_ids TEXT NOT NULL DEFAULT '[]',
            model TEXT,
            adapter TEXT,
            feedback TEXT,
            correction TEXT,
            created_at REAL NOT NULL
        );
        CREATE INDEX answers_session ON answers(namespace, session_id);
        CREATE TABLE exemplars (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            namespace TEXT NOT NULL,
            question TEXT NOT NULL,
            answer TEXT NOT NULL,
            rating INTEGER NOT NULL DEFAULT 1,
            source TEXT NOT NULL,
            answer_id INTEGER REFERENCES answers(id) ON DELETE SET NULL,
            embedding BLOB,
            created_at REAL NOT NULL,
            UNIQUE (namespace, question, answer)
        );
        CREATE INDEX exemplars_ns ON exemplars(namespace, rating);
        """,
    )


SCHEMA_VERSION = len(MIGRATIONS)
