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


@migration
def m004_time_and_supersession(db: sqlite3.Connection) -> None:
    """Time on every memory (valid_from: when it became true; created_at stays when it was learned), supersession
    (a memory replaced as a whole leaves retrieval: superseded_at; the chain, its reasons and reversals in
    `supersessions`, where a row with a sentence retires one sentence of a memory that otherwise stays), retired
    exemplars, and the text each memory's training items were synthesized from."""
    run_script(
        db,
        """
        ALTER TABLE memories ADD COLUMN valid_from REAL;
        ALTER TABLE memories ADD COLUMN superseded_at REAL;
        CREATE INDEX memories_superseded ON memories(namespace, superseded_at);
        CREATE TABLE supersessions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            namespace TEXT NOT NULL,
            old_id INTEGER NOT NULL,
            new_id INTEGER,
            sentence TEXT,
            reason TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            reverted_at REAL
        );
        CREATE INDEX supersessions_old ON supersessions(old_id);
        CREATE INDEX supersessions_new ON supersessions(new_id);
        ALTER TABLE exemplars ADD COLUMN retired_at REAL;
        ALTER TABLE exemplars ADD COLUMN retired_by INTEGER;
        ALTER TABLE training_items ADD COLUMN text_hash TEXT;
        """,
    )


SCHEMA_VERSION = len(MIGRATIONS)
