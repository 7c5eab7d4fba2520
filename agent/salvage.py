"""Salvage queued envelopes from a database that was moved aside as corrupt.

Damage is usually local: a few pages of a file SQLite can otherwise read. The
outbox rows on the healthy pages are envelopes the gate approved and the
customer's policy let through; dropping them with the file would lose data the
promise says is kept until the broker has it. So the moved-aside file is read
(read-only, never written) in ranges of seq; a range that fails is split until
each failing row is skipped alone, and every row read is checked against its
own payload (a JSON envelope with the same id, seq and class) before it is
queued again. The ledger of the damaged file is not carried over: the new
ledger starts with a ``reset`` entry that says what was lost and how many
envelopes were salvaged.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent.policy.classes import DataClass

CHUNK = 256

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Row:
    """One queued envelope, as stored."""

    seq: int
    id: str
    data_class: str
    ts: str
    payload: bytes


@dataclass(slots=True)
class Salvage:
    """What could be read back."""

    rows: list[Row] = field(default_factory=list)
    unreadable: int = 0  # seqs in range whose row could not be read or did not check out
    error: str | None = None  # why nothing at all could be read


def salvage_outbox(path: Path, *, max_seq_hint: int = 0) -> Salvage:
    """Read every outbox row of ``path`` that can still be read and checks out."""
    out = Salvage()
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        out.error = str(exc)
        return out
    try:
        low, high = _bounds(conn, max_seq_hint)
        if high < low:
            return out
        start = low
        while start <= high:
            end = min(start + CHUNK - 1, high)
            _read_range(conn, start, end, out)
            start = end + 1
    except sqlite3.Error as exc:
        out.error = str(exc)
    finally:
        conn.close()
    log.warning(
        "outbox_salvaged",
        path=str(path),
        rows=len(out.rows),
        unreadable=out.unreadable,
        error=out.error,
    )
    return out


def _bounds(conn: sqlite3.Connection, hint: int) -> tuple[int, int]:
    """The lowest and highest seq to try: from the table if it answers, else the hint."""
    low, high = 1, hint
    for sql, use in (
        ("SELECT MIN(seq) FROM outbox", "low"),
        ("SELECT MAX(seq) FROM outbox", "high"),
    ):
        try:
            value = conn.execute(sql).fetchone()[0]
        except sqlite3.Error:
            continue  # the b-tree's edge is damaged: fall back to the hint
        if value is None:
            continue
        if use == "low":
            low = int(value)
        else:
            high = max(high, int(value))
    try:
        meta = conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
        if meta is not None:
            high = max(high, int(meta[0]))
    except (sqlite3.Error, ValueError, TypeError):
        pass
    return low, high


def _read_range(conn: sqlite3.Connection, start: int, end: int, out: Salvage) -> None:
    try:
        rows = conn.execute(
            "SELECT seq, id, class, ts, payload FROM outbox WHERE seq BETWEEN ? AND ? ORDER BY seq",
            (start, end),
        ).fetchall()
    except sqlite3.Error:
        if start == end:
            out.unreadable += 1
            return
        mid = (start + end) // 2
        _read_range(conn, start, mid, out)
        _read_range(conn, mid + 1, end, out)
        return
    for seq, id_, data_class, ts, payload in rows:
        row = _checked(seq, id_, data_class, ts, payload)
        if row is None:
            out.unreadable += 1
        else:
            out.rows.append(row)


def _checked(
    seq: object, id_: object, data_class: object, ts: object, payload: object
) -> Row | None:
    """The row if it is an envelope whose payload agrees with its columns, else None."""
    if not (
        isinstance(seq, int)
        and isinstance(id_, str)
        and isinstance(data_class, str)
        and isinstance(ts, str)
        and isinstance(payload, bytes)
    ):
        return None
    if data_class not in {c.value for c in DataClass}:
        return None
    try:
        env = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return None
    if not (
        isinstance(env, dict)
        and env.get("id") == id_
        and env.get("seq") == seq
        and env.get("class") == data_class
        and env.get("ts") == ts
    ):
        return None
    return Row(seq, id_, data_class, ts, payload)
