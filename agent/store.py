"""The agent's SQLite database: outbox, egress ledger and counters in one file.

One file, because the ledger's "delivered" entry and the outbox deletion must
commit in one transaction. WAL mode lets ``agentctl audit`` read while the
daemon writes. ``synchronous=FULL``: every commit is fsynced to the WAL before
it returns, so an approved envelope survives kill -9 *and* power loss (NORMAL
would survive kill -9 but may lose the last commits on power loss).

A database that SQLite reports as corrupt is moved aside with a timestamped
name and a fresh one is started; the move is logged and recorded as the first
entry of the new ledger.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

from agent.errors import StateError

DB_NAME = "agent.db"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    class TEXT NOT NULL,
    ts TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    n INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    prev TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_ts ON ledger(ts);
"""

log = structlog.get_logger(__name__)


def db_path(state_dir: Path) -> Path:
    """Where the database lives."""
    return state_dir / DB_NAME


def _configure(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=5000")


def _check(conn: sqlite3.Connection) -> None:
    row = conn.execute("PRAGMA quick_check").fetchone()
    if row is None or row[0] != "ok":
        raise sqlite3.DatabaseError(f"quick_check: {row[0] if row else 'no answer'}")
    conn.executescript(_SCHEMA)
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))


def open_db(state_dir: Path) -> tuple[sqlite3.Connection, str | None]:
    """Open (creating) the database; returns it and, if an old one was moved aside, why."""
    path = db_path(state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create the state directory {state_dir}: {exc.strerror}") from exc
    moved: str | None = None
    for attempt in range(2):
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.OperationalError as exc:
            raise StateError(f"cannot open {path}: {exc}") from exc
        try:
            _configure(conn)
            _check(conn)
            if path.exists():
                os.chmod(path, 0o640)
            return conn, moved
        except sqlite3.DatabaseError as exc:
            conn.close()
            if attempt or (isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)):
                raise StateError(f"cannot use {path}: {exc}") from exc
            aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(path) + suffix)
                if src.exists():
                    src.rename(Path(str(aside) + suffix))
            moved = f"{path} was corrupt ({exc}); moved aside to {aside}"
            log.error(
                "database_corrupt_moved_aside", path=str(path), aside=str(aside), error=str(exc)
            )
    raise AssertionError("unreachable")


def open_readonly(state_dir: Path) -> sqlite3.Connection:
    """Open the database for reading only (``agentctl audit``), daemon running or not."""
    path = db_path(state_dir)
    if not path.exists():
        raise StateError(
            f"no agent database at {path}: the daemon has not run yet with state_dir {state_dir}"
        )
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("SELECT 1 FROM ledger LIMIT 1")
    except sqlite3.Error as exc:
        raise StateError(f"cannot read {path}: {exc}") from exc
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection, what: str | None = None) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception.

    With ``what``, SQLite's errors leave as :class:`StateError` ("``what``: reason"),
    so callers above the state layer never see ``sqlite3``.
    """
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if what is None:
            raise
        raise StateError(f"{what}: {exc}") from exc
