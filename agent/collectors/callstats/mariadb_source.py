"""Reading FreePBX's ``asteriskcdrdb.cdr`` table incrementally, read-only, without doubles.

FreePBX's ``cdr`` table has no auto-increment id, and a row is inserted when
its call ends but keyed by ``calldate``, the call's start. So "everything after
the last calldate seen" would miss a long call whose row arrives after shorter
calls that started later. Each poll therefore re-reads a look-back window
(``calldate >= high - lookback``, on FreePBX's ``calldate`` index) and skips
rows already counted, recognised by an 8-byte hash of the fields that make a
CDR row unique (``calldate``, ``uniqueid``, ``sequence``, channels, times).
The hashes live in the state file with the counters, committed in the same
transaction, so a restart re-reads the window and counts each row once. A row
whose call lasted longer than the window and was inserted after the window
moved past its start is not counted; keep ``lookback`` above the longest call.

Text columns are fetched as bytes (``BINARY``) so that a row with bytes that
are not UTF-8 is skipped and counted instead of failing the whole query. The
session is set ``READ ONLY``; the account should be one with SELECT on the
table only. PyMySQL (pure Python, maintained) is the driver.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pymysql
import pymysql.cursors

from agent.collectors.callstats.aggregate import Aggregator
from agent.collectors.callstats.cdr import DateParser, Skip
from agent.collectors.callstats.directions import Classifier
from agent.collectors.callstats.settings import redact_dsn
from agent.errors import CollectorError

BATCH_ROWS = 20_000


@dataclass(frozen=True, slots=True)
class Dsn:
    """The parts of ``mysql://user:pass@host:port/db?unix_socket=…``."""

    host: str
    port: int
    user: str
    password: str
    database: str
    unix_socket: str | None

    @classmethod
    def parse(cls, dsn: str) -> Dsn:
        """Split a connection string; errors never repeat the password."""
        parts = urlsplit(dsn)
        if parts.scheme != "mysql" or not parts.path.strip("/"):
            raise CollectorError(f"{redact_dsn(dsn)}: expected mysql://user:pass@host[:port]/db")
        try:
            port = parts.port or 3306
        except ValueError:
            raise CollectorError(f"{redact_dsn(dsn)}: port out of range") from None
        socket = parse_qs(parts.query).get("unix_socket", [None])[0]
        return cls(
            host=parts.hostname or "localhost",
            port=port,
            user=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
            database=unquote(parts.path.strip("/")),
            unix_socket=socket,
        )


