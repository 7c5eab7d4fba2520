"""The agent's SQLite database: outbox, egress ledger and counters in one file.

One file, because the ledger's "delivered" entry and the outbox deletion must
commit in one transaction. WAL mode lets ``agentctl audit`` read while the
daemon writes. ``synchronous=FULL``: every commit is fsynced to the WAL before
it returns, so an approved envelope survives kill -9 *and* power loss (NORMAL
would survive kill -9 but may lose the last commits on power loss).

A database that SQLite reports as corrupt is moved aside with a timestamped
name and a fresh one is started; the move is logged, the queued envelopes that
can still be read are salvaged (:mod:`agent.salvage`) and the loss is recorded
as the first entry of the new ledger (:mod:`agent.anchor` says what was lost).
Each database is given a random ``db_id`` when it is created, so that one put
in its place is told apart from the one the agent last wrote.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import structlog

from agent.errors import StateError, StatePermissionDenied

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
-- NOC command ids already handled (agent/uplink/commands.py). Created here with the rest,
-- so that no later component needs to write the schema on a disk that may be full by then.
CREATE TABLE IF NOT EXISTS seen_commands (id TEXT PRIMARY KEY, ts REAL NOT NULL);
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


def _check(conn: sqlite3.Connection) -> bool:
    """Check the file and create what is missing; True when there was no schema at all."""
    row = conn.execute("PRAGMA quick_check").fetchone()
    if row is None or row[0] != "ok":
        raise sqlite3.DatabaseError(f"quick_check: {row[0] if row else 'no answer'}")
    created = conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
    conn.executescript(_SCHEMA)
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('db_id', ?)", (secrets.token_hex(8),))
    return bool(created)


class Opened(NamedTuple):
    """The database as the daemon opened it, and what that took."""

    conn: sqlite3.Connection
    created: bool  # there was no database (absent, empty, or moved aside just now)
    moved: str | None = None  # why an old one was moved aside
    aside: Path | None = None  # where it went


def open_store(state_dir: Path) -> Opened:
    """Open (creating) the database; a corrupt one is moved aside and a fresh one started."""
    path = db_path(state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create the state directory {state_dir}: {exc.strerror}") from exc
    moved: str | None = None
    aside: Path | None = None
    for attempt in range(2):
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.OperationalError as exc:
            raise StateError(f"cannot open {path}: {exc}") from exc
        try:
            _configure(conn)
            created = _check(conn)
            if path.exists():
                os.chmod(path, 0o640)
            return Opened(conn, created or moved is not None, moved, aside)
        except sqlite3.DatabaseError as exc:
            conn.close()
            # Only damage moves a database aside: a full disk, an I/O error or a lock
            # (OperationalError) says nothing about the file, and a retry may well work.
            if attempt or isinstance(exc, sqlite3.OperationalError):
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


def open_db(state_dir: Path) -> tuple[sqlite3.Connection, str | None]:
    """Open (creating) the database; returns it and, if an old one was moved aside, why."""
    opened = open_store(state_dir)
    return opened.conn, opened.moved


def database_id(conn: sqlite3.Connection) -> str:
    """The random name this database was given when it was created (see :mod:`agent.anchor`)."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'db_id'").fetchone()
    return str(row[0]) if row else ""


def open_readonly(state_dir: Path) -> sqlite3.Connection:
    """Open the database for reading only (``agentctl audit``), daemon running or not."""
    path = db_path(state_dir)
    for where in (state_dir, path):
        if where.exists() and not os.access(where, os.R_OK | (os.X_OK if where.is_dir() else 0)):
            raise StatePermissionDenied(
                f"cannot read {where}: permission denied; run as root or as a member of the "
                "agent's group"
            )
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


class Follower(Protocol):
    """What keeps in memory a state that a transaction changes (the ledger's head): marked
    before the transaction, rewound to the mark when it rolls back."""

    def mark(self) -> Any:
        """The state to come back to."""
        ...

    def rewind(self, mark: Any) -> None:
        """Come back to ``mark``."""
        ...


@contextmanager
def transaction(
    conn: sqlite3.Connection, what: str, *, follows: Follower | None = None
) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception: the one way the agent
    writes SQLite.

    SQLite's errors leave as :class:`StateError` ("``what``: reason"), so no caller above
    the state layer sees ``sqlite3``. ``follows`` (the ledger, whose head lives in memory
    too) is rewound when the transaction does not commit, a failed COMMIT included.
    """
    mark = follows.mark() if follows is not None else None
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            # A COMMIT that failed (SQLITE_FULL) may leave the transaction open, or SQLite
            # may have rolled it back already; either way the next BEGIN must find none.
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the first error is the one worth reporting
            raise
    except BaseException as exc:
        if follows is not None:
            follows.rewind(mark)
        if isinstance(exc, sqlite3.Error):
            raise StateError(f"{what}: {exc}") from exc
        raise
