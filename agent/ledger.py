"""The egress ledger: an append-only, hash-chained account of everything that leaves.

Each entry holds its kind (``delivered``, ``switch``, ``command``,
``dropped``, ``reset``, ``support``, ``enroll``, ``renew``), a small JSON body (never the
content sent, only its size and SHA-256), the hash of the entry before it and its own hash::

    hash = sha256(prev_hash || "\\n" || n || "\\n" || ts || "\\n" || kind || "\\n" || data)

so a deleted, reordered or edited entry breaks the chain at that point, which
``agentctl audit verify`` reports. The customer reads it; the vendor never
writes it.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from agent.store import transaction

GENESIS = "0" * 64


def entry_hash(prev: str, n: int, ts: float, kind: str, data: str) -> str:
    """The hash of one ledger entry, chained to the one before."""
    h = hashlib.sha256()
    h.update(f"{prev}\n{n}\n{ts!r}\n{kind}\n{data}".encode())
    return h.hexdigest()


def canonical(data: dict[str, Any]) -> str:
    """The one JSON spelling of an entry's data that its hash covers."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


#: A string that ``json.dumps(..., ensure_ascii=True)`` spells as itself between quotes:
#: printable ASCII without ``"`` or ``\\``.
_PLAIN = re.compile(r"[ !#-\[\]-~]*").fullmatch


def delivered_text(data_class: str, envelope_id: str, seq: int, size: int, sha256: str) -> str:
    """``canonical()`` of a ``delivered`` entry's data, without building a dictionary.

    The delivery path writes one such entry per acknowledged envelope; spelling it by
    hand is several times cheaper than the JSON encoder, and the text is the same, byte
    for byte (``tests/test_ledger.py`` checks it against :func:`canonical`), so the
    hash chain and ``audit verify`` cannot tell the difference. Strings JSON would
    escape take the encoder's path.
    """
    if type(seq) is int and type(size) is int and _PLAIN(f"{data_class}{envelope_id}{sha256}"):
        return _spelt(data_class, envelope_id, seq, size, sha256)
    return canonical(
        {"id": envelope_id, "class": data_class, "seq": seq, "size": size, "sha256": sha256}
    )


def delivered_texts(rows: list[tuple[str, str, int, int, str]]) -> list[str]:
    """:func:`delivered_text` of each (class, id, seq, size, sha256), checking the strings
    of the whole batch with one match when they are all plain (as the agent's are)."""
    if _PLAIN("".join(f"{c}{i}{h}" for c, i, _s, _z, h in rows)) and all(
        type(s) is int and type(z) is int for _c, _i, s, z, _h in rows
    ):
        return [_spelt(*row) for row in rows]
    return [delivered_text(*row) for row in rows]


def _spelt(data_class: str, envelope_id: str, seq: int, size: int, sha256: str) -> str:
    return (
        f'{{"class":"{data_class}","id":"{envelope_id}","seq":{seq},'
        f'"sha256":"{sha256}","size":{size}}}'
    )


@dataclass(frozen=True, slots=True)
class Entry:
    """One ledger entry as stored."""

    n: int
    ts: float
    kind: str
    data: dict[str, Any]
    prev: str
    hash: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """The result of checking the chain."""

    ok: bool
    entries: int
    broken_at: int | None = None
    reason: str | None = None
    head: str | None = None  # hash of the last entry checked
    resets: tuple[Entry, ...] = ()  # "reset" entries: the chain is whole only since them

    @property
    def lost(self) -> bool:
        """Whether the chain is intact but earlier entries were lost (a reset)."""
        return self.ok and bool(self.resets)


def describe_reset(entry: Entry) -> str:
    """One sentence on what a ``reset`` entry says was lost."""
    data = entry.data
    lost = data.get("lost")
    why = str(data.get("reason", "no reason recorded"))
    if not isinstance(lost, dict):
        return f"reset at entry {entry.n}: {why}; what was lost before it is not known"
    entries = lost.get("entries")
    count = "an unknown number of" if entries is None else str(entries)
    text = (
        f"reset at entry {entry.n}: {count} earlier entries lost (old head: entry "
        f"{lost.get('head_n')}, hash {lost.get('head_hash')}; last seq {lost.get('last_seq')}; "
        f"{lost.get('queued')} envelopes were queued"
    )
    if "salvaged" in data:
        text += f", {data['salvaged']} salvaged, {data.get('unreadable', 0)} unreadable"
    return f"{text}). Why: {why}"


