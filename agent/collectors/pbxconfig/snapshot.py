"""Snapshots: the manifest, what changed since the last delivered one, and the parts to send.

A snapshot is a manifest (path, size, mode and digest of the *redacted*
content of every file under the roots, and why any other path was not read)
plus the redacted content of the files that changed since the last snapshot
the gate accepted. An unchanged tree sends nothing. A full snapshot is sent on
the NOC's ``collect`` command, on the weekly schedule, and the first time. Its
wire form, parts of at most 256 KiB, is :mod:`.parts`.

A tree of any size is snapshotted in bounded memory: nothing per file is kept
in Python between one file and the next. A scan writes one row per path to a
``scan`` table in SQLite's temporary store (pages spill to a temporary file, no
fsync, gone with the connection), resolves includes with indexed look-ups in
it, then streams it in path order, joined with what was last sent, into the
parts, which the collector offers to the gate one at a time.

State lives in one SQLite file in the state directory:

- ``cache``: per file, the ``lstat`` stamp and the redacted result, so an
  unchanged tree is rescanned without reading a byte of it;
- ``sent``: the manifest and redacted content of the last delivered snapshot,
  advanced only when every part of a snapshot was accepted (``agentctl snapshot
  --diff`` compares against it);
- ``meta``: the last snapshot's id and times.

Manifest entries are stored in their canonical JSON (:func:`.parts.canonical`),
so that "changed since sent" and the manifest digest are text comparisons.

A scheduled rescan of an unchanged tree (the common case, hourly) does less:
the walk's findings (each path with its ``lstat`` stamp, each skip and link)
hashed with the key and the code's version make a fingerprint, kept with the
last snapshot sent. A rescan first walks without reading and, when the
fingerprint is the same, the manifest is the same: unchanged, with no file
read and no row written.

The fingerprint key for redaction markers is 32 random bytes in its own file
(mode 0600), created on first use, never logged and never sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import sqlite3
import time
import zlib
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from agent.collectors.pbxconfig import filters
from agent.collectors.pbxconfig.asterisk_conf import directives
from agent.collectors.pbxconfig.parts import SCHEMA, Packer, canonical, decode_content
from agent.collectors.pbxconfig.settings import SnapshotSettings
from agent.collectors.pbxconfig.sources import (
    Candidate,
    Link,
    PathPolicy,
    Skipped,
    glob_regex,
    iter_walk,
)
from agent.errors import StateError
from agent.policy.local_rules import NO_LOCAL_RULES, LocalRules
from agent.policy.redact import Finding, find_secret_material
from agent.store import transaction

__all__ = ["SCHEMA", "Outgoing", "Scan", "Store", "decode_content", "scan"]

STATE_DB = "config-snapshot.sqlite"
KEY_FILE = "config-fingerprint.key"
#: Rows written to SQLite at once while a tree is walked.
BATCH = 512
#: The summary lists problems up to this many bytes of JSON, then counts the rest.
MAX_PROBLEM_BYTES = 64 * 1024
#: An entry lists its include directives up to this many bytes of JSON, then counts the rest.
MAX_NOTES_BYTES = 32 * 1024
_GLOB_CHARS = re.compile(r"[*?\[]")
_ENTRY_FORMAT = "canonical-1"
#: Part of every fingerprint: a new agent whose entries differ must not match an old one.
_SCAN_FORMAT = f"{SCHEMA}/{_ENTRY_FORMAT}/scan-1"


# -- the fingerprint key -----------------------------------------------------------


def load_key(state_dir: Path, *, create: bool) -> tuple[bytes, bool]:
    """The fingerprint key and whether it is a throwaway one.

    With ``create`` a missing key is made (0600, written atomically, never
    replacing one another process made first). Without it (the read-only
    CLI) a missing key gives a throwaway key: fingerprints are then provisional.
    """
    path = state_dir / KEY_FILE
    try:
        key = path.read_bytes()
        if len(key) == 32:
            return key, False
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StateError(f"{path}: cannot read the fingerprint key: {exc.strerror}") from exc
    if not create:
        return secrets.token_bytes(32), True
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_dir / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, secrets.token_bytes(32))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process made the key first: keep theirs
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        key = path.read_bytes()
    except OSError as exc:
        raise StateError(f"{path}: cannot create the fingerprint key: {exc.strerror}") from exc
    if len(key) != 32:
        raise StateError(f"{path}: the fingerprint key is not 32 bytes; remove it to make anew")
    return key, False


def key_id(key: bytes, local: LocalRules = NO_LOCAL_RULES) -> str:
    """What a cached result was made with: the key (a digest of it; stays on the box),
    the redaction code (:data:`filters.REDACTION_VERSION`) and the local rules.

    A cached result made otherwise is not used: the file is read and redacted
    again, and sent only if its redacted content differs.
    """
    digest = hashlib.sha256(b"pbx-config-snapshot key id" + key).hexdigest()[:16]
    return f"{digest}/r{filters.redaction_id(local)}"


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
                self.canonical = self.meta().get("entry_format") == _ENTRY_FORMAT
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                # No fsync per commit: a commit lost to a power cut only means a
                # file is read again or a snapshot is sent again, never a skip.
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA_SQL)
                os.chmod(path, 0o600)
                if self.meta().get("entry_format") != _ENTRY_FORMAT:
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
            db.execute("INSERT OR REPLACE INTO meta VALUES ('entry_format', ?)", (_ENTRY_FORMAT,))

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
        return _unpack(rows[0][0]) if rows and rows[0][0] is not None else None

    def sent_text(self, path: str) -> str | None:
        """The redacted content of ``path`` as last delivered."""
        rows = self._rows("SELECT content FROM sent WHERE path = ?", (path,))
        return _unpack(rows[0][0]) if rows and rows[0][0] is not None else None

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
        return _unpack(blob)

    def commit_sent(self, out: Outgoing, *, now: float) -> None:
        """The gate accepted every part: this scan is now the last snapshot sent.

        Kept with it: its fingerprint and counters (an unchanged rescan needs no
        more), and, when it is not the same as the one before (a first snapshot
        counts), ``changed_at``, the configuration's last change (health reports it).
        """
        mode, snapshot_id = out.mode, out.scan.snapshot_id
        content = "CASE WHEN s.status = 'ok' THEN c.content END"
        with self._tx() as db:
            if mode == "full":
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
            if mode == "full":
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


def _pack(text: str) -> bytes:
    return zlib.compress(text.encode("utf-8"), 1)


def _unpack(blob: bytes) -> str:
    return zlib.decompress(blob).decode("utf-8")


# -- one scan -----------------------------------------------------------------------


@dataclass(slots=True)
class FileResult:
    """One file's place in a snapshot: its manifest entry and redacted text."""

    path: str
    stamp: tuple[int, ...]
    entry: dict[str, Any]
    fired: dict[str, int]
    includes: list[list[Any]]  # [directive, argument, line]; argument as written
    text: str | None = None  # None: not sendable
    findings: list[Finding] | None = None  # with explain: the rules fired, by line


