"""Snapshots: the manifest, what changed since the last delivered one, and the bodies to send.

A snapshot is a manifest (path, size, mode, digest of the *redacted* content)
plus the redacted content of the files that changed since the last snapshot the
gate accepted, compressed. An unchanged tree sends nothing. A full snapshot is
sent on the NOC's ``collect`` command, on the weekly schedule, and the first time.

State lives in one SQLite file in the state directory:

- ``cache``: per file, the ``lstat`` stamp and the redacted result, so an
  unchanged tree is rescanned without reading a byte of it;
- ``sent``: the manifest and redacted content of the last delivered snapshot,
  advanced only when every part of a snapshot was accepted (``agentctl snapshot
  --diff`` compares against it);
- ``meta``: the last snapshot's id and times.

The fingerprint key for redaction markers is 32 random bytes in its own file
(mode 0600), created on first use, never logged and never sent.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import sqlite3
import time
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from agent.collectors.pbxconfig import filters
from agent.collectors.pbxconfig.asterisk_conf import directives
from agent.collectors.pbxconfig.settings import SnapshotSettings
from agent.collectors.pbxconfig.sources import Candidate, PathPolicy, Skipped, walk
from agent.errors import StateError
from agent.policy.redact import find_secret_material
from agent.store import transaction

SCHEMA = "pbx-config-snapshot/1"
STATE_DB = "config-snapshot.sqlite"
KEY_FILE = "config-fingerprint.key"
#: Base64 content per part; with the manifest the body stays under ~4 MiB.
MAX_PART_CONTENT = 3 * 1024 * 1024
#: The manifest travels in part 1 only; beyond this it is split over parts too.
MAX_PART_MANIFEST = 512 * 1024
_CHUNK_RAW = 8 * 1024 * 1024
_GLOB_CHARS = re.compile(r"[*?\[]")


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


def key_id(key: bytes) -> str:
    """What a cached result was made with: the key (a digest of it; stays on the box)
    and the redaction code (:data:`filters.REDACTION_VERSION`).

    A cached result made otherwise is not used: the file is read and redacted
    again, and sent only if its redacted content differs.
    """
    digest = hashlib.sha256(b"pbx-config-snapshot key id" + key).hexdigest()[:16]
    return f"{digest}/r{filters.REDACTION_VERSION}"


# -- the state store ----------------------------------------------------------------


@dataclass(slots=True)
class CacheRow:
    """What the last scan learnt about one file."""

    stamp: tuple[int, ...]
    key_id: str
    entry: dict[str, Any]
    fired: dict[str, int]
    includes: list[list[Any]]


class Store:
    """The collector's SQLite state file (see the module docstring)."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._db: sqlite3.Connection | None = None
        # Kept in memory between runs of one collector: a rescan reads no state.
        self._cache: dict[str, CacheRow] | None = None
        self._sent: dict[str, dict[str, Any]] | None = None
        # Entry texts parsed by cache(), kept until sent() runs: most sent entries
        # are the same text, so they need not be parsed twice.
        self._entry_texts: dict[str, tuple[str, dict[str, Any]]] = {}
        try:
            if readonly:
                if path.exists():
                    uri = f"file:{path}?mode=ro"
                    self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                # No fsync per commit: a commit lost to a power cut only means a
                # file is read again or a snapshot is sent again, never a skip.
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(
                    """
                    CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
                    CREATE TABLE IF NOT EXISTS cache (
                        path TEXT PRIMARY KEY, stamp TEXT NOT NULL, key_id TEXT NOT NULL,
                        entry TEXT NOT NULL, fired TEXT NOT NULL, includes TEXT NOT NULL,
                        content BLOB);
                    CREATE TABLE IF NOT EXISTS sent (
                        path TEXT PRIMARY KEY, entry TEXT NOT NULL, content BLOB);
                    """
                )
                os.chmod(path, 0o600)
        except sqlite3.Error as exc:
            raise StateError(f"{path}: cannot open the snapshot state: {exc}") from exc

    def close(self) -> None:
        """Close the database."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self._db is None:
            return []
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot read the snapshot state: {exc}") from exc

    def meta(self) -> dict[str, str]:
        """The last delivered snapshot's id and times."""
        return {k: v for k, v in self._rows("SELECT k, v FROM meta")}

    def cache(self) -> dict[str, CacheRow]:
        """Every cached file result (content left in the database)."""
        if self._cache is not None:
            return self._cache
        rows = self._rows("SELECT path, stamp, key_id, entry, fired, includes FROM cache")
        # The first scan after a restart reads every row: one json.loads over the
        # joined columns takes a third of the time of four json.loads per row.
        doc = ",".join(f"[{st},{entry},{fired},{inc}]" for _, st, _, entry, fired, inc in rows)
        out: dict[str, CacheRow] = {}
        for (path, _, kid, text, _, _), (stamp, entry, fired, includes) in zip(
            rows, self._load_json_list(f"[{doc}]", len(rows), "cache", width=4), strict=True
        ):
            out[path] = CacheRow(tuple(stamp), kid, entry, fired, includes)
            self._entry_texts[path] = (text, entry)
        if not self.readonly:
            self._cache = out
        return out

    def _load_json_list(self, doc: str, count: int, table: str, *, width: int = 0) -> list[Any]:
        """``doc`` parsed: a list of ``count`` items (each a list of ``width``), one per row."""
        try:
            items = json.loads(doc)
        except ValueError:
            items = None
        if (
            not isinstance(items, list)
            or len(items) != count
            or (width and not all(isinstance(i, list) and len(i) == width for i in items))
        ):
            # Only a damaged file gets here (each column was written by json.dumps).
            raise StateError(
                f"{self.path}: the {table} table of the snapshot state is damaged; "
                "remove the file to start again with a full snapshot"
            )
        return items

    def cached_text(self, path: str) -> str | None:
        """The redacted content cached for ``path``."""
        rows = self._rows("SELECT content FROM cache WHERE path = ?", (path,))
        return _unpack(rows[0][0]) if rows and rows[0][0] is not None else None

    def cached_texts(self, paths: Sequence[str]) -> dict[str, str]:
        """The redacted content cached for each of ``paths`` that has some (few queries)."""
        out: dict[str, str] = {}
        step = 500  # well under SQLite's limit on bound parameters
        for i in range(0, len(paths), step):
            chunk = paths[i : i + step]
            marks = ",".join("?" * len(chunk))
            # S608: only "?" placeholders are formatted into the query; paths are bound.
            query = f"SELECT path, content FROM cache WHERE path IN ({marks})"  # noqa: S608
            for path, blob in self._rows(query, chunk):
                if blob is not None:
                    out[path] = _unpack(blob)
        return out

    def sent(self) -> dict[str, dict[str, Any]]:
        """The manifest of the last delivered snapshot."""
        if self._sent is not None:
            return self._sent
        rows = self._rows("SELECT path, entry FROM sent")
        known, self._entry_texts = self._entry_texts, {}
        sent: dict[str, dict[str, Any]] = {}
        todo: list[tuple[str, str]] = []
        for path, text in rows:
            hit = known.get(path)
            if hit is not None and hit[0] == text:
                sent[path] = hit[1]  # the cache's dict: neither is ever changed in place
            else:
                todo.append((path, text))
        doc = "[" + ",".join(text for _, text in todo) + "]"
        entries = self._load_json_list(doc, len(todo), "sent")
        sent.update((path, entry) for (path, _), entry in zip(todo, entries, strict=True))
        if not self.readonly:
            self._sent = sent
        return sent

    def sent_text(self, path: str) -> str | None:
        """The redacted content of ``path`` as last delivered."""
        rows = self._rows("SELECT content FROM sent WHERE path = ?", (path,))
        return _unpack(rows[0][0]) if rows and rows[0][0] is not None else None

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        if self._db is None or self.readonly:
            raise StateError(f"{self.path}: the snapshot state is open read-only")
        with transaction(self._db, f"{self.path}: cannot write the snapshot state") as db:
            yield db

    def save_cache(self, plan: Plan) -> None:
        """Remember this scan's results so the next one reads only what changed."""
        gone = [(p,) for p in plan.cache_paths - plan.results.keys()]
        if not plan.fresh and not gone:
            return  # nothing read, nothing gone: no write transaction at all
        with self._tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO cache VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.path,
                        json.dumps(r.stamp),
                        plan.key_id,
                        json.dumps(r.entry),
                        json.dumps(r.fired),
                        json.dumps(r.includes),
                        _pack(r.text) if r.text is not None else None,
                    )
                    for r in plan.fresh.values()
                ],
            )
            db.executemany("DELETE FROM cache WHERE path = ?", gone)
        if self._cache is not None:
            for r in plan.fresh.values():
                self._cache[r.path] = CacheRow(r.stamp, plan.key_id, r.entry, r.fired, r.includes)
            for (p,) in gone:
                self._cache.pop(p, None)

    def commit_sent(self, plan: Plan, *, now: float) -> None:
        """The gate accepted every part of ``plan``: it is now the last snapshot sent."""
        with self._tx() as db:
            if plan.mode == "full":
                db.execute("DELETE FROM sent")
            else:
                db.executemany("DELETE FROM sent WHERE path = ?", [(p,) for p in plan.removed])
            db.executemany(
                "INSERT OR REPLACE INTO sent (path, entry, content) VALUES "
                "(?, ?, (SELECT content FROM cache WHERE path = ?))",
                [(p, json.dumps(plan.manifest[p]), p) for p in plan.changed],
            )
            meta = {"snapshot_id": plan.snapshot_id, "sent_at": str(now), "mode": plan.mode}
            if plan.mode == "full":
                meta["full_at"] = str(now)
            if plan.differs:
                meta["changed_at"] = str(now)
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(meta.items()))
        if self._sent is not None:
            if plan.mode == "full":
                self._sent = {}
            for p in plan.removed:
                self._sent.pop(p, None)
            self._sent.update((p, plan.manifest[p]) for p in plan.changed)


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
    text: str | None = None  # None: not read this time (cached) or not sendable