class Ledger:
    """Appends to and reads the ledger table of the agent's database."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        row = conn.execute("SELECT n, hash FROM ledger ORDER BY n DESC LIMIT 1").fetchone()
        self._last_n: int = int(row[0]) if row else 0
        self._last_hash: str = str(row[1]) if row else GENESIS

    def append(self, kind: str, data: dict[str, Any], *, ts: float | None = None) -> Entry:
        """Append one entry. Call inside the caller's transaction when it must be atomic."""
        n = self._last_n + 1
        ts = time.time() if ts is None else ts
        text = canonical(data)
        digest = entry_hash(self._last_hash, n, ts, kind, text)
        self.conn.execute(
            "INSERT INTO ledger VALUES (?, ?, ?, ?, ?, ?)",
            (n, ts, kind, text, self._last_hash, digest),
        )
        entry = Entry(n, ts, kind, data, self._last_hash, digest)
        self._last_n, self._last_hash = n, digest
        return entry

    def append_many(self, kind: str, datas: list[dict[str, Any]]) -> None:
        """Append several entries of one kind in one statement (inside the caller's transaction)."""
        self.append_texts(kind, [canonical(data) for data in datas])

    def append_texts(self, kind: str, texts: list[str]) -> None:
        """:meth:`append_many` for data already in its :func:`canonical` spelling (such as
        :func:`delivered_text`); one timestamp and one statement for the batch."""
        rows = []
        n, prev = self._last_n, self._last_hash
        ts = time.time()
        # entry_hash(), inlined: the same bytes hashed, once per acknowledged envelope.
        head = f"\n{ts!r}\n{kind}\n"
        sha256 = hashlib.sha256
        for text in texts:
            n += 1
            digest = sha256(f"{prev}\n{n}{head}{text}".encode()).hexdigest()
            rows.append((n, ts, kind, text, prev, digest))
            prev = digest
        self.conn.executemany("INSERT INTO ledger VALUES (?, ?, ?, ?, ?, ?)", rows)
        self._last_n, self._last_hash = n, prev

    @property
    def head(self) -> tuple[int, str]:
        """The last entry's number and hash: what a customer can note to detect a rewrite."""
        return self._last_n, self._last_hash

    def record(self, kind: str, data: dict[str, Any]) -> Entry:
        """Append one entry in a transaction of its own; :class:`StateError` if it fails."""
        with transaction(self.conn, f"ledger: cannot record a {kind} entry", follows=self):
            return self.append(kind, data)

    def mark(self) -> tuple[int, str]:
        """The head, to come back to if a transaction that appends is rolled back."""
        return self._last_n, self._last_hash

    def rewind(self, mark: tuple[int, str]) -> None:
        """Come back to a head from :meth:`mark` (the entries after it were rolled back)."""
        self._last_n, self._last_hash = mark


def read(
    conn: sqlite3.Connection,
    *,
    since: float | None = None,
    kind: str | None = None,
    data_class: str | None = None,
) -> Iterator[Entry]:
    """Entries in order, optionally filtered by time, kind and the class they concern."""
    sql = "SELECT n, ts, kind, data, prev, hash FROM ledger WHERE 1=1"
    args: list[Any] = []
    if since is not None:
        sql += " AND ts >= ?"
        args.append(since)
    if kind is not None:
        sql += " AND kind = ?"
        args.append(kind)
    for n, ts, k, data, prev, digest in conn.execute(sql + " ORDER BY n", args):
        body = json.loads(data)
        if data_class is not None and body.get("class") != data_class:
            continue
        yield Entry(n, ts, k, body, prev, digest)


def verify(conn: sqlite3.Connection) -> Verdict:
    """Walk the chain from the start; report the first entry whose link or hash is wrong."""
    prev, expected_n, count = GENESIS, 1, 0
    resets: list[Entry] = []
    first = conn.execute("SELECT MIN(n) FROM ledger").fetchone()[0]
    if first is not None and first != 1:
        return Verdict(
            False,
            0,
            first,
            f"the ledger starts at entry {first}, not 1: earlier entries were removed",
        )
    for n, ts, kind, data, link, digest in conn.execute(
        "SELECT n, ts, kind, data, prev, hash FROM ledger ORDER BY n"
    ):
        if n != expected_n:
            return Verdict(False, count, expected_n, f"entry {expected_n} is missing")
        if link != prev:
            return Verdict(False, count, n, "its link does not match the previous entry's hash")
        if entry_hash(prev, n, ts, kind, data) != digest:
            return Verdict(False, count, n, "its content does not match its hash (edited)")
        if kind == "reset":
            resets.append(Entry(n, ts, kind, json.loads(data), link, digest))
        prev, expected_n, count = digest, n + 1, count + 1
    return Verdict(True, count, head=prev if count else None, resets=tuple(resets))