@dataclass(slots=True)
class Scan:
    """What a scan found (the manifest itself is in the store's scan table)."""

    snapshot_id: str
    taken_at: float
    key_id: str
    ephemeral_key: bool
    files_scanned: int = 0  # regular files considered (read, or taken from the cache)
    files_read: int = 0
    files_ok: int = 0
    entries: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    fired: Counter[str] = field(default_factory=Counter)
    problems: list[dict[str, Any]] = field(default_factory=list)  # the first few
    problems_total: int = 0
    fingerprint: str = ""
    #: With explain (``agentctl snapshot --explain``): per file, the rules fired by line.
    findings: dict[str, list[Finding]] = field(default_factory=dict)
    _problem_bytes: int = 0

    def summary_json(self) -> str:
        """The counters kept with the last snapshot sent (for an unchanged rescan)."""
        return json.dumps(
            {
                "files_scanned": self.files_scanned,
                "files_ok": self.files_ok,
                "entries": self.entries,
                "skipped": dict(self.skipped),
                "fired": dict(self.fired),
                "problems": self.problems,
                "problems_total": self.problems_total,
            }
        )

    @classmethod
    def unchanged(cls, previous: Scan, summary: str) -> Scan:
        """A scan that found what the last snapshot sent found (nothing read)."""
        d = json.loads(summary)
        previous.files_scanned = int(d["files_scanned"])
        previous.files_ok = int(d["files_ok"])
        previous.entries = int(d["entries"])
        previous.skipped = Counter(d["skipped"])
        previous.fired = Counter(d["fired"])
        previous.problems = list(d["problems"])
        previous.problems_total = int(d["problems_total"])
        return previous

    def problem(self, item: dict[str, Any]) -> None:
        """Count a problem; keep it for the summary while there is room."""
        self.problems_total += 1
        size = len(json.dumps(item, ensure_ascii=False).encode("utf-8"))
        if self._problem_bytes + size <= MAX_PROBLEM_BYTES:
            self.problems.append(item)
            self._problem_bytes += size

    @property
    def first_problem(self) -> str | None:
        """The first problem's text (status shows it as the last error)."""
        return str(self.problems[0]["problem"]) if self.problems else None