@dataclass(slots=True)
class Plan:
    """What a scan found and what would be sent now."""

    snapshot_id: str
    taken_at: float
    key_id: str
    ephemeral_key: bool
    mode: str  # full | delta | unchanged
    base: str | None
    manifest: dict[str, dict[str, Any]]
    changed: list[str]  # paths whose entry (or content) is sent
    removed: list[str]
    results: dict[str, FileResult]
    fresh: dict[str, FileResult]  # read this time (to cache)
    cache_paths: set[str]
    skipped: Counter[str] = field(default_factory=Counter)
    fired: Counter[str] = field(default_factory=Counter)
    problems: list[dict[str, Any]] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)  # redacted content sent, by path
    #: Something differs from the last snapshot sent (a first snapshot counts): the
    #: configuration changed, which health reports as ``pbx.config.last_change_age``.
    differs: bool = False

    @property
    def files_scanned(self) -> int:
        """How many files the scan looked at (read or taken from the cache)."""
        return len(self.results)


def _process(c: Candidate, key: bytes, max_file: int) -> FileResult:
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
    red = filters.redact_text(text, kind, key)
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
    if len(out) > MAX_PART_CONTENT and len(_b64z(out)) > MAX_PART_CONTENT:
        entry = {
            **base,
            "status": "skipped",
            "reason": "too-large-to-send",
            "detail": "redacted content does not fit one message",
        }
        return FileResult(c.path, c.stamp, entry, dict(red.fired), [])
    digest = hashlib.sha256(out.encode("utf-8")).hexdigest()
    entry = {**base, "status": "ok", "kind": kind, "digest": f"sha256:{digest}"}
    if problems:
        entry["problems"] = problems
    includes: list[list[Any]] = []
    if kind in (filters.ASTERISK, filters.VOICEMAIL):
        includes = [[d.directive, d.argument, d.number] for d in directives(text)]
    return FileResult(c.path, c.stamp, entry, dict(red.fired), includes, out)


