"""The call-statistics collector: CDR rows in, one aggregated record per closed bucket out.

Each poll reads what the source has appended since the checkpoint (in
batches of BATCH_CHUNKS chunks) and adds it to the bucket counters. Then every bucket
that has closed is rendered (:func:`.aggregate.render`: counters only, small
counts folded into ``other``) and offered to the gate, and only then is the batch
committed: checkpoint, the counters of every touched bucket and what was offered
(revision, body, approved or refused), all in one transaction (see :mod:`.store`).
So a crash (kill -9 included) loses the batch and its checkpoint together: the
rows are read again, once. A crash between an offer and the commit offers that
same revision again after the restart, with the same body, exactly as a crash
between a commit and the record of its offers did when these were two
transactions. One transaction per batch, and a bucket that closes in the batch
that last touched it (most of them, while a backlog is read) is written once.

A bucket has closed when ``settle`` has passed since its end, by the clock and,
while a backlog is being read, by the data as well (the latest call end seen),
so a restart after a long stop does not close buckets whose rows are still
further down the file. Rows that still arrive for a sent bucket make it
``revise``: it is offered again, complete, with ``revision + 1``.

Whatever ``emit`` answers, an offered revision is done: when the gate refused it
(switch off, policy), the bucket is ``refused`` for good and later rows are not
counted into it, so nothing gathered while the switch was off is sent later.
Without an uplink the gate approves nothing and the bucket is ``local``: kept
locally, never queued, and never sent later either.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import structlog

from agent.collectors.base import Emit
from agent.collectors.callstats.aggregate import Aggregator, Bucket, iso_utc, render
from agent.collectors.callstats.cdr import DateParser
from agent.collectors.callstats.csv_source import (
    DEFAULT_CHUNK,
    CsvCheckpoint,
    CsvTail,
    ingest_chunk,
)
from agent.collectors.callstats.directions import Classifier
from agent.collectors.callstats.settings import CallstatsSettings
from agent.collectors.callstats.store import (
    STATE_FILE,
    BucketStatus,
    CallstatsStore,
    Changed,
    Offered,
)
from agent.errors import CollectorError, StateError
from agent.policy.classes import DataClass, Record

if TYPE_CHECKING:
    # PyMySQL (and the cryptography it imports) only when the source is MariaDB.
    from agent.collectors.callstats.mariadb_source import MariaDbSource

log = structlog.get_logger(__name__)

#: Chunks read per transaction while a backlog is read. 1: measured with 4, the
#: ingest was no faster (a closing bucket is written once per batch either way)
#: and RSS stood 12 MiB higher (69.6 MiB after the first million rows, against 57).
BATCH_CHUNKS = 1
#: ... or this many seconds of work, whichever comes first (with BATCH_CHUNKS > 1).
BATCH_SECONDS = 0.5

_T = TypeVar("_T")


class Offer(NamedTuple):
    """One bucket offered to the gate: the revision rendered, its body, the gate's answer."""

    start: int
    revision: int
    body: dict[str, Any]
    approved: bool
    at: float
    local: bool = False  # not approved because there is no uplink: kept locally

    def offered(self) -> Offered:
        """What the state file records of it."""
        status = BucketStatus.SENT if self.approved else BucketStatus.REFUSED
        if self.local and not self.approved:
            status = BucketStatus.LOCAL
        return Offered(self.start, status, self.revision, self.body, self.at)


@dataclass(slots=True)
class _Batch:
    """What one read added, to be committed together with the offers that follow it."""

    now: float
    rows: int = 0
    latest: int = 0
    drained: bool = True
    #: Position after the last chunk counted; None: no read succeeded, keep the stored one.
    checkpoint: CsvCheckpoint | None = None
    seen: tuple[list[tuple[int, int]], int] | None = None
    error: CollectorError | None = None