def _process(
    c: Candidate, key: bytes, max_file: int, local: LocalRules, explain: bool
) -> FileResult:
    data = c.data or b""
    problems: list[str] = []
    try:
        text = data.decode("utf-8")
        undecodable = False
    except UnicodeDecodeError as exc:
        text = data.decode("utf-8", "surrogateescape")
        undecodable = True
        problems.append(f"undecodable bytes (first at offset {exc.start}): sent as U+FFFD")
    kind = filters.kind_of(PurePosixPath(c.path), text)
    red = filters.redact_text(text, kind, key, name=c.path, local=local, explain=explain)
    base: dict[str, Any] = {"path": c.path, "size": c.size, "mode": f"{c.mode:04o}"}
    if red.dropped is not None:
        entry = {**base, "status": "skipped", "reason": "key-material", "detail": red.dropped}
        return FileResult(c.path, c.stamp, entry, dict(red.fired), [])
    out = red.text
    if undecodable:
        out = out.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    found = find_secret_material(out)
    if found is not None:  # belt and braces: the filters should have dropped it
        entry = {**base, "status": "skipped", "reason": "key-material", "detail": found}
        return FileResult(c.path, c.stamp, entry, dict(red.fired), [])
    digest = hashlib.sha256(out.encode("utf-8")).hexdigest()
    entry = {**base, "status": "ok", "kind": kind, "digest": f"sha256:{digest}"}
    if problems:
        entry["problems"] = problems
    includes: list[list[Any]] = []
    if kind in (filters.ASTERISK, filters.VOICEMAIL):
        includes = [[d.directive, d.argument, d.number] for d in directives(text)]
    return FileResult(c.path, c.stamp, entry, dict(red.fired), includes, out, red.findings)


def _skipped_entry(s: Skipped) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": s.path, "status": "skipped", "reason": s.reason}
    if s.detail:
        entry["detail"] = s.detail
    if s.size is not None:
        entry["size"] = s.size
    if s.mode is not None:
        entry["mode"] = f"{s.mode:04o}"
    return entry


def _stamp_text(stamp: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, stamp)) + "]"  # json.dumps' spelling, at a tenth of its cost