def _skipped_entry(s: Skipped) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": s.path, "status": "skipped", "reason": s.reason}
    if s.detail:
        entry["detail"] = s.detail
    if s.size is not None:
        entry["size"] = s.size
    if s.mode is not None:
        entry["mode"] = f"{s.mode:04o}"
    return entry


def scan(
    settings: SnapshotSettings,
    store: Store,
    key: bytes,
    *,
    forbidden: Sequence[Path] = (),
    ephemeral_key: bool = False,
) -> Plan:
    """Walk the roots, redact what changed, and build the manifest (nothing is sent)."""
    kid = key_id(key)
    cache = store.cache()
    policy = PathPolicy(
        settings.roots, (*settings.never_read, *forbidden), settings.include, settings.exclude
    )

    def want(c: Candidate) -> bool:
        # Unchanged when lstat still says what it said when the cached result was
        # made (inode, size, mtime, ctime, mode), with this key and redaction code.
        row = cache.get(c.path)
        return row is None or row.key_id != kid or row.stamp != c.stamp

    w = walk(policy, max_file=settings.max_file, max_total=settings.max_total, want=want)
    results: dict[str, FileResult] = {}
    fresh: dict[str, FileResult] = {}
    manifest: dict[str, dict[str, Any]] = {}
    reals: dict[str, str] = {}
    skipped: Counter[str] = Counter()
    fired: Counter[str] = Counter()
    for c in w.files:
        if c.data is None:
            row = cache[c.path]
            # Shared with the cache, never changed: the manifest takes a copy.
            r = FileResult(c.path, row.stamp, row.entry, row.fired, row.includes)
        else:
            r = fresh[c.path] = _process(c, key, settings.max_file)
        results[c.path] = r
        reals[c.path] = c.real
        manifest[c.path] = dict(r.entry)
        if r.entry["status"] != "ok":
            skipped[r.entry["reason"]] += 1
        for rule, n in r.fired.items():
            fired[rule] += n
    for s in w.skipped:
        manifest[s.path] = _skipped_entry(s)
        skipped[s.reason] += 1
    for link, target in w.links.items():
        manifest[link] = {"path": link, "status": "link", "target": target}
    problems = _check_includes(policy, results, manifest, w.links, reals)
    for p, entry in manifest.items():
        for text in entry.get("problems", ()):
            problems.append({"path": p, "problem": text})
    return Plan(
        snapshot_id=f"{int(time.time())}-{secrets.token_hex(4)}",
        taken_at=time.time(),
        key_id=kid,
        ephemeral_key=ephemeral_key,
        mode="unchanged",
        base=None,
        manifest=dict(sorted(manifest.items())),
        changed=[],
        removed=[],
        results=results,
        fresh=fresh,
        cache_paths=set(cache),
        skipped=skipped,
        fired=fired,
        problems=problems,
    )


