"""The snapshot collector's state file: the cache, the last snapshot sent, and its meta.

One SQLite file in the state directory:

- ``cache``: per file, the ``lstat`` stamp and the redacted result, so an
  unchanged tree is rescanned without reading a byte of it;
- ``sent``: the manifest and redacted content of the last delivered snapshot,
  advanced only when every part of a snapshot was accepted (``agentctl snapshot
  --diff`` compares against it);
- ``meta``: the last snapshot's id and times;
- ``scan`` (SQLite's temporary store): one row per path of the scan under way.

Manifest entries are stored in their canonical JSON (:func:`.parts.canonical`),
so that "changed since sent" and the manifest digest are text comparisons.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.collectors.pbxconfig.parts import SnapshotMode, canonical
from agent.errors import StateError
from agent.store import transaction

if TYPE_CHECKING:
    from agent.collectors.pbxconfig.snapshot import Outgoing

STATE_DB = "config-snapshot.sqlite"
ENTRY_FORMAT = "canonical-1"


# -- the state store ----------------------------------------------------------------

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cache (
    path TEXT PRIMARY KEY, stamp TEXT NOT NULL, key_id TEXT NOT NULL,
    entry TEXT NOT NULL, fired TEXT NOT NULL, includes TEXT NOT NULL,
    content BLOB);
CREATE TABLE IF NOT EXISTS sent (
    path TEXT PRIMARY KEY, entry TEXT NOT NULL, content BLOB);
"""

#: One row per path met by the scan in progress (the manifest, before it is sent).
#: ``content`` holds fresh text only for a read-only store (``agentctl snapshot``),
#: which cannot write it to the cache; ``cand`` marks files the cache keeps results for.
_SCAN_SQL = """
CREATE TEMP TABLE IF NOT EXISTS scan (
    path TEXT PRIMARY KEY, entry TEXT NOT NULL, status TEXT NOT NULL, reason TEXT,
    real TEXT, includes TEXT, target TEXT, content BLOB, cand INTEGER NOT NULL);
CREATE TEMP TABLE IF NOT EXISTS notes (path TEXT PRIMARY KEY, entry TEXT NOT NULL);
"""


@dataclass(slots=True)
class CacheRow:
    """What the last scan learnt about one file, as stored (JSON texts)."""

    stamp: str
    key_id: str
    entry: str
    fired: str
    includes: str