class CallstatsCollector:
    """Implements :class:`agent.collectors.base.Collector` for CDR call statistics."""

    def __init__(
        self,
        settings: CallstatsSettings,
        state_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
        read_chunk: int = DEFAULT_CHUNK,
        local_only: bool = False,
    ) -> None:
        """``clock`` and ``read_chunk`` (bytes per CSV batch) are there for tests and benches.

        ``local_only``: no uplink is configured, so a bucket the gate does not approve is
        recorded as ``local`` (kept locally), not ``refused``.
        """
        self.local_only = local_only
        self._s = settings
        self._clock = clock
        # One thread of its own for reading, counting and committing, not the event loop's
        # shared pool: glibc gives each thread that allocates its own malloc arena, and
        # the multi-megabyte chunks freed in several arenas kept RSS growing (+22.7 MiB
        # over 5 million rows through the shared pool, +6.2 MiB in one arena).
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="callstats")
        self._size = int(settings.bucket)
        self._store = CallstatsStore(state_dir / STATE_FILE)
        self._classifier = Classifier(settings)
        self._parse = DateParser(utc=settings.usegmtime)
        self._agg = Aggregator(self._size, self._load)
        self._status_of: dict[int, tuple[BucketStatus, int]] = {}
        # No bucket after this one is stored: a backlog's new buckets need no look-up.
        self._stored_max = self._store.max_start()
        #: Offers made whose commit failed, with their buckets: the next commit records them.
        self._unrecorded: list[tuple[Bucket, Offered]] = []
        for row in self._store.pending():
            self._agg.buckets[row.start] = row.bucket
            self._status_of[row.start] = (row.status, row.revision)
        self._label = settings.source_label()
        same_source = self._store.get_meta("source") == self._label
        self._skipped: dict[str, int] = dict(self._store.get_meta("skipped") or {})
        self._rows = int(self._store.get_meta("rows_read") or 0)
        self._watermark = int(self._store.get_meta("watermark") or 0) if same_source else 0
        self._high = int(self._store.get_meta("db_high") or 0) if same_source else 0
        self._last_sent: dict[str, Any] | None = self._store.get_meta("last_sent")
        self._refused_total = int(self._store.get_meta("refused_total") or 0)
        self._error: str | None = None
        self._last_poll: float | None = None
        self._tail: CsvTail | None = None
        self._db: MariaDbSource | None = None
        self._seen: dict[int, int] = {}
        self._batches: Iterator[list[tuple[Any, ...]]] | None = None
        if settings.mariadb is not None:
            from agent.collectors.callstats.mariadb_source import MariaDbSource

            self._db = MariaDbSource(settings.mariadb, settings.table)
            if self._high:
                self._seen = self._store.seen_since(self._high - int(settings.lookback))
        else:
            if settings.csv is None:
                raise CollectorError("collectors.callstats.source: give csv or mariadb")
            cp = (
                CsvCheckpoint.from_json(self._store.get_meta("checkpoint")) if same_source else None
            )
            self._tail = CsvTail(settings.csv, cp, chunk=read_chunk)

    # -- Collector protocol -------------------------------------------------------------

    @property
    def name(self) -> str:
        """``callstats``."""
        return "callstats"

    @property
    def interval(self) -> float:
        """Seconds between polls of the CDR source."""
        return self._s.interval

    async def collect(self, emit: Emit, *, reason: str) -> None:
        """Read new rows, offer every bucket that has closed, commit both together."""
        if not self._s.enabled:
            return
        self._last_poll = self._clock()
        while True:
            batch = await self._in_worker(self._read)
            # Even when the source failed: the clock still closes buckets while it is away.
            ready, offers = self._offer_ready(emit, drained=batch.drained)
            await self._in_worker(self._commit, batch, ready, offers)
            if batch.error is not None:
                exc = batch.error
                if self._error != exc.message:
                    log.warning("callstats.source_error", source=self._label, error=exc.message)
                self._error = exc.message
                raise exc
            if batch.drained:
                break
        self._error = None

    def status(self) -> dict[str, Any]:
        """Rows read and skipped (by reason), the last bucket sent, the source's state."""
        cp = self._tail.checkpoint if self._tail is not None else None
        out: dict[str, Any] = {
            "source": self._label,
            "source_error": self._error,
            "rows_read": self._rows,
            "rows_skipped": dict(sorted(self._skipped.items())),
            "open_buckets": len(self._agg.buckets),
            "last_bucket_sent": self._last_sent,
            "buckets_refused": self._refused_total,
            "last_poll": self._last_poll,
        }
        if self._tail is not None:
            out["checkpoint"] = None if cp is None else {"inode": cp.ino, "offset": cp.offset}
            out["rotations"] = self._tail.rotations
            out["truncations"] = self._tail.truncations
        else:
            out["checkpoint"] = {"calldate": iso_utc(self._high) if self._high else None}
        return out

    async def aclose(self) -> None:
        """Close the CDR file, the database connection and the state file."""
        try:
            await self._in_worker(self._close)
        finally:
            self._worker.shutdown(wait=False)

    async def _in_worker(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(
            self._worker, functools.partial(fn, *args)
        )

    def _close(self) -> None:
        if self._tail is not None:
            self._tail.close()
        self._batches = None
        if self._db is not None:
            self._db.close()
        self._store.close()

    # -- reading (runs in a worker thread) ----------------------------------------------

    def _load(self, start: int) -> Bucket | bool | None:
        if self._stored_max is None or start > self._stored_max:
            return None
        row = self._store.bucket(start)
        if row is None:
            return None
        if row.status.final:
            return False
        self._status_of[start] = (row.status, row.revision)
        return row.bucket

    def _cutoff(self, now: float) -> int:
        return int(now - self._s.max_age)

    def _read(self) -> _Batch:
        """Count the next batch of rows (not committed yet); a source error ends the batch."""
        batch = _Batch(self._clock())
        try:
            if self._tail is not None:
                self._read_csv(batch)
            else:
                self._read_db(batch)
        except CollectorError as exc:
            batch.error = exc
            batch.drained = True
        self._watermark = max(self._watermark, batch.latest)
        return batch

    def _read_csv(self, batch: _Batch) -> None:
        assert self._tail is not None
        cutoff = self._cutoff(batch.now)
        deadline = time.monotonic() + BATCH_SECONDS
        for _ in range(BATCH_CHUNKS):
            data, batch.drained = self._tail.read()
            if data:
                n, end = ingest_chunk(
                    data,
                    self._agg,
                    self._classifier,
                    self._parse,
                    cutoff=cutoff,
                    skipped=self._skipped,
                )
                batch.rows += n
                batch.latest = max(batch.latest, end)
            # Taken after each chunk: a read that fails later (a rotated file gone, say)
            # leaves this one, which matches exactly the rows counted.
            batch.checkpoint = self._tail.checkpoint
            if batch.drained or time.monotonic() >= deadline:
                return

    def _read_db(self, batch: _Batch) -> None:
        if self._db is None:
            return
        now = batch.now
        if self._batches is None:
            low = max(self._high - int(self._s.lookback), self._cutoff(now))
            since = (
                dt.datetime.fromtimestamp(low, dt.UTC).replace(tzinfo=None)
                if self._s.usegmtime
                else dt.datetime.fromtimestamp(low)
            )
            self._batches = self._db.rows(since)
        try:
            rows = next(self._batches)
        except StopIteration:
            self._batches = None
            return
        except CollectorError:
            self._batches = None
            raise
        from agent.collectors.callstats.mariadb_source import ingest_rows

        new_seen: list[tuple[int, int]] = []
        batch.rows, batch.latest = ingest_rows(
            rows,
            self._agg,
            self._classifier,
            self._parse,
            cutoff=self._cutoff(now),
            skipped=self._skipped,
            seen=self._seen,
            new_seen=new_seen,
            now=int(now),
        )
        batch.drained = False
        self._high = max(self._high, batch.latest)
        prune = self._high - int(self._s.lookback)
        if len(self._seen) > 4 * max(len(new_seen), 1000):
            self._seen = {k: c for k, c in self._seen.items() if c >= prune}
        batch.seen = (new_seen, prune)

    def _commit(self, batch: _Batch, ready: list[int], offers: list[Offer]) -> None:
        """Checkpoint, touched buckets' counters and the offers just made: one transaction.

        If it fails, the rows stay counted in memory and the next commit writes them.
        The offers have been made, though: they are remembered as made (a later change
        is the next revision, never a second body under the same one) and recorded by
        the next commit that gets through.
        """
        self._rows += batch.rows
        agg = self._agg
        buckets = agg.buckets
        offered = {o.start for o in offers}
        touched = [
            Changed(buckets[s], *self._next_status(s))
            for s in agg.touched
            if s in buckets and s not in offered
        ]
        with_state = self._unrecorded
        status_only: list[Offered] = []
        new_state: list[tuple[Bucket, Offered]] = []
        for offer in offers:
            if offer.approved:
                self._last_sent = {
                    "bucket_start": offer.body["bucket_start"],
                    "revision": offer.revision,
                }
            else:
                self._refused_total += 1
            if offer.start in agg.touched:
                new_state.append((buckets[offer.start], offer.offered()))
            else:
                status_only.append(offer.offered())
        try:
            with self._store.transaction() as db:
                CallstatsStore.save_offered(db, with_state + new_state, status_only)
                CallstatsStore.save_buckets(db, touched)
                if batch.checkpoint is not None:
                    CallstatsStore.put_meta(db, "checkpoint", batch.checkpoint.to_json())
                if batch.seen is not None:
                    CallstatsStore.add_seen(db, batch.seen[0], batch.seen[1])
                    CallstatsStore.put_meta(db, "db_high", self._high)
                CallstatsStore.put_meta(db, "source", self._label)
                CallstatsStore.put_meta(db, "skipped", self._skipped)
                CallstatsStore.put_meta(db, "rows_read", self._rows)
                CallstatsStore.put_meta(db, "watermark", self._watermark)
                if offers or with_state:
                    CallstatsStore.put_meta(db, "last_sent", self._last_sent)
                    CallstatsStore.put_meta(db, "refused_total", self._refused_total)
                CallstatsStore.prune(db, self._cutoff(batch.now) - self._size)
        except StateError:
            self._offers_unrecorded(offers)
            raise
        self._unrecorded = []
        status_of = self._status_of
        for changed in touched:
            status_of[changed.bucket.start] = (changed.status, changed.revision)
        top = max(agg.touched, default=None)
        if top is not None and (self._stored_max is None or top > self._stored_max):
            self._stored_max = top
        agg.touched.clear()
        for offer in offers:
            if not offer.approved:
                agg.refused.add(offer.start)
        for start in ready:
            buckets.pop(start, None)
            status_of.pop(start, None)
        if offers:
            floor = self._cutoff(batch.now)
            agg.refused = {s for s in agg.refused if s >= floor}
            log.debug(
                "callstats.offered",
                buckets=len(offers),
                refused=sum(1 for o in offers if not o.approved),
            )

    def _offers_unrecorded(self, offers: list[Offer]) -> None:
        """Offers whose commit failed: treat them as made, record them with the next commit."""
        agg = self._agg
        for offer in offers:
            start = offer.start
            record = offer.offered()
            self._unrecorded.append((agg.buckets[start], record))
            # Its counters as offered go with that record; only later rows make it change.
            agg.touched.discard(start)
            self._status_of[start] = (record.status, offer.revision)
            if not offer.approved:
                agg.buckets.pop(start)
                agg.refused.add(start)

    def _next_status(self, start: int) -> tuple[BucketStatus, int]:
        status, rev = self._status_of.get(start, (BucketStatus.OPEN, -1))
        return (BucketStatus.REVISE if status is BucketStatus.SENT else status), rev

    # -- offering (event loop) ----------------------------------------------------------

    def _offer_ready(self, emit: Emit, *, drained: bool) -> tuple[list[int], list[Offer]]:
        """Render and offer every closed bucket; (closed bucket starts, offers made)."""
        now = self._clock()
        size, settle = self._size, self._s.settle
        watermark = self._watermark
        ready = sorted(
            s
            for s in self._agg.buckets
            if now >= s + size + settle and (drained or watermark >= s + size + settle)
        )
        offers: list[Offer] = []
        touched = self._agg.touched
        min_count = self._s.min_count
        for start in ready:
            status, rev = self._status_of.get(start, (BucketStatus.OPEN, -1))
            if status is BucketStatus.SENT and start in touched:
                status = BucketStatus.REVISE  # late rows in this very batch, not committed yet
            if status.waiting:
                body = render(
                    self._agg.buckets[start],
                    bucket_seconds=size,
                    revision=rev + 1,
                    min_count=min_count,
                )
                ok = emit(Record(DataClass.CALLSTATS, body))
                offers.append(Offer(start, rev + 1, body, ok, now, local=self.local_only))
        return ready, offers
