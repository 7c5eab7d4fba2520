"""The anchor: the last sequence number and ledger head, kept outside ``agent.db``.

Why: a deleted, truncated or replaced database would otherwise start again at
seq 1 with an empty ledger, and ``audit verify`` would call the new, short
chain intact. A small JSON file beside the database remembers which database
was last written (its ``db_id``), the highest seq issued, the ledger's head
(entry number and hash) and how many envelopes were queued. At start the
daemon compares it with the database it opened: a database that is missing,
empty, corrupt, another one, or an older copy is a *loss*, recorded as a
``reset`` entry that names what was lost, and seq continues above the last one
issued (:func:`check`).

Cost on the delivery path: the file is replaced (write, rename) but not
fsynced, and at most once per ``interval`` while deliveries stream; a put
(which issues a seq) writes it at once. The rename keeps the file whole across
a crash; a power cut may cost the last updates, which matters only if the
database is lost in the same cut, and then the reset names an older head (the
count of entries lost is a lower bound; seq still continues above every seq
the anchor saw).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

ANCHOR_FILE = "anchor.json"
INTERVAL = 0.25  # seconds between writes while only deliveries move the head

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Mark:
    """What the anchor remembers."""

    db_id: str
    seq: int  # the highest sequence number issued
    ledger_n: int  # the ledger's head: last entry number ...
    ledger_hash: str  # ... and its hash
    queued: int  # envelopes in the outbox

    def same(self, other: Mark | None) -> bool:
        """Whether ``other`` records the same state."""
        return other is not None and self == other


@dataclass(frozen=True, slots=True)
class Loss:
    """A database that is not the one the anchor describes; what was lost with it."""

    reason: str
    last: Mark | None  # None: no anchor (first start of this version), nothing to compare
    lost_entries: int | None  # ledger entries of the old chain that are gone; None: unknown

    def ledger_data(self) -> dict[str, Any]:
        """The body of the ``reset`` ledger entry."""
        lost: dict[str, Any] | None = None
        if self.last is not None:
            lost = {
                "entries": self.lost_entries,
                "last_seq": self.last.seq,
                "head_n": self.last.ledger_n,
                "head_hash": self.last.ledger_hash,
                "queued": self.last.queued,
                "db_id": self.last.db_id,
            }
        return {"reason": self.reason, "lost": lost}


def anchor_path(state_dir: Path) -> Path:
    """Where the anchor lives."""
    return state_dir / ANCHOR_FILE


def read_anchor(state_dir: Path) -> Mark | None:
    """The anchor, or None when there is none or it cannot be used (logged)."""
    path = anchor_path(state_dir)
    try:
        data = json.loads(path.read_bytes())
        return Mark(
            db_id=str(data["db_id"]),
            seq=int(data["seq"]),
            ledger_n=int(data["ledger_n"]),
            ledger_hash=str(data["ledger_hash"]),
            queued=int(data["queued"]),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # Unusable: the comparison cannot be made, so nothing can be said to be lost.
        log.error("anchor_unreadable", path=str(path), error=str(exc))
        return None


def check(
    conn: sqlite3.Connection,
    last: Mark | None,
    *,
    db_id: str,
    created: bool,
    moved: str | None,
) -> Loss | None:
    """Compare the opened database with the anchor; the loss, or None if it is the same one."""
    if moved is not None:
        return Loss(moved, last, last.ledger_n if last else None)
    if last is None or (last.seq == 0 and last.ledger_n == 0):
        return None  # nothing was ever issued or ledgered: nothing to lose
    if created:
        return Loss("agent.db was missing or empty", last, last.ledger_n)
    row = conn.execute("SELECT n, hash FROM ledger ORDER BY n DESC LIMIT 1").fetchone()
    head_n = int(row[0]) if row else 0
    if db_id != last.db_id:
        return Loss(
            f"agent.db is another database (db_id {db_id}) than the one this agent last "
            f"wrote (db_id {last.db_id})",
            last,
            last.ledger_n,
        )
    at = conn.execute("SELECT hash FROM ledger WHERE n = ?", (last.ledger_n,)).fetchone()
    if last.ledger_n and (at is None or at[0] != last.ledger_hash):
        return Loss(
            f"agent.db is an older copy: its ledger ends at entry {head_n}, the last head "
            f"recorded was entry {last.ledger_n}",
            last,
            max(last.ledger_n - head_n, 0),
        )
    return None


class Anchor:
    """Writes the anchor file when the state it records has moved on."""

    def __init__(
        self,
        state_dir: Path,
        current: Callable[[], Mark],
        *,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = anchor_path(state_dir)
        self._tmp = self.path.with_name(f".{ANCHOR_FILE}.tmp")
        self._current = current
        self._interval = interval
        self._clock = clock
        self._written: Mark | None = None
        self._written_at = float("-inf")
        self.error: str | None = None  # why the last write failed (a full disk), if it did
        #: A touch was put off (not due yet): some later touch must write it. Whoever keeps
        #: the daemon's housekeeping (which sleeps while nothing waits) is told through
        #: ``on_deferred``, once per episode rather than once per delivery.
        self.deferred = False
        self.on_deferred: Callable[[], None] | None = None

    def touch(self, *, force: bool = False) -> None:
        """Write the anchor if the state moved on and (unless ``force``) it is due.

        Never raises: the anchor must not stop a delivery or a put; a failed write is
        remembered, logged once, and tried again at the next touch.
        """
        now = self._clock()
        if not force and now - self._written_at < self._interval:
            if not self.deferred:
                self.deferred = True
                if self.on_deferred is not None:
                    self.on_deferred()
            return
        self.deferred = False
        mark = self._current()
        if mark.same(self._written):
            return
        try:
            with open(self._tmp, "wb") as f:
                f.write(json.dumps({**asdict(mark), "at": time.time()}).encode())
            os.replace(self._tmp, self.path)
        except OSError as exc:
            if self.error is None:
                log.error("anchor_write_failed", path=str(self.path), error=str(exc))
            self.error = f"{self.path}: {exc.strerror or exc}"
            self.deferred = True  # to be tried again
            return
        if self.error is not None:
            log.info("anchor_written_again", path=str(self.path))
            self.error = None
        self._written, self._written_at = mark, now
