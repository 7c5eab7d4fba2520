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
import json
import struct
from collections.abc import Callable, Mapping
from itertools import accumulate
from typing import Any, Final

from agent.collectors.callstats.cdr import ANSWERED, DISPOSITIONS
from agent.collectors.callstats.directions import OTHER, Combo

SCHEMA: Final = "callstats/1"
#: Version of the stored bucket counters (see :meth:`Bucket.encode`). 1 was the
#: ``to_state`` dictionary; the store migrates it on open.
STATE_FORMAT: Final = 2
#: Dispositions counted by name (the CSV hot loop uses it too); others count as OTHER.
KNOWN_DISPOSITIONS: Final = frozenset(DISPOSITIONS)
#: A call longer than this adds to the peak of at most this many later buckets.
MAX_SPAN_SECONDS: Final = 86400


class Bucket:
    """The raw (unfolded) counters of one bucket; kept on the box only.

    Calls are counted once per (direction, trunk, disposition, hour) combination:
    one dictionary update per row instead of four; the per-dimension counts are
    derived when the bucket is rendered or stored.
    """

    __slots__ = ("billsec", "carry", "combos", "deltas", "duration", "start")

    def __init__(self, start: int) -> None:
        self.start = start
        self.duration = 0
        self.billsec = 0
        self.combos: dict[Combo, int] = {}
        self.carry = 0
        self.deltas: dict[int, int] = {}

    @property
    def calls(self) -> int:
        """Calls that started in this bucket."""
        return sum(self.combos.values())

    @property
    def answered(self) -> int:
        """Calls with disposition ANSWERED."""
        return sum(n for (_d, _t, disp, _h), n in self.combos.items() if disp == ANSWERED)

    def _by(self, index: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for combo, n in self.combos.items():
            key = combo[index]
            if key is not None:
                out[key] = out.get(key, 0) + n
        return out

    @property
    def by_direction(self) -> dict[str, int]:
        """Calls per direction."""
        return self._by(0)

    @property
    def by_trunk(self) -> dict[str, int]:
        """Calls per trunk (inbound and outbound calls only)."""
        return self._by(1)

    @property
    def by_disposition(self) -> dict[str, int]:
        """Calls per disposition."""
        return self._by(2)

    @property
    def by_hour(self) -> dict[str, int]:
        """Calls per local hour of day of their start."""
        return self._by(3)

    def peak(self) -> int:
        """The most calls running at once during the bucket."""
        dd = self.deltas
        # The running sum in time order, by C-level iteration (this runs once per rendered
        # bucket, over up to two entries per call).
        return max(accumulate(map(dd.__getitem__, sorted(dd)), initial=self.carry))

    def to_state(self) -> dict[str, Any]:
        """The readable form (state format 1, derived counts included); tests and tools use it."""
        calls, answered, (d_dir, d_trunk, d_disp, d_hour) = self.summary()
        return {
            "calls": calls,
            "answered": answered,
            "duration": self.duration,
            "billsec": self.billsec,
            "dir": d_dir,
            "disp": d_disp,
            "trunk": d_trunk,
            "hour": d_hour,
            "combos": [[*k, v] for k, v in self.combos.items()],
            "carry": self.carry,
            "deltas": [[k, v] for k, v in self.deltas.items() if v],
        }

    @classmethod
    def from_state(cls, start: int, state: Mapping[str, Any]) -> Bucket:
        """The inverse of :meth:`to_state`."""
        b = cls(start)
        b.duration = int(state["duration"])
        b.billsec = int(state["billsec"])
        b.combos = {
            (str(d), None if t is None else str(t), str(disp), str(h)): int(n)
            for d, t, disp, h, n in state["combos"]
        }
        b.carry = int(state["carry"])
        b.deltas = {int(k): int(v) for k, v in state["deltas"]}
        return b

    def summary(self) -> tuple[int, int, list[dict[str, int]]]:
        """(calls, answered, [by direction, by trunk, by disposition, by hour]) in one pass."""
        calls = answered = 0
        d_dir: dict[str, int] = {}
        d_trunk: dict[str, int] = {}
        d_disp: dict[str, int] = {}
        d_hour: dict[str, int] = {}
        for (d, t, disp, h), n in self.combos.items():
            calls += n
            d_dir[d] = d_dir.get(d, 0) + n
            if t is not None:
                d_trunk[t] = d_trunk.get(t, 0) + n
            d_disp[disp] = d_disp.get(disp, 0) + n
            d_hour[h] = d_hour.get(h, 0) + n
        answered = d_disp.get(ANSWERED, 0)
        return calls, answered, [d_dir, d_trunk, d_disp, d_hour]

    def encode(self) -> bytes:
        """The stored form (:data:`STATE_FORMAT` 2): a small binary record, no derived counts.

        ``b"CS" 2 typecode``, then little-endian int64 duration, billsec, carry, the
        length of the combinations' JSON and the number of deltas (uint32 each), the
        JSON ``[keys, counts]``, the delta offsets and the delta values as little-endian
        ``typecode`` (``h`` int16 when they fit, else ``i`` int32). Every touched bucket
        is written at each commit, and the deltas (up to two per call) are most of a
        bucket: one ``struct.pack`` turns them into 2 to 4 bytes each.
        """
        c = self.combos
        dd = self.deltas
        combos = _ENCODE((list(c), list(c.values()))).encode()
        n = len(dd)
        try:
            code = b"h"
            deltas = struct.pack(f"<{2 * n}h", *dd, *dd.values())
        except struct.error:  # buckets over 9 hours, or 32768 calls at one second
            code = b"i"
            deltas = struct.pack(f"<{2 * n}i", *dd, *dd.values())
        head = _HEAD.pack(_MAGIC + code, self.duration, self.billsec, self.carry, len(combos), n)
        return b"".join((head, combos, deltas))

    @classmethod
    def decode(cls, start: int, data: str | bytes) -> Bucket:
        """The inverse of :meth:`encode`; also reads format 1 (the JSON of :meth:`to_state`).

        ValueError (saying what is wrong) when the data is neither.
        """
        try:
            if isinstance(data, str):
                state = json.loads(data)
                if not isinstance(state, dict):
                    raise ValueError("format 1 is a JSON object")
                return cls.from_state(start, state)
            if data[:3] != _MAGIC:
                raise ValueError(f"header {data[:4]!r}")
            code = chr(data[3])
            if code not in "hi":
                raise ValueError(f"array type {code!r}")
            _magic, duration, billsec, carry, n_combos, n_deltas = _HEAD.unpack_from(data)
            pos = _HEAD.size
            keys, counts = json.loads(data[pos : pos + n_combos])
            pos += n_combos
            width = struct.calcsize("<" + code) * n_deltas
            if pos + 2 * width != len(data) or len(keys) != len(counts):
                raise ValueError("lengths do not add up")
            both = struct.unpack_from(f"<{2 * n_deltas}{code}", data, pos)
            offs, vals = both[:n_deltas], both[n_deltas:]
            b = cls(start)
            b.duration = duration
            b.billsec = billsec
            b.carry = carry
            b.combos = {
                (str(d), None if t is None else str(t), str(disp), str(h)): int(n)
                for (d, t, disp, h), n in zip(keys, counts, strict=True)
            }
            b.deltas = {k: v for k, v in zip(offs, vals, strict=True) if v}
        except (TypeError, ValueError, KeyError, struct.error) as exc:
            raise ValueError(
                f"bucket {start}: stored counters are in no known format "
                f"(this agent reads {STATE_FORMAT} and 1): {exc}"
            ) from None
        return b


#: Format 2 header: magic and array typecode, duration, billsec, carry, JSON length, deltas.
_HEAD: Final = struct.Struct("<4sqqqII")
_MAGIC: Final = b"CS" + bytes([STATE_FORMAT])

_ENCODE: Final = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode

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

    def bucket(self, start: int) -> Bucket | None:
        """The bucket starting at ``start``: in memory, loaded, or new; None when refused."""
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
        b = self.bucket(b0)
        if b is not None:
            self.touched.add(b0)
            b.duration += duration
            b.billsec += billsec
            if disposition not in KNOWN_DISPOSITIONS:
                disposition = OTHER
            key = (direction, trunk, disposition, hour)
            c = b.combos
            c[key] = c.get(key, 0) + 1
            dd = b.deltas
            off = start - b0
            dd[off] = dd.get(off, 0) + 1
        end = occupied_end(start, end)
        if end - b0 < size:
            if b is not None:
                dd = b.deltas
                off = end - b0
                dd[off] = dd.get(off, 0) - 1
        else:
            self.carry(b0, end, floor)
        return b is not None

    def carry(self, b0: int, end: int, floor: int) -> None:
        """A call from bucket ``b0`` running to ``end`` (an :func:`occupied_end`, past
        ``b0``'s bucket) raises the carry of every later bucket it reaches and ends in
        the last one."""
        size = self.size
        bs = b0 + size
        while bs < end:
            if bs >= floor:
                nb = self.bucket(bs)
                if nb is not None:
                    self.touched.add(bs)
                    nb.carry += 1
                    if end - bs < size:
                        off = end - bs
                        nb.deltas[off] = nb.deltas.get(off, 0) - 1
            bs += size


def occupied_end(start: int, end: int) -> int:
    """The end of the span a call occupies for the peak: at least one second, at most
    :data:`MAX_SPAN_SECONDS`."""
    if end <= start:
        return start + 1
    if end - start > MAX_SPAN_SECONDS:
        return start + MAX_SPAN_SECONDS
    return end


def fold(counts: Mapping[str, int], min_count: int) -> dict[str, int]:
    """Fold small categories into ``other`` until ``other`` is 0 or at least ``min_count``.

    When even everything together stays under ``min_count``, nothing is left.
    """
    kept: dict[str, int] = {}
    other = 0
    for k, v in counts.items():
        if v >= min_count and k != OTHER:
            kept[k] = v
        else:
            other += v
    while 0 < other < min_count and kept:
        smallest = min(kept, key=lambda k: (kept[k], k))
        other += kept.pop(smallest)
    out = {k: kept[k] for k in sorted(kept)} if len(kept) > 1 else kept
    if other >= min_count:
        out[OTHER] = other
    return out


#: ``YYYY-MM-DDT`` per UTC day number: a bucket start's date is computed once a day.
_DAYS: dict[int, str] = {}


def iso_utc(epoch: int) -> str:
    """Seconds since the epoch as ``2026-05-01T10:05:00Z``."""
    day, sec = divmod(epoch, 86400)
    date = _DAYS.get(day)
    if date is None:
        if len(_DAYS) > 4096:  # a bound, not a policy: any span of days still works
            _DAYS.clear()
        date = _DAYS[day] = dt.datetime.fromtimestamp(day * 86400, dt.UTC).strftime("%Y-%m-%dT")
    h, rem = divmod(sec, 3600)
    m, s = divmod(rem, 60)
    return f"{date}{h:02d}:{m:02d}:{s:02d}Z"


def render(b: Bucket, *, bucket_seconds: int, revision: int, min_count: int) -> dict[str, Any]:
    """The body of one bucket as it may leave the box (see the module docstring)."""
    calls, answered, (d_dir, d_trunk, d_disp, d_hour) = b.summary()
    body: dict[str, Any] = {
        "schema": SCHEMA,
        "bucket_start": iso_utc(b.start),
        "bucket_seconds": bucket_seconds,
        "revision": revision,
        "min_count": min_count,
        "folded": calls < min_count,
    }
    if calls < min_count:
        return body
    small_answered = 0 < answered < min_count
    body["calls"] = calls
    body["answered"] = None if small_answered else answered
    body["duration_sum"] = b.duration
    body["billsec_sum"] = None if small_answered else b.billsec
    body["asr"] = None if small_answered else round(answered / calls, 4)
    body["acd"] = None if small_answered or not answered else round(b.billsec / answered, 1)
    body["peak_concurrent"] = b.peak()
    body["by_direction"] = fold(d_dir, min_count)
    body["by_disposition"] = fold(d_disp, min_count)
    body["by_trunk"] = fold(d_trunk, min_count)
    body["by_hour"] = fold(d_hour, min_count)
    return body