class Store:
    """The collector's SQLite state file (see the module docstring)."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        # Entries written before they were canonical are made so on the fly (read-only
        # use) or once, when the file is next opened for writing.
        self.canonical = True
        try:
            if readonly:
                if path.exists():
                    uri = f"file:{path}?mode=ro"
                    self._db = sqlite3.connect(
                        uri, uri=True, check_same_thread=False, isolation_level=None
                    )
                else:  # nothing yet: the same empty tables, in memory
                    self._db = sqlite3.connect(
                        ":memory:", check_same_thread=False, isolation_level=None
                    )
                    self._db.executescript(_SCHEMA_SQL)
                self.canonical = self.meta().get("entry_format") == ENTRY_FORMAT
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                # No fsync per commit: a commit lost to a power cut only means a
                # file is read again or a snapshot is sent again, never a skip.
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA_SQL)
                os.chmod(path, 0o600)
                if self.meta().get("entry_format") != ENTRY_FORMAT:
                    self._make_canonical()
            self._db.executescript(_SCAN_SQL)
        except sqlite3.Error as exc:
            raise StateError(f"{path}: cannot open the snapshot state: {exc}") from exc

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot read the snapshot state: {exc}") from exc

    def _iter(self, sql: str, args: Sequence[Any] = ()) -> Iterator[tuple[Any, ...]]:
        try:
            yield from self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot read the snapshot state: {exc}") from exc

    def _damaged(self, table: str) -> StateError:
        # Only a damaged file gets here (each column was written by json.dumps).
        return StateError(
            f"{self.path}: the {table} table of the snapshot state is damaged; "
            "remove the file to start again with a full snapshot"
        )

    def _make_canonical(self) -> None:
        # Once, on the first open by this version: a page of rows at a time, so that a
        # state of any size is rewritten in bounded memory.
        with self._tx() as db:
            for table in ("cache", "sent"):
                after = ""
                while True:
                    rows = db.execute(
                        f"SELECT path, entry FROM {table} WHERE path > ?"  # noqa: S608
                        " ORDER BY path LIMIT 512",
                        (after,),
                    ).fetchall()
                    if not rows:
                        break
                    after = rows[-1][0]
                    try:
                        fixed = [(canonical(json.loads(e)), p) for p, e in rows]
                    except ValueError:
                        raise self._damaged(table) from None
                    # S608: the table name is one of two constants; values are bound.
                    db.executemany(f"UPDATE {table} SET entry = ? WHERE path = ?", fixed)  # noqa: S608
            db.execute("INSERT OR REPLACE INTO meta VALUES ('entry_format', ?)", (ENTRY_FORMAT,))

    def meta(self) -> dict[str, str]:
        """The last delivered snapshot's id and times."""
        return {k: v for k, v in self._rows("SELECT k, v FROM meta")}

    def cache_reader(self) -> _CacheReader:
        """The cache read in path order, a page at a time, for a walk in path order."""
        return _CacheReader(self)

    def cache_row(self, path: str) -> CacheRow | None:
        """What the cache holds for ``path``."""
        rows = self._rows(
            "SELECT stamp, key_id, entry, fired, includes FROM cache WHERE path = ?", (path,)
        )
        return CacheRow(*rows[0]) if rows else None

    def cached_text(self, path: str) -> str | None:
        """The redacted content cached for ``path``."""
        rows = self._rows("SELECT content FROM cache WHERE path = ?", (path,))
        return unpack_text(rows[0][0]) if rows and rows[0][0] is not None else None

    def sent_text(self, path: str) -> str | None:
        """The redacted content of ``path`` as last delivered."""
        rows = self._rows("SELECT content FROM sent WHERE path = ?", (path,))
        return unpack_text(rows[0][0]) if rows and rows[0][0] is not None else None

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise StateError(f"{self.path}: the snapshot state is open read-only")
        with transaction(self._db, f"{self.path}: cannot write the snapshot state") as db:
            yield db

    # -- the scan table ----------------------------------------------------------------

    def begin_scan(self) -> None:
        """Forget the rows of any earlier scan."""
        try:
            self._db.execute("DROP INDEX IF EXISTS temp.scan_real")
            self._db.execute("DELETE FROM temp.scan")
            self._db.execute("DELETE FROM temp.notes")
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot prepare a scan: {exc}") from exc

    end_scan = begin_scan  # frees the temporary store once the parts are sent or given up

    def write(self, scan_rows: list[tuple[Any, ...]], cache_rows: list[tuple[Any, ...]]) -> None:
        """Add scan rows (and, writable, the cache rows of files read this time)."""
        try:
            if cache_rows and not self.readonly:
                with self._tx() as db:
                    db.executemany(
                        "INSERT OR REPLACE INTO cache VALUES (?, ?, ?, ?, ?, ?, ?)", cache_rows
                    )
                    db.executemany(
                        "INSERT OR IGNORE INTO temp.scan VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        scan_rows,
                    )
                return
            # Only the temporary store changes: a deferred transaction never locks the file.
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO temp.scan VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", scan_rows
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot record the scan: {exc}") from exc

    def drop_gone(self) -> None:
        """Forget cached results of files this scan did not find (no write if there are none)."""
        if self.readonly:
            return
        gone = "SELECT path FROM cache WHERE path NOT IN (SELECT path FROM temp.scan WHERE cand)"
        if self._rows(f"SELECT EXISTS ({gone})")[0][0]:
            with self._tx() as db:
                db.execute(f"DELETE FROM cache WHERE path IN ({gone})")  # noqa: S608

    def with_includes(self) -> Iterator[tuple[str, str, str]]:
        """(path, entry, includes) of every file that has include directives."""
        return self._iter(
            "SELECT path, entry, includes FROM temp.scan WHERE includes IS NOT NULL ORDER BY path"
        )

    def index_real(self) -> None:
        """Index the scan by real location (only needed when there are includes)."""
        self._db.execute("CREATE INDEX IF NOT EXISTS temp.scan_real ON scan (real)")

    def scanned(self, path: str) -> tuple[str, str | None, str | None] | None:
        """(status, reason, link target) of ``path`` in this scan."""
        rows = self._rows("SELECT status, reason, target FROM temp.scan WHERE path = ?", (path,))
        return rows[0] if rows else None

    def ok_at(self, real: str) -> str | None:
        """The path under which a file sent in this scan has its real location ``real``."""
        rows = self._rows(
            "SELECT path FROM temp.scan WHERE real = ? AND status = 'ok' LIMIT 1", (real,)
        )
        return str(rows[0][0]) if rows else None

    def scanned_under(self, prefix: str) -> Iterator[tuple[str, str]]:
        """(path, status) of every path of this scan that starts with ``prefix``."""
        return self._iter(
            "SELECT path, status FROM temp.scan WHERE path >= ? AND path < ? ORDER BY path",
            (prefix, prefix + "\U0010ffff"),
        )

    def note(self, path: str, entry: str) -> None:
        """Replace ``path``'s entry (with its include notes) once the includes are resolved."""
        self._db.execute("INSERT OR REPLACE INTO temp.notes VALUES (?, ?)", (path, entry))

    def apply_notes(self) -> None:
        """Move the noted entries into the scan."""
        self._db.execute(
            "UPDATE temp.scan SET entry = (SELECT entry FROM temp.notes n WHERE n.path = scan.path)"
            " WHERE path IN (SELECT path FROM temp.notes)"
        )
        self._db.execute("DELETE FROM temp.notes")

    def against_sent(
        self, *, full: bool
    ) -> Iterator[tuple[str, str, str, str | None, bytes | None]]:
        """(path, entry, status, entry last sent, packed content) of every path scanned,
        in path order. The content comes along for a full snapshot only (a delta
        reads it with :meth:`content` for the few files that changed)."""
        if full:
            return self._iter(
                "SELECT s.path, s.entry, s.status, t.entry,"
                " CASE WHEN s.status = 'ok' THEN COALESCE(s.content, c.content) END"
                " FROM temp.scan s LEFT JOIN sent t ON t.path = s.path"
                " LEFT JOIN cache c ON c.path = s.path ORDER BY s.path"
            )
        return self._iter(
            "SELECT s.path, s.entry, s.status, t.entry, NULL FROM temp.scan s"
            " LEFT JOIN sent t ON t.path = s.path ORDER BY s.path"
        )

    def any_gone_since_sent(self) -> bool:
        """Whether a path of the last snapshot sent is missing from this scan."""
        query = "SELECT EXISTS (SELECT 1 FROM sent WHERE path NOT IN (SELECT path FROM temp.scan))"
        return bool(self._rows(query)[0][0])

    def gone_since_sent(self) -> Iterator[str]:
        """Paths of the last snapshot sent that this scan did not find, in path order."""
        for (path,) in self._iter(
            "SELECT path FROM sent WHERE path NOT IN (SELECT path FROM temp.scan) ORDER BY path"
        ):
            yield str(path)

    def content(self, path: str, packed: bytes | None = None) -> str:
        """The redacted text of a file this scan found sendable (``packed``: already read)."""
        blob = packed
        if blob is None:
            rows = self._rows(
                "SELECT COALESCE(s.content, c.content) FROM temp.scan s"
                " LEFT JOIN cache c ON c.path = s.path WHERE s.path = ?",
                (path,),
            )
            blob = rows[0][0] if rows else None
        if blob is None:  # the cache lost it: never send a digest without its content
            raise StateError(
                f"{self.path}: cached content of {path} is missing; "
                "remove the file to rescan from scratch"
            )
        return unpack_text(blob)

    def commit_sent(self, out: Outgoing, *, now: float) -> None:
        """The gate accepted every part: this scan is now the last snapshot sent.

        Kept with it: its fingerprint and counters (an unchanged rescan needs no
        more), and, when it is not the same as the one before (a first snapshot
        counts), ``changed_at``, the configuration's last change (health reports it).
        """
        mode, snapshot_id = out.mode, out.scan.snapshot_id
        content = "CASE WHEN s.status = 'ok' THEN c.content END"
        with self._tx() as db:
            if mode is SnapshotMode.FULL:
                db.execute("DELETE FROM sent")
                db.execute(
                    f"INSERT INTO sent (path, entry, content) SELECT s.path, s.entry, {content}"  # noqa: S608
                    " FROM temp.scan s LEFT JOIN cache c ON c.path = s.path"
                )
            else:
                db.execute("DELETE FROM sent WHERE path NOT IN (SELECT path FROM temp.scan)")
                db.execute(
                    "INSERT OR REPLACE INTO sent (path, entry, content)"  # noqa: S608
                    f" SELECT s.path, s.entry, {content} FROM temp.scan s"
                    " LEFT JOIN sent t ON t.path = s.path LEFT JOIN cache c ON c.path = s.path"
                    " WHERE t.entry IS NULL OR t.entry != s.entry"
                )
            meta = {"snapshot_id": snapshot_id, "sent_at": str(now), "mode": mode}
            if mode is SnapshotMode.FULL:
                meta["full_at"] = str(now)
            if out.differs:
                meta["changed_at"] = str(now)
            meta["fingerprint"] = out.scan.fingerprint
            meta["scan_summary"] = out.scan.summary_json()
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(meta.items()))


