"""Counters per time bucket, and the one place that turns them into a body that may leave.

A call belongs to the bucket of its start time (as FreePBX's ``calldate``
does). Its counters are pure sums, so late rows simply add to a bucket, and a
revised bucket is the complete sum again, never a delta.

Peak concurrency is kept additive too: for each bucket, ``carry`` counts the
calls already running at its start, and ``deltas`` maps a second offset in the
bucket to the calls starting (+1) and ending (-1) at it. A call occupies
``[start, max(end, start + 1))``; one that spans buckets adds to the carry of
every later bucket it reaches. The peak is the running maximum of
``carry + sum(deltas up to t)``, exact at the one-second resolution of a CDR.

Body (``schema: callstats/1``) of one bucket, the only thing sent::

    {
      "schema": "callstats/1",
      "bucket_start": "2026-05-01T10:05:00Z",   # UTC
      "bucket_seconds": 300,
      "revision": 0,            # +1 each time late rows change a sent bucket
      "min_count": 3,
      "folded": false,          # true: fewer than min_count calls; no counters follow
      "calls": 12,
      "answered": 9,            # null when 0 < answered < min_count (with billsec, asr, acd)
      "duration_sum": 1830,     # seconds, end minus start
      "billsec_sum": 1522,      # seconds, answer to end
      "asr": 0.75,              # answered / calls
      "acd": 169.1,             # billsec_sum / answered
      "peak_concurrent": 4,
      "by_direction": {"inbound": 6, "outbound": 4, "other": ...},
      "by_disposition": {"ANSWERED": 9, "other": 3},
      "by_trunk": {"provider-a": 7, "other": 3},  # inbound/outbound calls only
      "by_hour": {"10": 12}     # local hour of day of the start
    }

In every ``by_*`` mapping a category under ``min_count`` is folded into
``other``, and while ``other`` is itself non-zero but under ``min_count`` the
smallest remaining category is folded in too; a mapping whose whole total is
under ``min_count`` (few trunk calls in a bucket) is sent empty. So no count in
a body is 1 or 2 (with the default) and no subtraction recovers one. No number, name,
extension, account code, channel, unique id or user field is ever part of a
bucket: the rows are reduced to these counters before anything is stored.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any, Final

from agent.collectors.callstats.cdr import ANSWERED, DISPOSITIONS
from agent.collectors.callstats.directions import OTHER

SCHEMA: Final = "callstats/1"
#: A call longer than this adds to the peak of at most this many later buckets.
MAX_SPAN_SECONDS: Final = 86400


class Bucket:
    """The raw (unfolded) counters of one bucket; kept on the box only."""

    __slots__ = (
        "answered",
        "billsec",
        "by_direction",
        "by_disposition",
        "by_hour",
        "by_trunk",
        "calls",
        "carry",
        "deltas",
        "duration",
        "start",
    )

    def __init__(self, start: int) -> None:
        self.start = start
        self.calls = 0
        self.answered = 0
        self.duration = 0
        self.billsec = 0
        self.by_direction: dict[str, int] = {}
        self.by_disposition: dict[str, int] = {}
        self.by_trunk: dict[str, int] = {}
        self.by_hour: dict[str, int] = {}
        self.carry = 0
        self.deltas: dict[int, int] = {}

    def peak(self) -> int:
        """The most calls running at once during the bucket."""
        running = peak = self.carry
        for off in sorted(self.deltas):
            running += self.deltas[off]
            if running > peak:
                peak = running
        return peak

    def to_state(self) -> dict[str, Any]:
        """A JSON-able form for the state file."""
        return {
            "calls": self.calls,
            "answered": self.answered,
            "duration": self.duration,
            "billsec": self.billsec,
            "dir": self.by_direction,
            "disp": self.by_disposition,
            "trunk": self.by_trunk,
            "hour": self.by_hour,
            "carry": self.carry,
            "deltas": [[k, v] for k, v in self.deltas.items() if v],
        }

    @classmethod
    def from_state(cls, start: int, state: Mapping[str, Any]) -> Bucket:
        """The inverse of :meth:`to_state`."""
        b = cls(start)
        b.calls = int(state["calls"])
        b.answered = int(state["answered"])
        b.duration = int(state["duration"])
        b.billsec = int(state["billsec"])
        b.by_direction = {str(k): int(v) for k, v in state["dir"].items()}
        b.by_disposition = {str(k): int(v) for k, v in state["disp"].items()}
        b.by_trunk = {str(k): int(v) for k, v in state["trunk"].items()}
        b.by_hour = {str(k): int(v) for k, v in state["hour"].items()}
        b.carry = int(state["carry"])
        b.deltas = {int(k): int(v) for k, v in state["deltas"]}
        return b


#: Returns the persisted state of a bucket no longer in memory; None: new bucket;
#: False: the bucket was refused by the gate and must never change again.
Loader = Callable[[int], "Bucket | bool | None"]


class Aggregator:
    """Adds calls to buckets; buckets it touched are in :attr:`touched`."""

    def __init__(self, bucket_seconds: int, loader: Loader) -> None:
        self.size = bucket_seconds
        self.buckets: dict[int, Bucket] = {}
        self.refused: set[int] = set()
        self.touched: set[int] = set()
        self._loader = loader

    def _get(self, start: int) -> Bucket | None:
        b = self.buckets.get(start)
        if b is not None:
            return b
        if start in self.refused:
            return None
        loaded = self._loader(start)
        if loaded is False:
            self.refused.add(start)
            return None
        b = loaded if isinstance(loaded, Bucket) else Bucket(start)
        self.buckets[start] = b
        return b

    def add(
        self,
        start: int,
        end: int,
        duration: int,
        billsec: int,
        disposition: str,
        direction: str,
        trunk: str | None,
        hour: str,
        floor: int,
    ) -> bool:
        """Count one call; False when its bucket was refused (the call is not counted).

        ``floor`` is the oldest bucket start still kept: a long call's carry never
        reaches back before it.
        """
        size = self.size
        b0 = start - start % size
        b = self._get(b0)
        counted = b is not None
        if b is not None:
            self.touched.add(b0)
            b.calls += 1
            b.duration += duration
            b.billsec += billsec
            if disposition == ANSWERED:
                b.answered += 1
            elif disposition not in DISPOSITIONS:
                disposition = OTHER
            d = b.by_disposition
            d[disposition] = d.get(disposition, 0) + 1
            d = b.by_direction
            d[direction] = d.get(direction, 0) + 1
            if trunk is not None:
                d = b.by_trunk
                d[trunk] = d.get(trunk, 0) + 1
            d = b.by_hour
            d[hour] = d.get(hour, 0) + 1
            dd = b.deltas
            off = start - b0
            dd[off] = dd.get(off, 0) + 1
        end = max(end, start + 1)
        end = min(end, start + MAX_SPAN_SECONDS)
        if end - b0 < size:
            if b is not None:
                off = end - b0
                b.deltas[off] = b.deltas.get(off, 0) - 1
            return counted
        # The call runs past its own bucket: it raises the carry of every later one it reaches.
        bs = b0 + size
        while bs < end:
            if bs >= floor:
                nb = self._get(bs)
                if nb is not None:
                    self.touched.add(bs)
                    nb.carry += 1
                    if end - bs < size:
                        off = end - bs
                        nb.deltas[off] = nb.deltas.get(off, 0) - 1
            bs += size
        return counted


def fold(counts: Mapping[str, int], min_count: int) -> dict[str, int]:
    """Fold small categories into ``other`` until ``other`` is 0 or at least ``min_count``.

    When even everything together stays under ``min_count``, nothing is left.
    """
    kept = {k: v for k, v in counts.items() if v >= min_count and k != OTHER}
    other = sum(counts.values()) - sum(kept.values())
    while 0 < other < min_count and kept:
        smallest = min(kept, key=lambda k: (kept[k], k))
        other += kept.pop(smallest)
    out = dict(sorted(kept.items()))
    if other >= min_count:
        out[OTHER] = other
    return out


def iso_utc(epoch: int) -> str:
    """Seconds since the epoch as ``2026-05-01T10:05:00Z``."""
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def render(b: Bucket, *, bucket_seconds: int, revision: int, min_count: int) -> dict[str, Any]:
    """The body of one bucket as it may leave the box (see the module docstring)."""
    body: dict[str, Any] = {
        "schema": SCHEMA,
        "bucket_start": iso_utc(b.start),
        "bucket_seconds": bucket_seconds,
        "revision": revision,
        "min_count": min_count,
        "folded": b.calls < min_count,
    }
    if b.calls < min_count:
        return body
    small_answered = 0 < b.answered < min_count
    body.update(
        {
            "calls": b.calls,
            "answered": None if small_answered else b.answered,
            "duration_sum": b.duration,
            "billsec_sum": None if small_answered else b.billsec,
            "asr": None if small_answered else round(b.answered / b.calls, 4),
            "acd": (None if small_answered or not b.answered else round(b.billsec / b.answered, 1)),
            "peak_concurrent": b.peak(),
            "by_direction": fold(b.by_direction, min_count),
            "by_disposition": fold(b.by_disposition, min_count),
            "by_trunk": fold(b.by_trunk, min_count),
            "by_hour": fold(b.by_hour, min_count),
        }
    )
    return body
