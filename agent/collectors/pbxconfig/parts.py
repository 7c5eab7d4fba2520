"""The wire form of a configuration snapshot: parts of at most 256 KiB, and putting them together.

A snapshot of any size leaves as a sequence of parts, each the body of one
envelope, built one at a time while the manifest streams out of the
collector's state database, so neither the agent nor the broker ever holds
more than one part. Every part carries ``schema``, ``snapshot`` (the id),
``part`` (1, 2, ...), ``mode`` (``full``/``delta``), ``base`` (the snapshot a
delta applies to) and ``taken_at``, and any of these sections:

``manifest``
    entries in path order (UTF-8 byte order), continuing from the previous part;
``removed``
    paths gone since ``base`` (deltas), in path order;
``content``
    whole files: ``{"encoding": "zlib+base64", "format": "json path->text",
    "data": ...}``; ``data`` decodes to one JSON object of path to redacted text;
``chunk``
    a piece of one large file: ``{"path", "offset", "final", "encoding":
    "zlib+base64", "data"}``; ``data`` decodes to the bytes of the file's UTF-8
    text from ``offset`` on; ``final`` marks the piece that ends the file.

The last part alone carries ``parts`` (its own number, so the count) and
``summary`` (counts, ``manifest_digest``, skipped reasons, rules fired,
problems), because both are known only once the manifest has been read to the
end. :func:`reassemble` is the reference for a receiver; the README's wire
protocol section says the same in prose.

Sizes are counted exactly as the gate serialises a body (compact JSON, UTF-8),
except the open content stream, which is counted by an upper bound until it is
flushed: a part can be a little under the limit, never over it.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.errors import IncompleteSnapshot

SCHEMA = "pbx-config-snapshot/2"
#: The largest envelope a part may become (the gate adds id, time, seq and class around it).
MAX_ENVELOPE = 256 * 1024
#: What the envelope around a body takes (124 bytes with a 19-digit seq; kept generous).
ENVELOPE_ROOM = 1024
#: The largest body, serialised as the gate does.
MAX_BODY = MAX_ENVELOPE - ENVELOPE_ROOM
#: A file whose JSON-escaped text is longer than this travels in chunks of its own
#: rather than inside a shared ``content`` stream.
GROUP_MAX_RAW = 64 * 1024
#: Content is squeezed (zlib 9) until this much raw text has been packed in a
#: snapshot, then packed fast (zlib 1): deltas are small, big full snapshots must be quick.
SQUEEZE_UNTIL = 1024 * 1024
#: A chunk is not started in a part with less room than this (compressed bytes).
MIN_CHUNK_ROOM = 8 * 1024
#: What Z_FINISH adds after a sync flush (an empty final block and the Adler-32): at most.
_FINISH = 16
_CONTENT_WRAP = {"encoding": "zlib+base64", "format": "json path->text", "data": ""}
_CHUNK_ENCODING = "zlib+base64"
#: What ``,"content":{…,"data":""}`` costs besides the base64 text.
_CONTENT_COST = (
    len("content") + 4 + len(json.dumps(_CONTENT_WRAP, separators=(",", ":")).encode("utf-8"))
)

#: A string as JSON text (what json.dumps does with ensure_ascii=False, without its set-up).
_json_str: Callable[[str], str] = json.encoder.encode_basestring


class SnapshotMode(enum.StrEnum):
    """What a snapshot is: everything, the changes against a base, or nothing to send."""

    FULL = "full"
    DELTA = "delta"
    UNCHANGED = "unchanged"  # never on the wire: a delta that turned out to hold nothing


def canonical(value: Any) -> str:
    """The one JSON spelling of a manifest entry: sorted keys, no spaces, UTF-8 as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def jlen(value: Any) -> int:
    """Bytes of ``value`` as the gate serialises a body (compact, UTF-8)."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def b64len(n: int) -> int:
    """Length of the base64 text of ``n`` bytes."""
    return 4 * ((n + 2) // 3)


def _b64room(chars: int) -> int:
    """Most bytes whose base64 text fits in ``chars`` characters."""
    return max(chars, 0) // 4 * 3


def _worst(raw: int) -> int:
    """Most that deflate can emit for ``raw`` bytes fed (stored blocks and headers)."""
    return raw + (raw >> 10) + 64


class _Deflate:
    """One zlib stream whose compressed size is known to stay under a bound."""

    def __init__(self, level: int) -> None:
        self._z = zlib.compressobj(level)
        self._out: list[bytes] = []
        self.exact = 0  # bytes emitted so far
        self.pending = 0  # raw bytes fed since the last flush (not yet counted exactly)
        self.raw = 0

    def bound(self, more: int = 0) -> int:
        """Most the stream can take, finished, if ``more`` raw bytes are fed."""
        return self.exact + _worst(self.pending + more) + _FINISH

    def feed(self, data: bytes) -> None:
        """Add ``data``."""
        out = self._z.compress(data)
        if out:
            self._out.append(out)
            self.exact += len(out)
        self.pending += len(data)
        self.raw += len(data)

    def sync(self) -> None:
        """Flush what is pending so that ``exact`` is the true size so far."""
        if self.pending:
            out = self._z.flush(zlib.Z_SYNC_FLUSH)
            self._out.append(out)
            self.exact += len(out)
            self.pending = 0

    def try_feed(self, data: bytes, budget: int, reserve: int = 0) -> bool:
        """Feed ``data`` if the stream, with ``reserve`` more raw bytes and finished, is sure
        to stay within ``budget`` bytes."""
        if self.bound(len(data) + reserve) <= budget:
            self.feed(data)
            return True
        self.sync()
        if self.bound(len(data) + reserve) <= budget:
            self.feed(data)
            return True
        if len(data) < 4096:
            return False
        # A big piece of text: its worst case does not fit, its real size may.
        trial = self._z.copy()
        out = trial.compress(data) + trial.flush(zlib.Z_SYNC_FLUSH)
        if self.exact + len(out) + _worst(reserve) + _FINISH > budget:
            return False
        self._z = trial
        self._out.append(out)
        self.exact += len(out)
        self.raw += len(data)
        return True

    def finish(self) -> bytes:
        """The whole compressed stream."""
        self._out.append(self._z.flush(zlib.Z_FINISH))
        data = b"".join(self._out)
        self._out = []
        return data


@dataclass(slots=True)
class _Part:
    """One part being filled; ``size`` is exact for all but the open content stream."""

    body: dict[str, Any]
    size: int = 0
    group: _Deflate | None = None
    group_files: int = 0
    manifest: list[dict[str, Any]] | None = None
    removed: list[str] | None = None

    def __post_init__(self) -> None:
        self.size = jlen(self.body)

    def _key(self, key: str) -> int:
        """Bytes that adding ``key`` to the body costs besides its value."""
        return len(key) + 4  # ,"key":

    def open_cost(self) -> int:
        """What the open content stream may still cost, at most."""
        if self.group is None:
            return 0
        return _CONTENT_COST + b64len(self.group.bound(1))

    def room(self) -> int:
        """Bytes left under the limit, the open stream counted at its bound."""
        return MAX_BODY - self.size - self.open_cost()

    def _fits(self, extra: int) -> bool:
        if self.size + extra + self.open_cost() <= MAX_BODY:
            return True
        if self.group is not None and self.group.pending:
            self.group.sync()
            return self.size + extra + self.open_cost() <= MAX_BODY
        return False

    def add_entry(self, entry_text: str) -> bool:
        """Add a manifest entry (its canonical JSON) if it fits."""
        n = len(entry_text.encode("utf-8"))
        extra = n + (self._key("manifest") + 2 if self.manifest is None else 1)
        if not self._fits(extra):
            return False
        if self.manifest is None:
            self.manifest = self.body["manifest"] = []
        self.manifest.append(json.loads(entry_text))
        self.size += extra
        return True

    def add_removed(self, path: str) -> bool:
        """Add a removed path if it fits."""
        n = jlen(path)
        extra = n + (self._key("removed") + 2 if self.removed is None else 1)
        if not self._fits(extra):
            return False
        if self.removed is None:
            self.removed = self.body["removed"] = []
        self.removed.append(path)
        self.size += extra
        return True

    def add_file(self, fragment: bytes, level: int) -> bool:
        """Add one ``"path":"text"`` pair to the content stream if it fits."""
        budget = _b64room(MAX_BODY - self.size - _CONTENT_COST)
        # reserve=1: the brace that closes the JSON object, fed when the part is closed.
        if self.group is None:
            self.group = _Deflate(level)
            if not self.group.try_feed(b"{" + fragment, budget, reserve=1):
                self.group = None
                return False
        elif not self.group.try_feed(b"," + fragment, budget, reserve=1):
            return False
        self.group_files += 1
        return True

    def add_chunk(self, path: str, data: bytes, offset: int, level: int) -> int:
        """Pack as much of ``data`` from ``offset`` as fits in one chunk; the new offset."""
        wrap = self._key("chunk") + jlen(
            {
                "path": path,
                "offset": offset,
                "final": False,
                "encoding": _CHUNK_ENCODING,
                "data": "",
            }
        )
        budget = _b64room(self.room() - wrap)
        if budget < MIN_CHUNK_ROOM and offset < len(data):
            return offset
        z = _Deflate(level)
        end = offset
        while end < len(data):
            # Feed what surely fits, flush to learn the true size, repeat while room is left.
            room = budget - z.bound()
            step = room - (room >> 10) - 64
            if step < 512:
                break
            z.feed(data[end : end + step])
            end = min(end + step, len(data))
            z.sync()
        if end == offset and offset < len(data):
            return offset
        blob = z.finish()
        chunk = {
            "path": path,
            "offset": offset,
            "final": end >= len(data),
            "encoding": _CHUNK_ENCODING,
            "data": base64.b64encode(blob).decode("ascii"),
        }
        self.body["chunk"] = chunk
        self.size += self._key("chunk") + jlen(chunk)
        return end

    @property
    def has_chunk(self) -> bool:
        """Whether this part already carries a chunk (one per part)."""
        return "chunk" in self.body

    def add_last(self, summary: dict[str, Any]) -> bool:
        """Make this the last part: its count and the summary, if they fit."""
        parts = self.body["part"]
        extra = self._key("parts") + len(str(parts)) + self._key("summary") + jlen(summary)
        if not self._fits(extra):
            return False
        self.body["parts"] = parts
        self.body["summary"] = summary
        self.size += extra
        return True

    def close(self) -> dict[str, Any]:
        """The finished body."""
        if self.group is not None:
            self.group.feed(b"}")  # reserved by every try_feed
            blob = self.group.finish()
            data = base64.b64encode(blob).decode("ascii")
            self.body["content"] = {**_CONTENT_WRAP, "data": data}
            self.size += _CONTENT_COST + len(data)
            self.group = None
        return self.body

    @property
    def empty(self) -> bool:
        """Whether nothing but the header is in it yet."""
        return (
            self.group is None
            and self.manifest is None
            and self.removed is None
            and "chunk" not in self.body
        )


@dataclass(slots=True)
class Packer:
    """Turns a stream of manifest entries, contents and removed paths into parts."""

    snapshot_id: str
    mode: str
    base: str | None
    taken_at: str
    parts: int = 0
    largest: int = 0
    files_sent: int = 0
    changed: int = 0
    removed: int = 0
    raw_packed: int = 0
    _part: _Part | None = None
    _done: list[dict[str, Any]] = field(default_factory=list)

    def _head(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "snapshot": self.snapshot_id,
            "part": self.parts + 1,
            "mode": self.mode,
            "base": self.base if self.mode == SnapshotMode.DELTA else None,
            "taken_at": self.taken_at,
        }

    @property
    def part(self) -> _Part:
        """The part being filled (a new one when none is open)."""
        if self._part is None:
            self._part = _Part(self._head())
        return self._part

    def _ship(self) -> None:
        assert self._part is not None
        body = self._part.close()
        self.parts += 1
        self.largest = max(self.largest, self._part.size)
        self._done.append(body)
        self._part = None

    def take(self) -> list[dict[str, Any]]:
        """The parts finished since the last call (at most a few: the caller sends them)."""
        done, self._done = self._done, []
        return done

    def _level(self) -> int:
        return 9 if self.raw_packed < SQUEEZE_UNTIL else 1

    def entry(self, entry_text: str) -> None:
        """A manifest entry that changed."""
        self.changed += 1
        while not self.part.add_entry(entry_text):
            self._must_progress()
            self._ship()

    def removed_path(self, path: str) -> None:
        """A path gone since the base."""
        self.removed += 1
        while not self.part.add_removed(path):
            self._must_progress()
            self._ship()

    def content(self, path: str, text: str) -> None:
        """The redacted text of a file whose entry was sent."""
        self.files_sent += 1
        fragment = (_json_str(path) + ":" + _json_str(text)).encode("utf-8")
        if len(fragment) <= GROUP_MAX_RAW:
            while not self.part.add_file(fragment, self._level()):
                self._must_progress()
                self._ship()
            self.raw_packed += len(fragment)
            return
        data = text.encode("utf-8")
        offset = 0
        while True:
            if self.part.has_chunk:
                self._ship()
            new = self.part.add_chunk(path, data, offset, self._level())
            if new == offset and offset < len(data):
                self._must_progress()
                self._ship()
                continue
            self.raw_packed += new - offset
            offset = new
            if offset >= len(data):
                return

    def finish(self, summary: dict[str, Any]) -> None:
        """The summary goes in the last part, which carries the count."""
        while not self.part.add_last(summary):
            self._must_progress()
            self._ship()
        self._ship()

    def _must_progress(self) -> None:
        # Nothing fits in an empty part only if one item is larger than a part can be;
        # the collector caps every item well below that, so this is a bug, not input.
        if self._part is not None and self._part.empty:
            raise ValueError("a snapshot item is larger than a part can carry")


# -- receiving ------------------------------------------------------------------------


def decode_content(body: dict[str, Any]) -> dict[str, str]:
    """The whole files a part's ``content`` section carries (path -> redacted text)."""
    content = body.get("content")
    if not content:
        return {}
    raw = zlib.decompress(base64.b64decode(content["data"]))
    texts: dict[str, str] = json.loads(raw.decode("utf-8"))
    return texts