def _check_includes(
    policy: PathPolicy,
    results: dict[str, FileResult],
    manifest: dict[str, dict[str, Any]],
    links: dict[str, str],
    reals: dict[str, str],
) -> list[dict[str, Any]]:
    """Resolve every include without opening anything; report refusals, misses and loops.

    ``reals`` maps each walked file to its real location as the walk found it
    (the walk resolves folders as it descends), which spares a realpath per file.
    """
    problems: list[dict[str, Any]] = []
    edges: dict[str, list[str]] = {}
    if not any(r.includes for r in results.values()):
        return problems
    by_real = {reals[p]: p for p, r in results.items() if r.entry["status"] == "ok"}
    for path, r in results.items():
        if not r.includes:
            continue
        root = next(
            (str(rt) for rt in policy.roots if path == str(rt) or path.startswith(str(rt) + "/")),
            os.path.dirname(path),
        )
        base_dir = root if os.path.isdir(root) else os.path.dirname(root)
        notes: list[dict[str, Any]] = []
        for directive, argument, line in r.includes:
            if directive == "exec":
                notes.append({"directive": "exec", "line": line, "status": "recorded, not run"})
                continue
            if directive not in ("include", "tryinclude"):
                continue
            target = argument if argument.startswith("/") else os.path.join(base_dir, argument)
            target = os.path.normpath(target)
            status, found = _resolve(policy, target, manifest, links, by_real)
            notes.append({"directive": directive, "line": line, "target": target, "status": status})
            edges.setdefault(path, []).extend(found)
            if status in ("forbidden", "outside-roots"):
                problems.append(
                    {
                        "path": path,
                        "line": line,
                        "problem": f"#{directive} {target} refused: {status}",
                    }
                )
            elif status == "missing" and directive == "include":
                problems.append(
                    {"path": path, "line": line, "problem": f"#include {target}: no such file"}
                )
        manifest[path]["includes"] = notes
    for path, cycle in _loops(edges):
        problems.append({"path": path, "problem": "include loop: " + " -> ".join(cycle)})
    return problems


