"""The configuration-snapshot collector the daemon schedules.

It scans the PBX configuration in a thread of its own (file work must not
stall the event loop), then offers the snapshot's parts to the gate one at a
time, each made in that thread only when the previous one was accepted: a tree
of any size goes out in bounded memory. Only when every part was accepted is
the snapshot remembered as the last one sent, so that a snapshot the switch
refused part-way is not silently skipped: the next run sends the changes
again, against the last snapshot that really left (the NOC discards the
incomplete one; see the README's wire protocol).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog

from agent.collectors.base import Emit
from agent.collectors.pbxconfig import snapshot
from agent.collectors.pbxconfig.settings import SnapshotSettings
from agent.errors import AgentError, CollectorError
from agent.policy.classes import DataClass, Record

log = structlog.get_logger(__name__)

_T = TypeVar("_T")


class SnapshotCollector:
    """Redacted snapshots of the Asterisk/FreePBX configuration (data class ``config``)."""

    def __init__(
        self,
        settings: SnapshotSettings,
        state_dir: Path,
        *,
        forbidden: Sequence[Path] = (),
        local_only: bool = False,
    ) -> None:
        self.settings = settings
        # No uplink configured: the gate approves nothing, and logs say "kept locally".
        self.local_only = local_only
        self.state_dir = state_dir
        # Extra never-opened trees; tests plant a spool here since /var/spool is not theirs.
        self.forbidden = tuple(forbidden)
        self._store: snapshot.Store | None = None
        self._key: bytes | None = None
        self._lock = asyncio.Lock()
        # One thread of its own: SQLite and the file walk always run on it, and
        # glibc gives it one malloc arena rather than one per pool thread.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="config-snapshot")
        self._stats: dict[str, Any] = {
            "runs": 0,
            "files_scanned": 0,
            "files_read": 0,
            "skipped": {},
            "rules": {},
            "problems": 0,
            "last_mode": None,
            "last_snapshot": None,
            "last_sent_at": None,
            "parts_sent": 0,
            "last_parts": 0,
            "largest_part": 0,
            "refused": 0,
            "last_error": None,
        }

    @property
    def name(self) -> str:
        """``config``: the name in logs, status and the NOC ``collect`` command."""
        return "config"

    @property
    def interval(self) -> float:
        """Seconds between scheduled scans."""
        return self.settings.interval

    def _open(self) -> tuple[snapshot.Store, bytes]:
        if self._store is None:
            self._store = snapshot.Store(self.state_dir / snapshot.STATE_DB)
        if self._key is None:
            self._key, _ = snapshot.load_key(self.state_dir, create=True)
        return self._store, self._key

    async def _run(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, functools.partial(fn, *args, **kwargs))

    def _prepare(self, full: bool, now: float) -> snapshot.Outgoing:
        store, key = self._open()
        mode, base = snapshot.choose_mode(store, self.settings, full=full, now=now)
        if mode is snapshot.SnapshotMode.DELTA:
            # The usual hourly case: first a walk that reads nothing.
            same = snapshot.unchanged_since_sent(
                self.settings, store, key, now=now, forbidden=self.forbidden
            )
            if same is not None:
                return snapshot.Outgoing(same, snapshot.SnapshotMode.UNCHANGED, base)
        scanned = snapshot.scan(self.settings, store, key, now=now, forbidden=self.forbidden)
        return snapshot.Outgoing(scanned, mode, base)

    async def collect(self, emit: Emit, *, reason: str) -> None:
        """Scan; offer a full snapshot on ``command``, else only what changed."""
        async with self._lock:
            now = time.time()
            try:
                await self._collect(emit, reason == "command", now)
            except AgentError as exc:
                self._stats["last_error"] = str(exc)
                raise CollectorError(f"config snapshot: {exc}") from exc
            except OSError as exc:
                self._stats["last_error"] = f"{exc.filename}: {exc.strerror}"
                raise CollectorError(
                    f"config snapshot: cannot read {exc.filename}: {exc.strerror}"
                ) from exc

    async def _collect(self, emit: Emit, full: bool, now: float) -> None:
        out = await self._run(self._prepare, full, now)
        store, _ = self._open()
        bodies = out.bodies(store, now=now)
        try:
            accepted = await self._offer(emit, out, bodies)
            if accepted and out.mode is not snapshot.SnapshotMode.UNCHANGED:
                await self._run(store.commit_sent, out, now=now)
        finally:
            await self._run(_close, bodies, store)
        self._account(out)
        if out.mode is snapshot.SnapshotMode.UNCHANGED:
            log.debug("config_snapshot_unchanged", files=out.scan.files_scanned)
            return
        if not accepted:
            return
        self._stats.update(last_snapshot=out.scan.snapshot_id, last_sent_at=now)
        log.info(
            "config_snapshot_sent",
            snapshot=out.scan.snapshot_id,
            mode=out.mode,
            parts=out.parts,
            files=out.files_sent,
            largest_part=out.largest,
        )

    async def _offer(
        self, emit: Emit, out: snapshot.Outgoing, bodies: Iterator[dict[str, Any]]
    ) -> bool:
        """Offer every part in turn; False as soon as the gate refuses one."""
        while True:
            body = await self._run(next, bodies, None)
            if body is None:
                return True
            if not emit(Record(DataClass.CONFIG, body)):
                self._stats["refused"] += 1
                if self.local_only:
                    log.info(
                        "config_snapshot_kept_locally",
                        snapshot=out.scan.snapshot_id,
                        note="kept locally (no uplink): nothing was queued or sent",
                    )
                    return False
                log.info(
                    "config_snapshot_refused",
                    snapshot=out.scan.snapshot_id,
                    part=body["part"],
                    parts_offered=out.parts,
                )
                return False
            self._stats["parts_sent"] += 1

    def _account(self, out: snapshot.Outgoing) -> None:
        s = out.scan
        self._stats.update(
            runs=self._stats["runs"] + 1,
            files_scanned=s.files_scanned,
            files_read=s.files_read,
            skipped=dict(s.skipped),
            rules=dict(s.fired),
            problems=s.problems_total,
            last_mode=out.mode,
            last_parts=out.parts,
            largest_part=out.largest,
            last_error=s.first_problem,
        )

    def status(self) -> dict[str, Any]:
        """Counters: files scanned, skipped by reason, rules fired by count, last error."""
        return dict(self._stats)

    async def aclose(self) -> None:
        """Close the state database and the worker thread."""
        async with self._lock:
            if self._store is not None:
                await self._run(self._store.close)
                self._store = None
        self._worker.shutdown(wait=False)


def _close(bodies: Iterator[dict[str, Any]], store: snapshot.Store) -> None:
    """Give up the parts not taken and free the scan table (in the worker thread)."""
    close = getattr(bodies, "close", None)
    if close is not None:
        close()
    store.end_scan()