def row_key(
    calldate: object,
    uniqueid: bytes,
    sequence: object,
    channel: bytes,
    dstchannel: bytes,
    duration: object,
    billsec: object,
) -> int:
    """A signed 64-bit hash identifying one CDR row (never leaves the box)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{calldate}|{sequence}|{duration}|{billsec}|".encode())
    h.update(uniqueid + b"|" + channel + b"|" + dstchannel)
    return int.from_bytes(h.digest(), "big", signed=True)


class MariaDbSource:
    """One read-only connection, re-opened after errors."""

    def __init__(self, dsn: str, table: str, *, batch: int = BATCH_ROWS) -> None:
        self._dsn_text = dsn
        self.label = redact_dsn(dsn)
        self.table = table
        self.batch = batch
        self._conn: pymysql.connections.Connection[Any] | None = None
        self._has_sequence: bool | None = None

    def _connect(self) -> pymysql.connections.Connection[Any]:
        if self._conn is not None:
            return self._conn
        d = Dsn.parse(self._dsn_text)
        try:
            conn = pymysql.connect(
                host=d.host,
                port=d.port,
                user=d.user,
                password=d.password,
                database=d.database,
                unix_socket=d.unix_socket,
                charset="utf8mb4",
                connect_timeout=10,
                read_timeout=600,
                autocommit=True,
            )
            with conn.cursor() as cur:
                cur.execute("SET SESSION TRANSACTION READ ONLY")
                cur.execute(
                    "SELECT COUNT(*) FROM information_schema.columns WHERE "
                    "table_schema = DATABASE() AND table_name = %s AND "
                    "column_name = 'sequence'",
                    (self.table,),
                )
                found = cur.fetchone()
                self._has_sequence = bool(found and found[0])
        except pymysql.MySQLError as exc:
            raise CollectorError(
                f"{self.label}: cannot connect to the CDR database: {_reason(exc)}"
            ) from None
        self._conn = conn
        return conn

    def close(self) -> None:
        """Close the connection (it is opened again on the next read)."""
        if self._conn is not None:
            try:
                self._conn.close()
            except pymysql.MySQLError:
                pass
            self._conn = None

    def rows(self, since: dt.datetime | None) -> Iterator[list[tuple[Any, ...]]]:
        """Batches of ``(calldate, dcontext, channel, dstchannel, duration, billsec,
        disposition, uniqueid, sequence)`` with calldate >= ``since``, oldest first."""
        conn = self._connect()
        seq = "`sequence`" if self._has_sequence else "0"
        # The table name is validated by the settings parser (a plain identifier).
        sql = (
            f"SELECT calldate, BINARY dcontext, BINARY channel, BINARY dstchannel, "  # noqa: S608
            f"duration, billsec, BINARY disposition, BINARY uniqueid, {seq} "
            f"FROM `{self.table}` WHERE calldate >= %s ORDER BY calldate"
        )
        try:
            with conn.cursor(pymysql.cursors.SSCursor) as cur:
                cur.execute(sql, (since or dt.datetime(1970, 1, 2),))
                while True:
                    batch = cur.fetchmany(self.batch)
                    if not batch:
                        break
                    yield list(batch)
        except pymysql.MySQLError as exc:
            self.close()
            raise CollectorError(
                f"{self.label}: reading table {self.table!r} failed: {_reason(exc)}"
            ) from None


def _reason(exc: pymysql.MySQLError) -> str:
    # MySQL's messages name the user and host, never the password.
    args: tuple[Any, ...] = tuple(getattr(exc, "args", ()))
    if len(args) >= 2:
        return f"{args[1]} (error {args[0]})"
    return str(exc) or type(exc).__name__


_HOURS = tuple(f"{h:02d}" for h in range(24))


def ingest_rows(
    batch: list[tuple[Any, ...]],
    agg: Aggregator,
    classify: Classifier,
    parse: DateParser,
    *,
    cutoff: int,
    skipped: dict[str, int],
    seen: dict[int, int],
    new_seen: list[tuple[int, int]],
    now: int,
) -> tuple[int, int]:
    """Count rows not in ``seen``; returns (rows looked at, latest calldate as epoch).

    Keys of counted (or skipped) rows go to ``seen`` and ``new_seen`` so that the
    next pass over the look-back window does not count them again.
    """
    rows = 0
    latest = 0
    floor = cutoff - cutoff % agg.size
    hours: dict[tuple[int, int, int, int], int] = {}
    for calldate, dcontext, channel, dstchannel, duration, billsec, disp, uniqueid, seq in batch:
        key = row_key(
            calldate, uniqueid or b"", seq, channel or b"", dstchannel or b"", duration, billsec
        )
        if key in seen:
            continue
        rows += 1
        reason: str | None = None
        start = 0
        if not isinstance(calldate, dt.datetime):
            reason = Skip.DATE
        else:
            hk = (calldate.year, calldate.month, calldate.day, calldate.hour)
            base = hours.get(hk)
            if base is None:
                try:
                    base = parse.hour_epoch(f"{hk[0]:04d}-{hk[1]:02d}-{hk[2]:02d} {hk[3]:02d}")
                except ValueError:
                    base = -1
                hours[hk] = base
            if base < 0:
                reason = Skip.DATE
            else:
                start = base + calldate.minute * 60 + calldate.second
        if reason is None:
            if not isinstance(duration, int) or not isinstance(billsec, int):
                reason = Skip.NUMBER
            elif duration < 0 or billsec < 0:
                reason = Skip.NEGATIVE
            elif start < cutoff:
                reason = Skip.TOO_OLD
        texts: list[str] = []
        if reason is None:
            try:
                texts = [(v or b"").decode("utf-8") for v in (dcontext, channel, dstchannel, disp)]
            except UnicodeDecodeError:
                reason = Skip.ENCODING
        cd = start if start > 0 else now
        seen[key] = cd
        new_seen.append((key, cd))
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        direction, trunk = classify.classify(texts[0], texts[1], texts[2])
        if not agg.add(
            start,
            start + duration,
            duration,
            billsec,
            texts[3],
            direction,
            trunk,
            _HOURS[calldate.hour],
            floor,
        ):
            skipped[Skip.REFUSED] = skipped.get(Skip.REFUSED, 0) + 1
        if start > latest:
            latest = start
    return rows, latest
