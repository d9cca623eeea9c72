"""The SQLite connection every part of a Store shares: opening and migrating, the lock, write transactions,
the meta table and its generation counter."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from memory_llm.errors import StoreError
from memory_llm.store.migrations import MIGRATIONS, SCHEMA_VERSION

logger = logging.getLogger(__name__)

IN_CHUNK = 500  # values bound per `IN (...)`: SQLite caps a statement's parameters (999 before 3.32)


class Database:
    """One connection, guarded by a re-entrant lock (the connection is shared across threads)."""

    def __init__(self, path: Path, lock_timeout: float = 30.0):
        self.path, self.lock_timeout = path, lock_timeout
        self.lock = threading.RLock()
        try:
            self.conn = sqlite3.connect(path, timeout=lock_timeout, check_same_thread=False, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            try:
                os.chmod(path, 0o600)
            except OSError:  # not our file (e.g. a shared read-only home): it still opens
                logger.debug("cannot make %s private", path)
            self._migrate()
        except sqlite3.DatabaseError as exc:
            hint = "" if is_busy(exc) else "; run `mllm doctor`"
            raise StoreError(f"{path}: cannot open the memory database ({exc}){hint}") from None

    def _migrate(self) -> None:
        if self._schema_is_current():
            return
        with self.write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL)")
            done = {r[0] for r in db.execute("SELECT name FROM _migrations")}
            newer = done - {name for name, _ in MIGRATIONS}
            if newer:
                raise StoreError(f"{self.path} was written by a newer memory_llm (schema has {sorted(newer)[-1]});"
                                 " upgrade memory_llm to use this home")
            for name, fn in MIGRATIONS:
                if name not in done:
                    fn(db)
                    db.execute("INSERT INTO _migrations VALUES (?, ?)", (name, time.time()))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('generation', '0')")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def _schema_is_current(self) -> bool:
        """Nothing to migrate? Read without the write lock, so opening a home never waits for a writer."""
        try:
            done = {r[0] for r in self.conn.execute("SELECT name FROM _migrations")}
            ready = self.conn.execute(
                "SELECT count(*) FROM meta WHERE key IN ('generation', 'schema_version')").fetchone()[0]
        except sqlite3.OperationalError:  # a new home: no tables yet
            return False
        return done == {name for name, _ in MIGRATIONS} and ready == 2

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE): all or nothing, bumps nothing by itself."""
        with self.lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreError(self.busy_message(exc) if is_busy(exc)
                                 else f"{self.path}: cannot write ({exc})") from None
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException as exc:
                if self.conn.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
                    self.conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.DatabaseError):
                    raise StoreError(f"{self.path}: cannot write ({exc}); nothing was changed") from None
                raise

    def busy_message(self, exc: Exception) -> str:
        """The error for a lock held past lock_timeout by another process."""
        return (f"{self.path} is busy ({exc}) after waiting {self.lock_timeout:g} s; another mllm process is"
                " writing, try again (or raise lock_timeout)")

    def meta(self, key: str) -> str | None:
        """A value of the meta table (embedder, dim, generation, ...), or None."""
        with self.lock:
            row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def generation(self) -> int:
        """The write counter: it moves on every committed change of the memories."""
        return int(self.meta("generation") or 0)

    def bump_generation(self) -> int:
        """Advance the generation inside the current write transaction; return the one it replaced."""
        prev = int(self.conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
        self.conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(prev + 1),))
        return prev

    def close(self) -> None:
        """Close the connection."""
        with self.lock:
            self.conn.close()


def execute_in(db: sqlite3.Connection, sql: str, values: Sequence[Any], args: Sequence[Any] = ()) -> list[sqlite3.Row]:
    """Run `sql` once per IN_CHUNK values and return every row, in order.

    `{marks}` in `sql` becomes the placeholders of one chunk's values; `args` bind before them.
    """
    rows: list[sqlite3.Row] = []
    values = list(values)
    for i in range(0, len(values), IN_CHUNK):
        part = values[i:i + IN_CHUNK]
        rows += db.execute(sql.format(marks=",".join("?" * len(part))), [*args, *part]).fetchall()
    return rows


def is_busy(exc: sqlite3.Error) -> bool:
    """Whether SQLite gave up waiting for another connection's lock."""
    return "locked" in str(exc) or "busy" in str(exc)


def make_private_dir(path: Path) -> None:
    """Create the memory home, readable by its owner only."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StoreError(f"cannot create memory home {path}: {exc.strerror}") from None
