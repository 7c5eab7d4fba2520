"""One scan of the configuration roots: walk, redact what changed, write the manifest rows.

A tree of any size is scanned in bounded memory: nothing per file is kept in
Python between one file and the next. A scan writes one row per path to the
state file's temporary ``scan`` table, then resolves includes
(:mod:`.includes`) with indexed look-ups in it.

A scheduled rescan of an unchanged tree (the common case, hourly) does less:
the walk's findings (each path with its ``lstat`` stamp, each skip and link)
hashed with the key and the code's version make a fingerprint, kept with the
last snapshot sent. A rescan first walks without reading and, when the
fingerprint is the same, the manifest is the same: unchanged, with no file
read and no row written.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from agent.collectors.pbxconfig import filters
from agent.collectors.pbxconfig.asterisk_conf import directives
from agent.collectors.pbxconfig.includes import check_includes
from agent.collectors.pbxconfig.keys import key_id
from agent.collectors.pbxconfig.parts import SCHEMA, canonical
from agent.collectors.pbxconfig.settings import SnapshotSettings
from agent.collectors.pbxconfig.sources import (
    Candidate,
    Link,
    PathPolicy,
    Skipped,
    iter_walk,
)
from agent.collectors.pbxconfig.state import ENTRY_FORMAT, CacheRow, Store, pack_text
from agent.policy.local_rules import LocalRules
from agent.policy.redact import Finding, find_secret_material

#: Rows written to SQLite at once while a tree is walked.
BATCH = 512
#: The summary lists problems up to this many bytes of JSON, then counts the rest.
MAX_PROBLEM_BYTES = 64 * 1024
#: Part of every fingerprint: a new agent whose entries differ must not match an old one.
_SCAN_FORMAT = f"{SCHEMA}/{ENTRY_FORMAT}/scan-1"


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
    settings: SnapshotSettings,
    store: Store,
    key: bytes,
    *,
    now: float,
    forbidden: Sequence[Path] = (),
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
        snapshot_id=f"{int(now)}-{secrets.token_hex(4)}",
        taken_at=now,
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
    now: float,
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
        snapshot_id=f"{int(now)}-{secrets.token_hex(4)}",
        taken_at=now,
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
                packed = pack_text(r.text) if r.text is not None else None
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
    check_includes(policy, store, out)
    return out