def decode_chunk(body: dict[str, Any]) -> tuple[str, int, bool, bytes] | None:
    """A part's ``chunk``: path, offset, final, and the bytes of text it carries."""
    chunk = body.get("chunk")
    if not chunk:
        return None
    data = zlib.decompress(base64.b64decode(chunk["data"]))
    return chunk["path"], int(chunk["offset"]), bool(chunk["final"]), data


def manifest_digest(entries: Iterable[dict[str, Any]]) -> str:
    """``sha256:`` of every entry's canonical JSON and a newline, in path (UTF-8 byte) order."""
    h = hashlib.sha256()
    for entry in sorted(entries, key=lambda e: str(e["path"]).encode("utf-8")):
        h.update(canonical(entry).encode("utf-8") + b"\n")
    return f"sha256:{h.hexdigest()}"


@dataclass(slots=True)
class Reassembled:
    """A snapshot put back together from its parts."""

    snapshot: str
    mode: str
    base: str | None
    summary: dict[str, Any]
    entries: list[dict[str, Any]]  # as sent: every entry (full) or those that changed (delta)
    removed: list[str]
    texts: dict[str, str]  # path -> redacted text, for every file whose content was sent


def reassemble(
    bodies: Iterable[dict[str, Any]], base_manifest: dict[str, dict[str, Any]] | None = None
) -> Reassembled:
    """Put one snapshot's parts together (any order) and verify it.

    Checks: one snapshot id and schema, parts 1..N all present (N from the
    part that carries ``parts``), every chunked file complete and contiguous,
    each text's SHA-256 equal to its entry's digest, and the ``manifest_digest``
    of the whole manifest: the entries of a full snapshot, or for a delta
    ``base_manifest`` (path -> entry, the base's whole manifest) with the
    removed paths taken out and the changed entries put in. Without
    ``base_manifest`` a delta's manifest digest is not checked.
    Raises :class:`IncompleteSnapshot` naming what is wrong.
    """
    by_part: dict[int, dict[str, Any]] = {}
    for body in bodies:
        by_part[int(body["part"])] = body
    if not by_part:
        raise IncompleteSnapshot("no parts")
    ids = {b["snapshot"] for b in by_part.values()}
    schemas = {b["schema"] for b in by_part.values()}
    if len(ids) != 1 or schemas != {SCHEMA}:
        raise IncompleteSnapshot(f"parts of several snapshots or schemas: {ids} {schemas}")
    last = [b for b in by_part.values() if "parts" in b]
    if not last:
        raise IncompleteSnapshot("the last part (the one with 'parts') has not arrived")
    count = int(last[0]["parts"])
    missing = sorted(set(range(1, count + 1)) - set(by_part))
    if missing or len(by_part) != count:
        raise IncompleteSnapshot(f"parts missing: {missing}")
    ordered = [by_part[i] for i in range(1, count + 1)]
    entries: list[dict[str, Any]] = []
    removed: list[str] = []
    texts: dict[str, str] = {}
    pieces: dict[str, list[tuple[int, bool, bytes]]] = {}
    for body in ordered:
        entries.extend(body.get("manifest", ()))
        removed.extend(body.get("removed", ()))
        texts.update(decode_content(body))
        chunk = decode_chunk(body)
        if chunk is not None:
            path, offset, final, data = chunk
            pieces.setdefault(path, []).append((offset, final, data))
    for path, got in pieces.items():
        got.sort()
        joined = bytearray()
        for offset, _, data in got:
            if offset != len(joined):
                raise IncompleteSnapshot(f"{path}: chunk at {offset}, expected {len(joined)}")
            joined += data
        if not got[-1][1]:
            raise IncompleteSnapshot(f"{path}: the final chunk is missing")
        texts[path] = joined.decode("utf-8")
    summary = last[0]["summary"]
    by_path = {e["path"]: e for e in entries}
    for path, text in texts.items():
        entry = by_path.get(path)
        digest = "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
        if entry is None or entry.get("digest") != digest:
            raise IncompleteSnapshot(f"{path}: content does not match its manifest digest")
    mode = ordered[0]["mode"]
    whole: dict[str, dict[str, Any]] | None = None
    if mode == SnapshotMode.FULL:
        whole = by_path
    elif base_manifest is not None:
        whole = {p: e for p, e in base_manifest.items() if p not in set(removed)}
        whole.update(by_path)
    if whole is not None and manifest_digest(whole.values()) != summary["manifest_digest"]:
        raise IncompleteSnapshot("the manifest does not match manifest_digest")
    return Reassembled(
        snapshot=ordered[0]["snapshot"],
        mode=mode,
        base=ordered[0]["base"],
        summary=summary,
        entries=entries,
        removed=removed,
        texts=texts,
    )