class _Rows:
    """Scan and cache rows on their way to SQLite, a batch at a time."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.scan: list[tuple[Any, ...]] = []
        self.cache: list[tuple[Any, ...]] = []

    def add(self, row: tuple[Any, ...], cache_row: tuple[Any, ...] | None = None) -> None:
        self.scan.append(row)
        if cache_row is not None:
            self.cache.append(cache_row)
        if len(self.scan) >= BATCH:
            self.flush()

    def flush(self) -> None:
        if self.scan:
            self.store.write(self.scan, self.cache)
        self.scan, self.cache = [], []


class _Fingerprint:
    """What a walk met, hashed: the same fingerprint means the same manifest.

    Candidates are taken as ``want`` sees them, before any read, so that a walk
    that reads nothing (:func:`unchanged_since_sent`) hashes what a full scan does.
    """

    def __init__(self, kid: str) -> None:
        self._h = hashlib.blake2b(digest_size=20)
        self._h.update(f"{_SCAN_FORMAT}\0{kid}\n".encode())

    def _add(self, text: str) -> None:
        self._h.update(text.encode("utf-8", "surrogateescape"))

    def candidate(self, c: Candidate) -> None:
        self._add(f"c\0{c.path}\0{c.real}\0{_stamp_text(c.stamp)}\n")

    def found(self, item: Skipped | Link) -> None:
        if isinstance(item, Link):
            self._add(f"l\0{item.path}\0{item.target}\n")
        elif not item.after_read:
            self._add(f"s\0{item.path}\0{item.reason}\0{item.detail}\0{item.size}\0{item.mode}\n")

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _policy(settings: SnapshotSettings, forbidden: Sequence[Path]) -> PathPolicy:
    return PathPolicy(
        settings.roots, (*settings.never_read, *forbidden), settings.include, settings.exclude
    )


def unchanged_since_sent(
    settings: SnapshotSettings, store: Store, key: bytes, *, forbidden: Sequence[Path] = ()
) -> Scan | None:
    """The last snapshot sent's counters when the tree is as it was then, else None.

    Walks with ``lstat`` only: no file is read, no row written.
    """
    meta = store.meta()
    stored, summary = meta.get("fingerprint"), meta.get("scan_summary")
    if not stored or not summary:
        return None
    kid = key_id(key, settings.redact.extra.rules())
    fp = _Fingerprint(kid)

    def want(c: Candidate) -> bool:
        fp.candidate(c)
        return False

    for found in iter_walk(
        _policy(settings, forbidden),
        max_file=settings.max_file,
        max_total=settings.max_total,
        want=want,
    ):
        if not isinstance(found, Candidate):
            fp.found(found)
    if fp.hexdigest() != stored:
        return None
    out = Scan(
        snapshot_id=f"{int(time.time())}-{secrets.token_hex(4)}",
        taken_at=time.time(),
        key_id=kid,
        ephemeral_key=False,
        fingerprint=stored,
    )
    return Scan.unchanged(out, summary)


def scan(
    settings: SnapshotSettings,
    store: Store,
    key: bytes,
    *,
    forbidden: Sequence[Path] = (),
    ephemeral_key: bool = False,
    explain: bool = False,
) -> Scan:
    """Walk the roots, redact what changed, and build the manifest in ``store`` (nothing sent).

    ``explain`` reads every file again (nothing from the cache) and keeps, per
    file, which rule fired on which line (``agentctl snapshot --explain``).
    """
    local = settings.redact.extra.rules()
    kid = key_id(key, local)
    policy = _policy(settings, forbidden)
    out = Scan(
        snapshot_id=f"{int(time.time())}-{secrets.token_hex(4)}",
        taken_at=time.time(),
        key_id=kid,
        ephemeral_key=ephemeral_key,
    )
    store.begin_scan()
    hit: list[CacheRow | None] = [None]
    cache = store.cache_reader()
    fp = _Fingerprint(kid)

    def want(c: Candidate) -> bool:
        fp.candidate(c)
        # Unchanged when lstat still says what it said when the cached result was
        # made (inode, size, mtime, ctime, mode), with this key and redaction code.
        row = cache.get(c.path)
        ok = row is not None and row.key_id == kid and row.stamp == _stamp_text(c.stamp)
        ok = ok and not explain
        hit[0] = row if ok else None
        return not ok

    rows = _Rows(store)
    fresh_content = store.readonly  # a read-only store keeps fresh texts in the scan table
    for found in iter_walk(
        policy, max_file=settings.max_file, max_total=settings.max_total, want=want
    ):
        if isinstance(found, Candidate):
            out.files_scanned += 1
            cache_row: tuple[Any, ...] | None = None
            content: bytes | None = None
            if found.data is None:
                row = hit[0]
                assert row is not None  # want() said the cache holds it
                try:
                    entry, fired, includes = json.loads(f"[{row.entry},{row.fired},{row.includes}]")
                except ValueError:
                    raise store._damaged("cache") from None
                text = row.entry if store.canonical else canonical(entry)
            else:
                r = _process(found, key, settings.max_file, local, explain)
                if r.findings:
                    out.findings[found.path] = r.findings
                elif explain and r.entry.get("reason") == "key-material":
                    why = f"not sent: {r.entry.get('detail', 'key material')}"
                    out.findings[found.path] = [Finding(0, "pem-private-key", why)]
                found.data = None
                out.files_read += 1
                entry, fired, includes = r.entry, r.fired, r.includes
                text = canonical(entry)
                packed = _pack(r.text) if r.text is not None else None
                cache_row = (
                    found.path,
                    _stamp_text(r.stamp),
                    kid,
                    text,
                    json.dumps(fired),
                    json.dumps(includes),
                    packed,
                )
                content = packed if fresh_content else None
            status = entry["status"]
            if status == "ok":
                out.files_ok += 1
            else:
                out.skipped[entry["reason"]] += 1
            out.fired.update(fired)
            for problem in entry.get("problems", ()):
                out.problem({"path": found.path, "problem": problem})
            rows.add(
                (
                    found.path,
                    text,
                    status,
                    entry.get("reason"),
                    found.real,
                    json.dumps(includes) if includes else None,
                    None,
                    content,
                    1,
                ),
                cache_row,
            )
        elif isinstance(found, Skipped):
            fp.found(found)
            out.skipped[found.reason] += 1
            text = canonical(_skipped_entry(found))
            rows.add((found.path, text, "skipped", found.reason, None, None, None, None, 0))
        else:
            fp.found(found)
            text = canonical({"path": found.path, "status": "link", "target": found.target})
            rows.add((found.path, text, "link", None, None, None, found.target, None, 0))
        out.entries += 1
    rows.flush()
    out.fingerprint = fp.hexdigest()
    store.drop_gone()
    _check_includes(policy, store, out)
    return out


def _check_includes(policy: PathPolicy, store: Store, out: Scan) -> None:
    """Resolve every include without opening anything; note refusals, misses and loops.

    Each file's notes are added to its manifest entry; the include graph is kept
    in memory only for the files that have includes (to find loops).
    """
    edges: dict[str, list[str]] = {}
    indexed = False
    for path, entry_text, includes_text in store.with_includes():
        if not indexed:
            store.index_real()
            indexed = True
        root = next(
            (str(rt) for rt in policy.roots if path == str(rt) or path.startswith(str(rt) + "/")),
            os.path.dirname(path),
        )
        base_dir = root if os.path.isdir(root) else os.path.dirname(root)
        notes: list[dict[str, Any]] = []
        omitted = 0
        size = 0
        for directive, argument, line in json.loads(includes_text):
            if directive == "exec":
                note: dict[str, Any] = {
                    "directive": "exec",
                    "line": line,
                    "status": "recorded, not run",
                }
            elif directive in ("include", "tryinclude"):
                target = argument if argument.startswith("/") else os.path.join(base_dir, argument)
                target = os.path.normpath(target)
                status, found = _resolve(policy, target, store)
                note = {"directive": directive, "line": line, "target": target, "status": status}
                edges.setdefault(path, []).extend(found)
                if status in ("forbidden", "outside-roots"):
                    out.problem(
                        {
                            "path": path,
                            "line": line,
                            "problem": f"#{directive} {target} refused: {status}",
                        }
                    )
                elif status == "missing" and directive == "include":
                    out.problem(
                        {"path": path, "line": line, "problem": f"#include {target}: no such file"}
                    )
            else:
                continue
            size += len(canonical(note).encode("utf-8")) + 1
            if size > MAX_NOTES_BYTES:
                omitted += 1
                continue
            notes.append(note)
        entry = json.loads(entry_text)
        entry["includes"] = notes
        if omitted:
            entry["includes_omitted"] = omitted
        store.note(path, canonical(entry))
    if indexed:
        store.apply_notes()
    for path, cycle in _loops(edges):
        out.problem({"path": path, "problem": "include loop: " + " -> ".join(cycle)})


def _resolve(policy: PathPolicy, target: str, store: Store) -> tuple[str, list[str]]:
    magic = _GLOB_CHARS.search(target)
    prefix = target[: magic.start()] if magic else target
    prefix_dir = prefix if magic is None else (os.path.dirname(prefix) or "/")
    # Checked lexically first: a forbidden tree is refused without touching it.
    if policy.is_forbidden(prefix_dir) or policy.is_forbidden(target):
        return "forbidden", []
    if magic is not None:
        rx = glob_regex(target)
        hits = [(p, st) for p, st in store.scanned_under(prefix) if rx.match(p)]
        if not hits:
            why = policy.check(prefix_dir)
            return (why or "missing"), []
        ok = [p for p, st in hits if st == "ok"]
        return ("ok" if ok else "skipped"), ok
    why = policy.check(target)
    if why is not None:
        return why, []
    row = store.scanned(target)
    if row is None:
        at = store.ok_at(os.path.realpath(target))
        return ("ok", [at]) if at is not None else ("missing", [])
    status, reason, link_target = row
    if status == "link":
        at = store.ok_at(link_target or "")
        return ("ok", [at]) if at is not None else ("skipped", [])
    if status == "ok":
        return "ok", [target]
    return f"skipped: {reason or ''}", []


def _loops(edges: dict[str, list[str]]) -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = []
    color: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        color[node] = 1
        for nxt in edges.get(node, ()):
            if color.get(nxt) == 1:
                found.append((node, [*stack[stack.index(nxt) :], node, nxt]))
            elif color.get(nxt) is None:
                visit(nxt, [*stack, nxt])
        color[node] = 2

    for start in sorted(edges):
        if start not in color:
            visit(start, [start])
    return found


# -- deciding and sending -----------------------------------------------------------


@dataclass(slots=True)
class Outgoing:
    """A scanned snapshot on its way out: its mode, and its parts made one at a time."""

    scan: Scan
    mode: str  # full | delta; "unchanged" once a delta turned out to hold nothing
    base: str | None
    packer: Packer | None = None
    #: Something differs from the last snapshot sent (a first snapshot counts): the
    #: configuration changed, which health reports as ``pbx.config.last_change_age``.
    differs: bool = False

    @property
    def parts(self) -> int:
        """Parts made so far."""
        return self.packer.parts if self.packer is not None else 0

    @property
    def files_sent(self) -> int:
        """Files whose content the parts made so far carry."""
        return self.packer.files_sent if self.packer is not None else 0

    @property
    def largest(self) -> int:
        """Bytes of the largest body made so far."""
        return self.packer.largest if self.packer is not None else 0

    def bodies(self, store: Store, *, now: float) -> Iterator[dict[str, Any]]:
        """The parts, in order, each made when the previous one has been taken.

        Reads the scan table in path order joined with what was last sent; holds
        at most one part (and one file's text) at a time. A delta with nothing in
        it yields nothing and leaves ``mode`` as ``unchanged``.
        """
        if self.mode == "unchanged":
            return
        full = self.mode == "full"
        packer = self.packer = Packer(
            snapshot_id=self.scan.snapshot_id,
            mode=self.mode,
            base=self.base,
            taken_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        )
        digest = hashlib.sha256()
        self.differs = self.base is None
        for path, entry, status, old, packed in store.against_sent(full=full):
            digest.update(entry.encode("utf-8") + b"\n")
            same = old is not None and (old == entry or _same(old, entry))
            self.differs = self.differs or not same
            if same and not full:
                continue
            packer.entry(entry)
            if status == "ok":
                packer.content(path, store.content(path, packed))
            yield from packer.take()
        if not full:
            for path in store.gone_since_sent():
                self.differs = True
                packer.removed_path(path)
                yield from packer.take()
            if not packer.changed and not packer.removed:
                self.mode = "unchanged"
                return
        elif not self.differs:
            self.differs = store.any_gone_since_sent()
        s = self.scan
        packer.finish(
            {
                "files": s.files_ok,
                "entries": s.entries,
                "changed": packer.changed,
                "removed": packer.removed,
                "manifest_digest": f"sha256:{digest.hexdigest()}",
                "skipped": dict(sorted(s.skipped.items())),
                "rules": dict(sorted(s.fired.items())),
                "problems": s.problems,
                "problems_total": s.problems_total,
            }
        )
        yield from packer.take()


def _same(old: str, new: str) -> bool:
    """Whether two spellings of an entry say the same (state from before canonical JSON)."""
    try:
        return bool(json.loads(old) == json.loads(new))
    except ValueError:
        return False


def choose_mode(
    store: Store, settings: SnapshotSettings, *, full: bool, now: float
) -> tuple[str, str | None]:
    """Full (asked for, first, or ``full_every`` passed) or a delta; and the last one sent."""
    meta = store.meta()
    base = meta.get("snapshot_id")
    last_full = float(meta.get("full_at", "0"))
    mode = "full" if full or base is None or now - last_full >= settings.full_every else "delta"
    return mode, base


def outgoing(
    scanned: Scan, store: Store, settings: SnapshotSettings, *, full: bool, now: float
) -> Outgoing:
    """What to send of ``scanned``: full, or a delta against the last one sent."""
    mode, base = choose_mode(store, settings, full=full, now=now)
    return Outgoing(scanned, mode, base)
