"""The call-statistics collector: CDR rows in, one aggregated record per closed bucket out.

Each poll reads what the source has appended since the checkpoint, adds it to
the bucket counters and commits checkpoint and counters in one transaction per
batch (see :mod:`.store`). Then every bucket that has closed is rendered
(:func:`.aggregate.render`: counters only, small counts folded into ``other``)
and offered to the gate once.

A bucket has closed when ``settle`` has passed since its end, by the clock and,
while a backlog is being read, by the data as well (the latest call end seen),
so a restart after a long stop does not close buckets whose rows are still
further down the file. Rows that still arrive for a sent bucket make it
``revise``: it is offered again, complete, with ``revision + 1``.

Whatever ``emit`` answers, an offered revision is done: when the gate refused it
(switch off, policy), the bucket is ``refused`` for good and later rows are not
counted into it, so nothing gathered while the switch was off is sent later.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from agent.collectors.base import Emit, Record
from agent.collectors.callstats.aggregate import Aggregator, Bucket, iso_utc, render
from agent.collectors.callstats.cdr import DateParser
from agent.collectors.callstats.csv_source import (
    DEFAULT_CHUNK,
    CsvCheckpoint,
    CsvTail,
    ingest_chunk,
)
from agent.collectors.callstats.directions import Classifier
from agent.collectors.callstats.mariadb_source import MariaDbSource, ingest_rows
from agent.collectors.callstats.settings import CallstatsSettings
from agent.collectors.callstats.store import STATE_FILE, CallstatsStore
from agent.errors import CollectorError
from agent.policy.classes import DataClass

log = structlog.get_logger(__name__)

#: While a backlog is read, chunks are committed together, up to this many ...
BATCH_CHUNKS = 4
#: ... or this many seconds of work, whichever comes first: fewer transactions and
#: fewer rewrites of a bucket that spans two chunks, and still a commit (and the
#: offers that follow it) at least twice a second.
BATCH_SECONDS = 0.5


class CallstatsCollector:
    """Implements :class:`agent.collectors.base.Collector` for CDR call statistics."""

    def __init__(
        self,
        settings: CallstatsSettings,
        state_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
        read_chunk: int = DEFAULT_CHUNK,
    ) -> None:
        """``clock`` and ``read_chunk`` (bytes per CSV batch) are there for tests and benches."""
        self._s = settings
        self._clock = clock
        self._size = int(settings.bucket)
        self._store = CallstatsStore(state_dir / STATE_FILE)
        self._classifier = Classifier(settings)
        self._parse = DateParser(utc=settings.usegmtime)
        self._agg = Aggregator(self._size, self._load)
        self._status_of: dict[int, tuple[str, int]] = {}
        # No bucket after this one is stored: a backlog's new buckets need no look-up.
        self._stored_max = self._store.max_start()
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
        """Read new rows, commit them, offer every bucket that has closed."""
        if not self._s.enabled:
            return
        self._last_poll = self._clock()
        try:
            while True:
                drained = await asyncio.to_thread(self._step)
                await self._offer_closed(emit, drained=drained)
                if drained:
                    break
        except CollectorError as exc:
            if self._error != exc.message:
                log.warning("callstats.source_error", source=self._label, error=exc.message)
            self._error = exc.message
            # The clock still closes buckets while the source is away.
            await self._offer_closed(emit, drained=True)
            raise
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
        await asyncio.to_thread(self._close)

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
        if row.status == "refused":
            return False
        self._status_of[start] = (row.status, row.revision)
        return row.bucket

    def _cutoff(self, now: float) -> int:
        return int(now - self._s.max_age)

    def _step(self) -> bool:
        """Read and commit one batch; True when the source has nothing more right now."""
        now = self._clock()
        if self._tail is not None:
            rows = latest = 0
            deadline = time.monotonic() + BATCH_SECONDS
            for _ in range(BATCH_CHUNKS):
                data, drained = self._tail.read()
                if data:
                    n, end = ingest_chunk(
                        data,
                        self._agg,
                        self._classifier,
                        self._parse,
                        cutoff=self._cutoff(now),
                        skipped=self._skipped,
                    )
                    rows += n
                    latest = max(latest, end)
                if drained or time.monotonic() >= deadline:
                    break
            # One transaction for all of them, checkpoint included: a crash loses the
            # whole batch and the checkpoint with it, so the rows are read again, once.
            self._commit(now, rows, latest, checkpoint=self._tail.checkpoint)
            return drained
        return self._db_step(now)

    def _db_step(self, now: float) -> bool:
        if self._db is None:
            return True
        if self._batches is None:
            low = max(self._high - int(self._s.lookback), self._cutoff(now))
            since = (
                dt.datetime.fromtimestamp(low, dt.UTC).replace(tzinfo=None)
                if self._s.usegmtime
                else dt.datetime.fromtimestamp(low)
            )
            self._batches = self._db.rows(since)
        try:
            batch = next(self._batches)
        except StopIteration:
            self._batches = None
            return True
        except CollectorError:
            self._batches = None
            raise
        new_seen: list[tuple[int, int]] = []
        rows, latest = ingest_rows(
            batch,
            self._agg,
            self._classifier,
            self._parse,
            cutoff=self._cutoff(now),
            skipped=self._skipped,
            seen=self._seen,
            new_seen=new_seen,
            now=int(now),
        )
        self._high = max(self._high, latest)
        prune = self._high - int(self._s.lookback)
        if len(self._seen) > 4 * max(len(new_seen), 1000):
            self._seen = {k: c for k, c in self._seen.items() if c >= prune}
        self._commit(now, rows, latest, seen=(new_seen, prune))
        return False

    def _commit(
        self,
        now: float,
        rows: int,
        latest: int,
        *,
        checkpoint: CsvCheckpoint | None = None,
        seen: tuple[list[tuple[int, int]], int] | None = None,
    ) -> None:
        """Checkpoint, touched buckets and counters in one transaction."""
        self._rows += rows
        self._watermark = max(self._watermark, latest)
        touched = [
            (self._agg.buckets[s], *self._next_status(s))
            for s in self._agg.touched
            if s in self._agg.buckets
        ]
        with self._store.transaction() as db:
            CallstatsStore.save_buckets(db, touched)
            if checkpoint is not None:
                CallstatsStore.put_meta(db, "checkpoint", checkpoint.to_json())
            if seen is not None:
                CallstatsStore.add_seen(db, seen[0], seen[1])
                CallstatsStore.put_meta(db, "db_high", self._high)
            CallstatsStore.put_meta(db, "source", self._label)
            CallstatsStore.put_meta(db, "skipped", self._skipped)
            CallstatsStore.put_meta(db, "rows_read", self._rows)
            CallstatsStore.put_meta(db, "watermark", self._watermark)
            CallstatsStore.prune(db, self._cutoff(now) - self._size)
        status_of = self._status_of
        for b, status, rev in touched:
            status_of[b.start] = (status, rev)
        if touched:
            top = max(b.start for b, _st, _rv in touched)
            if self._stored_max is None or top > self._stored_max:
                self._stored_max = top
        self._agg.touched.clear()

    def _next_status(self, start: int) -> tuple[str, int]:
        status, rev = self._status_of.get(start, ("open", -1))
        return ("revise" if status == "sent" else status), rev

    # -- offering (event loop) ----------------------------------------------------------

    async def _offer_closed(self, emit: Emit, *, drained: bool) -> None:
        now = self._clock()
        size, settle = self._size, self._s.settle
        ready = sorted(
            s
            for s in self._agg.buckets
            if now >= s + size + settle and (drained or self._watermark >= s + size + settle)
        )
        if not ready:
            return
        offers: list[tuple[int, int, dict[str, Any], bool, float]] = []
        for start in ready:
            status, rev = self._status_of.get(start, ("open", -1))
            bucket = self._agg.buckets[start]
            if status in ("open", "revise"):
                body = render(
                    bucket, bucket_seconds=size, revision=rev + 1, min_count=self._s.min_count
                )
                ok = emit(Record(DataClass.CALLSTATS, body))
                offers.append((start, rev + 1, body, ok, now))
        for start, rev, _body, ok, _at in offers:
            if ok:
                self._last_sent = {"bucket_start": iso_utc(start), "revision": rev}
            else:
                self._refused_total += 1
                self._agg.refused.add(start)
        for start in ready:
            self._agg.buckets.pop(start, None)
            self._status_of.pop(start, None)
        floor = self._cutoff(now)
        self._agg.refused = {s for s in self._agg.refused if s >= floor}
        if offers:
            await asyncio.to_thread(
                self._store.mark_offered,
                offers,
                {"last_sent": self._last_sent, "refused_total": self._refused_total},
            )
        log.debug(
            "callstats.offered", buckets=len(offers), refused=sum(1 for o in offers if not o[3])
        )
