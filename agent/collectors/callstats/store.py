"""The call-statistics state file: checkpoint, open counters and sent revisions, together.

One SQLite file (WAL) in the state directory holds everything a restart needs:
the source checkpoint, the counters of every bucket not yet offered, what was
offered for each bucket (revision, body, approved or refused) and, for
MariaDB, short hashes of the rows already counted inside the look-back window.
Each batch of rows is written in one transaction, so after any crash (kill -9
included) the checkpoint and the counters agree: no row is counted twice, none
skipped.

Bucket states: ``open`` (never offered), ``sent`` (offered and approved at
``revision``), ``revise`` (sent, then late rows changed it), ``refused`` (the
gate said no: never offered again, late rows are not counted into it).

The counters are stored in :data:`.aggregate.STATE_FORMAT` (recorded in
``meta.state_format``). A file written by an older agent is converted on open,
in one transaction with the format mark, before anything is read or counted:
the checkpoint is not touched, so an upgrade neither skips nor repeats a row.
"""

from __future__ import annotations

import enum
import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import structlog

from agent.collectors.callstats.aggregate import STATE_FORMAT, Bucket
from agent.errors import StateError
from agent.store import transaction

log = structlog.get_logger(__name__)

#: Offered bodies as stored (readers parse them; key order carries no meaning).
_BODY = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode

STATE_FILE = "callstats.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS buckets (
    start INTEGER PRIMARY KEY,
    state TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'sent', 'revise', 'refused', 'local')),
    revision INTEGER NOT NULL DEFAULT -1,
    body TEXT,
    offered_at REAL
);
CREATE INDEX IF NOT EXISTS buckets_status ON buckets (status);
CREATE TABLE IF NOT EXISTS seen (key INTEGER PRIMARY KEY, calldate INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS seen_calldate ON seen (calldate);
"""


class BucketStatus(enum.StrEnum):
    """Where a bucket is between counting and the gate (the ``status`` column)."""

    OPEN = "open"  # never offered
    SENT = "sent"  # offered and approved at ``revision``
    REVISE = "revise"  # sent, then late rows changed it: offer ``revision + 1``
    REFUSED = "refused"  # the gate said no: never offered again
    LOCAL = (
        "local"  # kept locally: no uplink configured, so nothing was queued; never offered again
    )

    @property
    def offered(self) -> bool:
        """Whether a body was offered for it (and is stored)."""
        return self in (BucketStatus.SENT, BucketStatus.REFUSED, BucketStatus.LOCAL)

    @property
    def final(self) -> bool:
        """Whether it was offered and not approved: it is never offered again."""
        return self in (BucketStatus.REFUSED, BucketStatus.LOCAL)

    @property
    def waiting(self) -> bool:
        """Whether it is still to be offered once it has closed."""
        return self in (BucketStatus.OPEN, BucketStatus.REVISE)


@dataclass(slots=True)
class BucketRow:
    """One bucket as stored: its counters and what was last offered."""

    start: int
    bucket: Bucket
    status: BucketStatus
    revision: int
    body: dict[str, Any] | None


class Changed(NamedTuple):
    """A bucket whose counters changed, with the status it is stored under."""

    bucket: Bucket
    status: BucketStatus
    revision: int


class Offered(NamedTuple):
    """What was offered for one bucket: the status it earned, its revision, body and time."""

    start: int
    status: BucketStatus
    revision: int
    body: dict[str, Any]
    at: float


class CallstatsStore:
    """Owns the state file; every method is a short, complete transaction."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        try:
            if readonly:
                self._db = sqlite3.connect(
                    f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
                )
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                # NORMAL with WAL survives a killed process; only power loss can drop the
                # last batches, and then checkpoint and counters are lost together.
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
            self._db.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            raise StateError(f"{path}: cannot open the call-statistics state file: {exc}") from exc
        if not readonly:
            self._allow_local()
            self._migrate()

    def _allow_local(self) -> None:
        """A state file made before ``local`` existed: rebuild the table to allow it.

        SQLite cannot change a CHECK constraint in place; the copy is one transaction.
        """
        row = self._db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'buckets'"
        ).fetchone()
        if row is None or "'local'" in row[0]:
            return
        table = _SCHEMA.split("CREATE TABLE IF NOT EXISTS buckets", 1)[1].split(";", 1)[0]
        with self.transaction() as db:
            db.execute(f"CREATE TABLE buckets_v3{table}")
            db.execute("INSERT INTO buckets_v3 SELECT * FROM buckets")
            db.execute("DROP TABLE buckets")
            db.execute("ALTER TABLE buckets_v3 RENAME TO buckets")
            db.execute("CREATE INDEX IF NOT EXISTS buckets_status ON buckets (status)")

    def _migrate(self) -> None:
        """Bring the stored counters to :data:`STATE_FORMAT` (one transaction, idempotent)."""
        found = self.get_meta("state_format")
        if found == STATE_FORMAT:
            return
        if isinstance(found, int) and found > STATE_FORMAT:
            raise StateError(
                f"{self.path}: call-statistics state format {found} is newer than this agent "
                f"reads ({STATE_FORMAT}); upgrade the agent or move the file aside"
            )
        with self.transaction() as db:
            rows = db.execute("SELECT start, state FROM buckets").fetchall()
            db.executemany(
                "UPDATE buckets SET state = ? WHERE start = ?",
                [(self._decode(start, text).encode(), start) for start, text in rows],
            )
            self.put_meta(db, "state_format", STATE_FORMAT)
        if rows:
            log.info(
                "callstats.state_migrated",
                path=str(self.path),
                buckets=len(rows),
                from_format=found or 1,
                to_format=STATE_FORMAT,
            )

    def _decode(self, start: int, text: str) -> Bucket:
        try:
            return Bucket.decode(start, text)
        except ValueError as exc:
            raise StateError(
                f"{self.path}: {exc}; move the file aside to start counting afresh"
            ) from None

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT, rolled back on any error; sqlite errors become StateError."""
        with transaction(self._db, f"{self.path}: call-statistics state update failed") as db:
            yield db

    # -- meta ---------------------------------------------------------------------------

    def get_meta(self, key: str) -> Any:
        """A JSON value from the meta table, or None."""
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot read the state file: {exc}") from exc
        return None if row is None else json.loads(row[0])

    @staticmethod
    def put_meta(db: sqlite3.Connection, key: str, value: Any) -> None:
        """Set a meta value inside a transaction."""
        db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            (key, json.dumps(value, sort_keys=True)),
        )

    # -- buckets ------------------------------------------------------------------------

    def _row(self, r: tuple[Any, ...]) -> BucketRow:
        return BucketRow(
            start=r[0],
            bucket=self._decode(r[0], r[1]),
            status=BucketStatus(r[2]),
            revision=r[3],
            body=json.loads(r[4]) if r[4] else None,
        )

    def pending(self) -> list[BucketRow]:
        """Buckets waiting to be offered: never offered, or changed since."""
        try:
            rows = self._db.execute(
                "SELECT start, state, status, revision, body FROM buckets "
                "WHERE status IN ('open', 'revise') ORDER BY start"
            ).fetchall()
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot read the state file: {exc}") from exc
        return [self._row(r) for r in rows]

    def bucket(self, start: int) -> BucketRow | None:
        """One bucket, or None."""
        try:
            r = self._db.execute(
                "SELECT start, state, status, revision, body FROM buckets WHERE start = ?", (start,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot read the state file: {exc}") from exc
        return None if r is None else self._row(r)

    def since(self, start: int) -> list[BucketRow]:
        """Every bucket from ``start`` on, oldest first (for ``agentctl callstats``)."""
        try:
            rows = self._db.execute(
                "SELECT start, state, status, revision, body FROM buckets "
                "WHERE start >= ? ORDER BY start",
                (start,),
            ).fetchall()
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot read the state file: {exc}") from exc
        return [self._row(r) for r in rows]

    def max_start(self) -> int | None:
        """The latest bucket start stored, or None: no later bucket needs a look-up."""
        try:
            row = self._db.execute("SELECT MAX(start) FROM buckets").fetchone()
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot read the state file: {exc}") from exc
        return None if row is None or row[0] is None else int(row[0])

    @staticmethod
    def save_buckets(db: sqlite3.Connection, items: Iterable[Changed]) -> None:
        """Write the counters of changed buckets (with their new status) in a transaction."""
        db.executemany(
            "INSERT INTO buckets (start, state, status, revision) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (start) DO UPDATE SET state = excluded.state, status = excluded.status",
            [(c.bucket.start, c.bucket.encode(), c.status, c.revision) for c in items],
        )

    @staticmethod
    def save_offered(
        db: sqlite3.Connection,
        with_state: Iterable[tuple[Bucket, Offered]],
        status_only: Iterable[Offered],
    ) -> None:
        """Record buckets just offered (status ``sent`` or ``refused``, revision, body, time).

        ``with_state``: buckets whose counters changed in this transaction's batch,
        written with them (one row write per closing bucket); ``status_only``: buckets
        whose stored counters are already current.
        """
        db.executemany(
            "INSERT INTO buckets (start, state, status, revision, body, offered_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (start) DO UPDATE SET "
            "state = excluded.state, status = excluded.status, revision = excluded.revision, "
            "body = excluded.body, offered_at = excluded.offered_at",
            [
                (b.start, b.encode(), o.status, o.revision, _BODY(o.body), o.at)
                for b, o in with_state
            ],
        )
        db.executemany(
            "UPDATE buckets SET status = ?, revision = ?, body = ?, offered_at = ? WHERE start = ?",
            [(o.status, o.revision, _BODY(o.body), o.at, o.start) for o in status_only],
        )

    @staticmethod
    def prune(db: sqlite3.Connection, before: int) -> None:
        """Forget offered buckets that started before ``before`` (older rows are too old)."""
        db.execute(
            "DELETE FROM buckets WHERE start < ? AND status IN ('sent', 'refused', 'local')",
            (before,),
        )

    # -- seen rows (MariaDB) ------------------------------------------------------------

    def seen_since(self, calldate: int) -> dict[int, int]:
        """Hashes of rows already counted with calldate >= ``calldate``."""
        try:
            rows = self._db.execute(
                "SELECT key, calldate FROM seen WHERE calldate >= ?", (calldate,)
            ).fetchall()
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot read the state file: {exc}") from exc
        return {k: c for k, c in rows}

    @staticmethod
    def add_seen(
        db: sqlite3.Connection, items: Iterable[tuple[int, int]], prune_before: int
    ) -> None:
        """Remember counted rows; forget those older than the look-back window."""
        db.executemany("INSERT OR IGNORE INTO seen (key, calldate) VALUES (?, ?)", items)
        db.execute("DELETE FROM seen WHERE calldate < ?", (prune_before,))