class _CacheReader:
    """Cache rows for paths asked in increasing order (a merge with the walk).

    Pages of rows are read with a key range, so no statement stays open while the
    scan writes; a path asked out of order falls back to a look-up of its own.
    """

    PAGE = 256

    def __init__(self, store: Store) -> None:
        self.store = store
        self.buf: deque[tuple[Any, ...]] = deque()
        self.after = ""
        self.last = ""
        self.done = False

    def get(self, path: str) -> CacheRow | None:
        """The cache row of ``path``, or None."""
        if path < self.last:
            return self.store.cache_row(path)
        self.last = path
        buf = self.buf
        while True:
            while buf and buf[0][0] < path:
                buf.popleft()
            if buf:
                return CacheRow(*buf[0][1:]) if buf[0][0] == path else None
            if self.done:
                return None
            rows = self.store._rows(
                "SELECT path, stamp, key_id, entry, fired, includes FROM cache"
                " WHERE path > ? ORDER BY path LIMIT ?",
                (self.after, self.PAGE),
            )
            self.done = len(rows) < self.PAGE
            if rows:
                self.after = rows[-1][0]
                buf.extend(rows)


def pack_text(text: str) -> bytes:
    return zlib.compress(text.encode("utf-8"), 1)


def unpack_text(blob: bytes) -> str:
    return zlib.decompress(blob).decode("utf-8")