def _resolve(
    policy: PathPolicy,
    target: str,
    manifest: dict[str, dict[str, Any]],
    links: dict[str, str],
    by_real: dict[str, str],
) -> tuple[str, list[str]]:
    magic = _GLOB_CHARS.search(target)
    prefix = target[: magic.start()] if magic else target
    prefix_dir = prefix if magic is None else (os.path.dirname(prefix) or "/")
    # Checked lexically first: a forbidden tree is refused without touching it.
    if policy.is_forbidden(prefix_dir) or policy.is_forbidden(target):
        return "forbidden", []
    if magic is not None:
        from agent.collectors.pbxconfig.sources import glob_regex

        rx = glob_regex(target)
        hits = [p for p in manifest if rx.match(p)]
        if not hits:
            why = policy.check(prefix_dir)
            return (why or "missing"), []
        ok = [p for p in hits if manifest[p]["status"] == "ok"]
        return ("ok" if ok else "skipped"), ok
    why = policy.check(target)
    if why is not None:
        return why, []
    entry = manifest.get(target)
    if entry is None:
        real = os.path.realpath(target)
        if real in by_real:
            return "ok", [by_real[real]]
        return "missing", []
    if entry["status"] == "link":
        real = links.get(target, "")
        return ("ok", [by_real[real]]) if real in by_real else ("skipped", [])
    if entry["status"] == "ok":
        return "ok", [target]
    return f"skipped: {entry.get('reason', '')}", []


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


# -- deciding and packing -----------------------------------------------------------


def decide(plan: Plan, store: Store, settings: SnapshotSettings, *, full: bool, now: float) -> None:
    """Fill in ``plan.mode``, what changed since the last delivered snapshot, and the bodies."""
    meta = store.meta()
    sent = store.sent() if meta.get("snapshot_id") else {}
    last_full = float(meta.get("full_at", "0"))
    plan.base = meta.get("snapshot_id")
    if full or plan.base is None or now - last_full >= settings.full_every:
        plan.mode = "full"
        plan.changed = list(plan.manifest)
        plan.removed = []
        plan.differs = plan.base is None or sent != plan.manifest
    else:
        plan.changed = [p for p, e in plan.manifest.items() if sent.get(p) != e]
        plan.removed = sorted(set(sent) - set(plan.manifest))
        plan.mode = "delta" if plan.changed or plan.removed else "unchanged"
        plan.differs = plan.mode == "delta"
    if plan.mode == "unchanged":
        plan.bodies = []
        return
    texts: dict[str, str] = {}
    wanted = [p for p in plan.changed if plan.manifest[p]["status"] == "ok"]
    missing = [p for p in wanted if (r := plan.results.get(p)) is None or r.text is None]
    cached = store.cached_texts(missing)
    for p in wanted:
        r = plan.results.get(p)
        text = r.text if r is not None and r.text is not None else cached.get(p)
        if text is None:  # the cache lost it: never send a digest without its content
            raise StateError(
                f"{store.path}: cached content of {p} is missing; "
                "remove the file to rescan from scratch"
            )
        texts[p] = text
    plan.texts = texts
    plan.bodies = _bodies(plan, now)


