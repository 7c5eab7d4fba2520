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

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from agent.collectors.pbxconfig.keys import KEY_FILE, key_id, load_key
from agent.collectors.pbxconfig.parts import SCHEMA, Packer, SnapshotMode, decode_content
from agent.collectors.pbxconfig.scan import Scan, scan, unchanged_since_sent
from agent.collectors.pbxconfig.settings import SnapshotSettings
from agent.collectors.pbxconfig.state import STATE_DB, Store

# The snapshot's public face: the collector, agentctl and the health ages use these names;
# the work is done in keys.py, state.py, scan.py, includes.py and parts.py.
__all__ = [
    "KEY_FILE",
    "SCHEMA",
    "STATE_DB",
    "Outgoing",
    "Scan",
    "SnapshotMode",
    "Store",
    "choose_mode",
    "decode_content",
    "key_id",
    "load_key",
    "outgoing",
    "scan",
    "unchanged_since_sent",
]


@dataclass(slots=True)
class Outgoing:
    """A scanned snapshot on its way out: its mode, and its parts made one at a time."""

    scan: Scan
    mode: SnapshotMode  # full | delta; unchanged once a delta turned out to hold nothing
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
        if self.mode is SnapshotMode.UNCHANGED:
            return
        full = self.mode is SnapshotMode.FULL
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
                self.mode = SnapshotMode.UNCHANGED
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
) -> tuple[SnapshotMode, str | None]:
    """Full (asked for, first, or ``full_every`` passed) or a delta; and the last one sent."""
    meta = store.meta()
    base = meta.get("snapshot_id")
    last_full = float(meta.get("full_at", "0"))
    due = full or base is None or now - last_full >= settings.full_every
    return (SnapshotMode.FULL if due else SnapshotMode.DELTA), base


def outgoing(
    scanned: Scan, store: Store, settings: SnapshotSettings, *, full: bool, now: float
) -> Outgoing:
    """What to send of ``scanned``: full, or a delta against the last one sent."""
    mode, base = choose_mode(store, settings, full=full, now=now)
    return Outgoing(scanned, mode, base)
