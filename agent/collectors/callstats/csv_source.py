"""Following ``Master.csv`` the way ``tail -F`` does, without losing or repeating a row.

Asterisk opens, appends one whole line and closes the file for every call, and
logrotate either renames it (a new inode appears at the path) or copies and
truncates it. :class:`CsvTail` keeps the file open between polls, hands out
only complete lines (a partial last line waits for the next read) and reports
a checkpoint ``(dev, inode, offset, head)`` after each chunk; ``head`` is a
hash of the file's first bytes, so a truncated-and-refilled file or a recycled
inode is noticed even when it has grown past the old offset.

On rotation the old file is read to its end before the new one is opened. On
restart with a checkpoint whose inode is no longer at the path, the directory
is searched for it (``Master.csv.1`` after a rename), so rows written just
before a rotation while the agent was down are still counted.

:func:`ingest_chunk` is the hot loop: bytes to counters, with every bad row
skipped and counted by reason.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import structlog

from agent.collectors.callstats.aggregate import (
    MAX_SPAN_SECONDS,
    Aggregator,
    occupied_end,
)
from agent.collectors.callstats.cdr import (
    I_BILLSEC,
    I_CHANNEL,
    I_DCONTEXT,
    I_DISPOSITION,
    I_DSTCHANNEL,
    I_DURATION,
    I_END,
    I_START,
    MAX_COLUMNS,
    MIN_COLUMNS,
    MINUTE_SECONDS,
    DateParser,
    Skip,
)
from agent.collectors.callstats.directions import Classifier
from agent.errors import CollectorError

log = structlog.get_logger(__name__)

DEFAULT_CHUNK = 4 * 1024 * 1024
_HEAD = 1024


@dataclass(frozen=True, slots=True)
class CsvCheckpoint:
    """Where reading stopped: which file (device, inode, head hash) and the byte offset."""

    dev: int
    ino: int
    offset: int
    head: str

    def to_json(self) -> dict[str, Any]:
        """For the state file."""
        return {"dev": self.dev, "ino": self.ino, "offset": self.offset, "head": self.head}

    @classmethod
    def from_json(cls, d: Any) -> CsvCheckpoint | None:
        """The inverse of :meth:`to_json`; None for anything else."""
        if not isinstance(d, dict):
            return None
        try:
            return cls(
                dev=int(d["dev"]), ino=int(d["ino"]), offset=int(d["offset"]), head=str(d["head"])
            )
        except (KeyError, TypeError, ValueError):
            return None


def _head_hash(f: IO[bytes], length: int) -> str:
    data = os.pread(f.fileno(), length, 0)
    return f"{len(data)}:{hashlib.sha256(data).hexdigest()[:32]}"


class CsvTail:
    """Complete lines appended to one path, across rotation and truncation."""

    def __init__(
        self, path: Path, checkpoint: CsvCheckpoint | None, *, chunk: int = DEFAULT_CHUNK
    ) -> None:
        self.path = path
        self.chunk = chunk
        self.rotations = 0
        self.truncations = 0
        self.lost_rotated = 0  # old file gone before it was read to the end
        self._cp = checkpoint
        self._f: IO[bytes] | None = None
        self._id = (0, 0)
        self._offset = 0
        self._head = ""

    @property
    def checkpoint(self) -> CsvCheckpoint | None:
        """The position after the last complete line handed out."""
        if self._f is None:
            return self._cp
        return CsvCheckpoint(dev=self._id[0], ino=self._id[1], offset=self._offset, head=self._head)

    def close(self) -> None:
        """Close the open file, keeping the checkpoint."""
        if self._f is not None:
            self._cp = self.checkpoint
            self._f.close()
            self._f = None

    def _use(self, f: IO[bytes], offset: int) -> None:
        st = os.fstat(f.fileno())
        self._f = f
        self._id = (st.st_dev, st.st_ino)
        self._offset = offset
        self._head = _head_hash(f, min(offset, _HEAD))

    def _stat_path(self) -> os.stat_result | None:
        try:
            return os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CollectorError(f"{self.path}: cannot stat the CDR file: {exc.strerror}") from exc

    def _open_path(self) -> IO[bytes]:
        try:
            return open(self.path, "rb")  # kept open across polls on purpose
        except FileNotFoundError:
            raise CollectorError(
                f"{self.path}: CDR file not found; is cdr_csv loaded "
                "(cdr.conf [csv]) and the path in collectors.callstats."
                "source.csv right?"
            ) from None
        except PermissionError:
            raise CollectorError(
                f"{self.path}: permission denied; the agent's user needs "
                "read access to the CDR file (e.g. group asterisk)"
            ) from None
        except OSError as exc:
            raise CollectorError(f"{self.path}: cannot open the CDR file: {exc.strerror}") from exc

    def _find_by_inode(self, cp: CsvCheckpoint) -> Path | None:
        try:
            with os.scandir(self.path.parent) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if (st.st_dev, st.st_ino) == (cp.dev, cp.ino) and entry.is_file():
                        return Path(entry.path)
        except OSError:
            return None
        return None

    def _open_initial(self) -> None:
        cp = self._cp
        st = self._stat_path()
        if cp is not None and st is not None and (st.st_dev, st.st_ino) == (cp.dev, cp.ino):
            f = self._open_path()
            self._resume(f, cp)
            return
        if cp is not None:
            old = self._find_by_inode(cp)
            if old is not None:
                old_f: IO[bytes] | None
                try:
                    old_f = open(old, "rb")  # noqa: SIM115 -- drained, then closed in read()
                except OSError:
                    old_f = None
                if old_f is not None:
                    log.info("callstats.csv.resume_rotated", file=str(old), offset=cp.offset)
                    self._resume(old_f, cp)
                    return
            elif cp.offset > 0:
                self.lost_rotated += 1
                log.warning(
                    "callstats.csv.rotated_file_gone",
                    path=str(self.path),
                    hint="rows written after the last read and before rotation were not counted",
                )
        self._use(self._open_path(), 0)

    def _resume(self, f: IO[bytes], cp: CsvCheckpoint) -> None:
        size = os.fstat(f.fileno()).st_size
        if size < cp.offset or _head_hash(f, min(cp.offset, _HEAD)) != cp.head:
            self.truncations += 1
            log.info("callstats.csv.truncated", path=str(self.path), offset=cp.offset, size=size)
            self._use(f, 0)
        else:
            self._use(f, cp.offset)

    def read(self) -> tuple[bytes, bool]:
        """The next run of complete lines (may be empty) and whether the source is drained."""
        if self._f is None:
            self._open_initial()
        while True:
            f = self._f
            if f is None:  # a failed reopen after rotation: try again from the start
                self._open_initial()
                continue
            size = os.fstat(f.fileno()).st_size
            if size < self._offset or (
                self._offset and _head_hash(f, min(self._offset, _HEAD)) != self._head
            ):
                self.truncations += 1
                log.info(
                    "callstats.csv.truncated", path=str(self.path), offset=self._offset, size=size
                )
                self._use(f, 0)
            data = os.pread(f.fileno(), self.chunk, self._offset)
            cut = data.rfind(b"\n")
            if cut >= 0:
                lines = data[: cut + 1]
                self._offset += len(lines)
                if self._offset - len(lines) < _HEAD:
                    self._head = _head_hash(f, min(self._offset, _HEAD))
                return lines, False
            if len(data) >= self.chunk:
                # cdr_csv never writes a line over 1 KiB: this is not a CDR line. Drop the
                # chunk and hand out one empty line, so it is counted as a bad row.
                self._offset += len(data)
                return b"\n", False
            st = self._stat_path()
            if st is not None and (st.st_dev, st.st_ino) != self._id:
                self.rotations += 1
                log.info("callstats.csv.rotated", path=str(self.path), left_partial=len(data) > 0)
                f.close()
                self._f = None
                self._use(self._open_path(), 0)
                continue
            return b"", True


def ingest_chunk(
    chunk: bytes,
    agg: Aggregator,
    classify: Classifier,
    parse: DateParser,
    *,
    cutoff: int,
    skipped: dict[str, int],
) -> tuple[int, int]:
    """Count the rows of ``chunk`` (complete lines); returns (rows seen, latest end time).

    Bad rows are skipped and counted in ``skipped`` by :class:`Skip` reason.
    """
    rows = 0
    try:
        lines: list[str] = chunk.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        # Rare: find the offending lines one by one, keep the others.
        lines = []
        for raw in chunk.split(b"\n"):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                rows += 1
                skipped[Skip.ENCODING] = skipped.get(Skip.ENCODING, 0) + 1
    if lines and lines[-1] == "":
        lines.pop()
    latest = 0
    bad_cols = bad_date = bad_num = negative = too_old = refused = 0
    size = agg.size
    floor = cutoff - cutoff % size
    buckets_get = agg.buckets.get
    bucket = agg.bucket
    carry = agg.carry
    size2 = 2 * size
    touch = agg.touched.add
    touched = -1  # the bucket touched last: rows come in time order, most share it
    minute_seconds = MINUTE_SECONDS
    # Bound once: this loop runs for every row, and attribute lookups are most of its cost.
    hour_get = parse.hours.get
    hour_epoch = parse.hour_epoch
    cache_get = classify.cache.get
    route_ = classify.route
    reader = csv.reader(lines)
    while True:
        try:
            for row in reader:
                rows += 1
                n = len(row)
                if n < MIN_COLUMNS or n > MAX_COLUMNS:
                    bad_cols += 1
                    continue
                s = row[I_START]
                e = row[I_END]
                try:
                    # DateParser.__call__, inlined: the hour's epoch from its cache, plus
                    # minutes and seconds by one look-up (a missing key: not ``:MM:SS``).
                    t = hour_get(s[:13])
                    if t is None:
                        t = hour_epoch(s[:13])
                    start = t + minute_seconds[s[13:]]
                    if e:
                        t = hour_get(e[:13])
                        if t is None:
                            t = hour_epoch(e[:13])
                        end = t + minute_seconds[e[13:]]
                    else:
                        end = -1
                except (ValueError, KeyError):
                    bad_date += 1
                    continue
                try:
                    duration = int(row[I_DURATION])
                    billsec = int(row[I_BILLSEC])
                except ValueError:
                    bad_num += 1
                    continue
                if end < 0:
                    end = start + duration
                if duration < 0 or billsec < 0 or end < start:
                    negative += 1
                    continue
                if start < cutoff:
                    too_old += 1
                    continue
                dcontext = row[I_DCONTEXT]
                ch = row[I_CHANNEL]
                dch = row[I_DSTCHANNEL]
                # Classifier.route, inlined for cache hits (the same key it builds).
                route = cache_get(
                    (dcontext, ch.rpartition("-")[0] or ch, dch.rpartition("-")[0] or dch)
                )
                if route is None:
                    route = route_(dcontext, ch, dch)
                if end > latest:
                    latest = end
                # Aggregator.add, inlined but for the carry into later buckets.
                b0 = start - start % size
                b = buckets_get(b0)
                if b is None:
                    b = bucket(b0)
                    if b is None:
                        # Refused: not counted, yet still running in later buckets (as add()).
                        carry(b0, occupied_end(start, end), floor)
                        refused += 1
                        continue
                if b0 != touched:
                    touch(b0)
                    touched = b0
                b.duration += duration
                b.billsec += billsec
                disp = row[I_DISPOSITION]
                try:
                    key = route.keys[disp][s[11:13]]
                except KeyError:
                    key = route.key(disp, s[11:13])
                c = b.combos
                c[key] = c.get(key, 0) + 1
                dd = b.deltas
                off = start - b0
                dd[off] = dd.get(off, 0) + 1
                # occupied_end(), inlined: at least one second, at most MAX_SPAN_SECONDS.
                if end <= start:
                    end = start + 1
                elif end - start > MAX_SPAN_SECONDS:
                    end = start + MAX_SPAN_SECONDS
                off = end - b0
                if off < size:
                    dd[off] = dd.get(off, 0) - 1
                elif size < off < size2:
                    # Into the next bucket only (the common case for bucket-sized calls):
                    # Aggregator.carry for one bucket, inlined.
                    bs = b0 + size
                    nb = buckets_get(bs) or bucket(bs)
                    if nb is not None:
                        touch(bs)
                        nb.carry += 1
                        dd = nb.deltas
                        off -= size
                        dd[off] = dd.get(off, 0) - 1
                elif off > size:
                    carry(b0, end, floor)
            break
        except csv.Error:
            # The reader resumes at the next line after an error.
            rows += 1
            bad_cols += 1
    for reason, count in (
        (Skip.COLUMNS, bad_cols),
        (Skip.DATE, bad_date),
        (Skip.NUMBER, bad_num),
        (Skip.NEGATIVE, negative),
        (Skip.TOO_OLD, too_old),
        (Skip.REFUSED, refused),
    ):
        if count:
            skipped[reason] = skipped.get(reason, 0) + count
    return rows, latest
