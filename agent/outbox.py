"""The durable outbox: approved envelopes wait here until the broker acknowledges them.

It accepts only :class:`agent.policy.gate.Envelope`, which only the gate can
make. It is bounded in bytes; when full, the oldest envelopes are dropped and
the drops counted (in status, in health, and in the ledger). An envelope is
deleted only when the broker has acknowledged it, in the same transaction as
the ledger's "delivered" entry: at-least-once, with the NOC de-duplicating by id.

An envelope that cannot be stored (a full disk) is refused with
:class:`StateError`; the caller gives its seq back to the gate, and the outbox
counts it as *unstored*. The count reaches the ledger as a ``dropped`` entry in
the first put that succeeds again, so the account stays whole.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from agent.errors import StateError
from agent.ledger import Ledger, delivered_texts
from agent.policy.gate import Envelope, approved
from agent.store import transaction

if TYPE_CHECKING:
    from agent.anchor import Anchor
    from agent.salvage import Row

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Stored:
    """An envelope as the uplink reads it back from the outbox."""

    seq: int
    id: str
    data_class: str
    payload: bytes


class Outbox:
    """Bounded, durable queue of approved envelopes."""

    def __init__(
        self, conn: sqlite3.Connection, ledger: Ledger, *, max_bytes: int, floor_seq: int = 0
    ) -> None:
        self.conn = conn
        self.ledger = ledger
        self.max_bytes = max_bytes
        row = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0), COALESCE(MAX(seq), 0) FROM outbox"
        ).fetchone()
        self.count, self.bytes = int(row[0]), int(row[1])
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        # floor_seq: the last seq issued as the anchor remembers it, should the database
        # have lost it (agent.anchor); seq never goes back.
        self._last_seq = max(int(row[2]), int(meta.get("last_seq", 0)), floor_seq)
        self.dropped = int(meta.get("dropped", 0))
        self.delivered_total = int(meta.get("delivered", 0))
        self.unstored = int(meta.get("unstored", 0))
        self._unstored_pending = 0  # refused since the last put that succeeded
        self._unstored_first: float | None = None
        self.store_error: str | None = None  # why the last put failed, until one succeeds
        self.listeners: list[Callable[[], None]] = []
        self.anchor: Anchor | None = None
        # The write-ahead log that sync() flushes (None for a database without a file).
        main = next((r[2] for r in conn.execute("PRAGMA database_list") if r[1] == "main"), "")
        self._wal: str | None = f"{main}-wal" if main else None

    @property
    def last_seq(self) -> int:
        """The highest sequence number ever stored (persists after delivery)."""
        return self._last_seq

    def put(self, envelope: Envelope) -> None:
        """Store an approved envelope durably; drops the oldest if over the bound.

        Raises :class:`StateError` when it cannot be stored; it is then counted as
        unstored and the caller must not treat its seq as issued.
        """
        if not approved(envelope):
            raise TypeError("the outbox accepts only envelopes approved by the policy gate")
        size = len(envelope.payload)
        try:
            with transaction(
                self.conn, f"outbox: cannot store envelope {envelope.id}", follows=self.ledger
            ) as c:
                c.execute(
                    "INSERT INTO outbox VALUES (?, ?, ?, ?, ?)",
                    (
                        envelope.seq,
                        envelope.id,
                        envelope.data_class.value,
                        envelope.ts,
                        envelope.payload,
                    ),
                )
                c.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (envelope.seq,))
                dropped = self._trim(c, self.bytes + size)
                if self._unstored_pending:
                    self._ledger_unstored(c)
        except StateError as exc:
            self._refused(envelope, exc)
            raise
        if self._unstored_pending:
            log.warning("outbox_storing_again", unstored=self._unstored_pending)
            self.unstored += self._unstored_pending
            self._unstored_pending, self._unstored_first = 0, None
        self.store_error = None
        self._last_seq = envelope.seq
        self.count += 1 - dropped[0]
        self.bytes += size - dropped[1]
        if dropped[0]:
            self.dropped += dropped[0]
            log.warning(
                "outbox_full_dropped_oldest",
                dropped=dropped[0],
                total=self.dropped,
                max_bytes=self.max_bytes,
            )
        if self.anchor is not None:
            self.anchor.touch(force=True)  # a seq was issued: anchor it before the next one
        for listener in self.listeners:
            listener()

    def _refused(self, envelope: Envelope, exc: StateError) -> None:
        if not self._unstored_pending:
            # Once per episode: a full disk refuses every record until space returns.
            log.error(
                "outbox_cannot_store",
                error=str(exc),
                data_class=envelope.data_class.value,
                note="records are dropped (and counted) until the store is writable again",
            )
            self._unstored_first = time.time()
        self._unstored_pending += 1
        self.store_error = str(exc)

    def _ledger_unstored(self, c: sqlite3.Connection) -> None:
        c.execute(
            "INSERT OR REPLACE INTO meta VALUES ('unstored', ?)",
            (self.unstored + self._unstored_pending,),
        )
        self.ledger.append(
            "dropped",
            {
                "count": self._unstored_pending,
                "reason": f"not stored: {self.store_error}",
                "since": self._unstored_first,
            },
        )

    @property
    def unstored_now(self) -> int:
        """Records refused because they could not be stored, not yet in the ledger."""
        return self._unstored_pending

    def restore(self, rows: Sequence[Row]) -> None:
        """Queue salvaged rows again, verbatim (inside the caller's transaction).

        They were approved by the gate when they were first stored; their bytes,
        ids and seqs are kept so that the NOC can de-duplicate them.
        """
        self.conn.executemany(
            "INSERT OR IGNORE INTO outbox VALUES (?, ?, ?, ?, ?)",
            ((r.seq, r.id, r.data_class, r.ts, r.payload) for r in rows),
        )
        if rows:
            top = max(r.seq for r in rows)
            self._last_seq = max(self._last_seq, top)
            self.conn.execute(
                "INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (self._last_seq,)
            )
        row = self.conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"
        ).fetchone()
        self.count, self.bytes = int(row[0]), int(row[1])

    def _trim(self, c: sqlite3.Connection, total: int) -> tuple[int, int]:
        if total <= self.max_bytes:
            return 0, 0
        n, freed = 0, 0
        victims: list[int] = []
        for seq, size in c.execute("SELECT seq, LENGTH(payload) FROM outbox ORDER BY seq"):
            if total - freed <= self.max_bytes:
                break
            victims.append(seq)
            freed += size
            n += 1
        c.executemany("DELETE FROM outbox WHERE seq = ?", ((s,) for s in victims))
        c.execute("INSERT OR REPLACE INTO meta VALUES ('dropped', ?)", (self.dropped + n,))
        self.ledger.append(
            "dropped",
            {
                "count": n,
                "bytes": freed,
                "first_seq": victims[0],
                "last_seq": victims[-1],
                "reason": "outbox full",
            },
        )
        return n, freed

    def pending(self, limit: int, after_seq: int = 0) -> list[Stored]:
        """Up to ``limit`` envelopes with seq > ``after_seq``, oldest first."""
        rows = self.conn.execute(
            "SELECT seq, id, class, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        ).fetchall()
        return [Stored(int(s), i, c, bytes(p)) for s, i, c, p in rows]

    def delivered(self, items: Sequence[Stored], *, durable: bool = True) -> None:
        """Delete acknowledged envelopes and write their ledger entries in one transaction.

        ``durable=False`` is the uplink's streaming path (group commit): the transaction
        commits without waiting for the disk, the caller runs :meth:`sync` in a worker
        thread right after and calls :meth:`synced` once it returned, and commits its
        next batch only then. A process crash loses nothing committed either way (WAL);
        a power cut during that one fsync may cost the batch's record, and its envelopes
        are then sent again and recorded when acknowledged again (at-least-once, as for
        a cut between a PUBACK and its commit). The anchor follows only synced heads.
        """
        if not items:
            return
        conn = self.conn
        if not durable:
            # Set between transactions, for this one only (restored below).
            conn.execute("PRAGMA synchronous=NORMAL")
        try:
            with transaction(conn, "outbox: cannot record delivery", follows=self.ledger) as c:
                # Only those still queued count: the size bound may have dropped some in
                # flight. One statement deletes and says which were there.
                present: set[int] = set()
                for start in range(0, len(items), 500):  # under SQLite's bound-variable limit
                    chunk = [i.seq for i in items[start : start + 500]]
                    marks = ",".join("?" * len(chunk))
                    query = f"DELETE FROM outbox WHERE seq IN ({marks}) RETURNING seq"  # noqa: S608 -- only ? marks
                    present.update(row[0] for row in c.execute(query, chunk).fetchall())
                gone = [i for i in items if i.seq in present]
                sha256 = hashlib.sha256
                self.ledger.append_texts(
                    "delivered",
                    delivered_texts(
                        [
                            (
                                i.data_class,
                                i.id,
                                i.seq,
                                len(i.payload),
                                sha256(i.payload).hexdigest(),
                            )
                            for i in gone
                        ]
                    ),
                )
                removed = len(gone)
                freed = sum(len(i.payload) for i in gone)
                c.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('delivered', ?)",
                    (self.delivered_total + removed,),
                )
        finally:
            if not durable:
                conn.execute("PRAGMA synchronous=FULL")
        self.count -= removed
        self.bytes -= freed
        self.delivered_total += removed
        if durable and self.anchor is not None:
            self.anchor.touch()  # at most once per interval on this path

    def sync(self) -> None:
        """Make every commit so far durable: fsync the write-ahead log, as a commit under
        ``synchronous=FULL`` would have. Blocking and thread-safe (it uses no connection):
        the uplink runs it in a worker thread while the loop keeps sending.

        :class:`StateError` when the disk reports a failure.
        """
        if self._wal is None:
            return
        try:
            fd = os.open(self._wal, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # no log: every commit is in the database file already
        except OSError as exc:
            raise StateError(f"outbox: cannot open {self._wal} to sync it: {exc.strerror}") from exc
        try:
            os.fsync(fd)
        except OSError as exc:
            raise StateError(f"outbox: cannot sync {self._wal}: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def synced(self) -> None:
        """After :meth:`sync` returned with no delivery committed since it began: the
        anchor may now record the head (on the loop's thread)."""
        if self.anchor is not None:
            self.anchor.touch()

    def stats(self) -> dict[str, Any]:
        """Counters for status and health."""
        return {
            "queued": self.count,
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "dropped": self.dropped,
            "unstored": self.unstored + self._unstored_pending,
            "store_error": self.store_error,
            "delivered": self.delivered_total,
            "last_seq": self._last_seq,
        }