def _b64z(text: str) -> str:
    # Deltas are small: squeeze them. Big full snapshots: favour speed (level 1).
    raw = text.encode("utf-8")
    level = 9 if len(raw) < 1024 * 1024 else 1
    return base64.b64encode(zlib.compress(raw, level)).decode("ascii")


def _pack_chunks(items: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """Group files into compressed blobs that each fit one part."""
    out: list[tuple[list[str], str]] = []
    chunk: list[tuple[str, str]] = []
    size = 0

    def flush(group: list[tuple[str, str]]) -> None:
        if not group:
            return
        blob = _b64z(json.dumps(dict(group), ensure_ascii=False))
        if len(blob) > MAX_PART_CONTENT and len(group) > 1:
            half = len(group) // 2
            flush(group[:half])
            flush(group[half:])
            return
        out.append(([p for p, _ in group], blob))

    for path, text in items:
        if chunk and size + len(text) > _CHUNK_RAW:
            flush(chunk)
            chunk, size = [], 0
        chunk.append((path, text))
        size += len(text)
    flush(chunk)
    return out


def _bodies(plan: Plan, now: float) -> list[dict[str, Any]]:
    entries = [plan.manifest[p] for p in plan.changed]
    manifest_parts: list[list[dict[str, Any]]] = [[]]
    used = 0
    for e in entries:
        n = len(json.dumps(e))
        if used + n > MAX_PART_MANIFEST and manifest_parts[-1]:
            manifest_parts.append([])
            used = 0
        manifest_parts[-1].append(e)
        used += n
    chunks = _pack_chunks(sorted(plan.texts.items()))
    count = max(len(chunks), len(manifest_parts), 1)
    digest = hashlib.sha256(json.dumps(plan.manifest, sort_keys=True).encode()).hexdigest()
    bodies: list[dict[str, Any]] = []
    for i in range(count):
        body: dict[str, Any] = {
            "schema": SCHEMA,
            "snapshot": plan.snapshot_id,
            "part": i + 1,
            "parts": count,
            "mode": plan.mode,
            "base": plan.base if plan.mode == "delta" else None,
            "taken_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        }
        if i == 0:
            body["summary"] = {
                "files": sum(1 for e in plan.manifest.values() if e["status"] == "ok"),
                "entries": len(plan.manifest),
                "manifest_digest": f"sha256:{digest}",
                "skipped": dict(sorted(plan.skipped.items())),
                "rules": dict(sorted(plan.fired.items())),
                "problems": plan.problems,
            }
            if plan.mode == "delta":
                body["removed"] = plan.removed
        if i < len(manifest_parts):
            body["manifest"] = manifest_parts[i]
        if i < len(chunks):
            paths, blob = chunks[i]
            body["content"] = {
                "encoding": "zlib+base64",
                "format": "json path->text",
                "files": paths,
                "data": blob,
            }
        bodies.append(body)
    return bodies


def decode_content(body: dict[str, Any]) -> dict[str, str]:
    """The redacted texts a body carries (for ``--dry-run``, the NOC and tests)."""
    content = body.get("content")
    if not content:
        return {}
    raw = zlib.decompress(base64.b64decode(content["data"]))
    texts: dict[str, str] = json.loads(raw.decode("utf-8"))
    return texts
