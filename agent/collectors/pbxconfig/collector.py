"""The configuration-snapshot collector the daemon schedules.

It scans the PBX configuration in a worker thread (file work must not stall
the event loop), offers each part of a snapshot to the gate, and only when
every part was accepted remembers the snapshot as the last one sent, so that a
snapshot the switch refused is not silently skipped: the next run sends the
changes again, against the last snapshot that really left.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from agent.collectors.base import Emit, Record
from agent.collectors.pbxconfig import snapshot
from agent.collectors.pbxconfig.settings import SnapshotSettings
from agent.errors import AgentError, CollectorError
from agent.policy.classes import DataClass

log = structlog.get_logger(__name__)


class SnapshotCollector:
    """Redacted snapshots of the Asterisk/FreePBX configuration (data class ``config``)."""

    def __init__(
        self, settings: SnapshotSettings, state_dir: Path, *, forbidden: Sequence[Path] = ()
    ) -> None:
        self.settings = settings
        self.state_dir = state_dir
        # Extra never-opened trees; tests plant a spool here since /var/spool is not theirs.
        self.forbidden = tuple(forbidden)
        self._store: snapshot.Store | None = None
        self._key: bytes | None = None
        self._lock = asyncio.Lock()
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

    def _scan(self, full: bool, now: float) -> snapshot.Plan:
        store, key = self._open()
        plan = snapshot.scan(self.settings, store, key, forbidden=self.forbidden)
        snapshot.decide(plan, store, self.settings, full=full, now=now)
        store.save_cache(plan)
        return plan

    async def collect(self, emit: Emit, *, reason: str) -> None:
        """Scan; offer a full snapshot on ``command``, else only what changed."""
        async with self._lock:
            now = time.time()
            try:
                plan = await asyncio.to_thread(self._scan, reason == "command", now)
            except AgentError as exc:
                self._stats["last_error"] = str(exc)
                raise CollectorError(f"config snapshot: {exc}") from exc
            except OSError as exc:
                self._stats["last_error"] = f"{exc.filename}: {exc.strerror}"
                raise CollectorError(
                    f"config snapshot: cannot read {exc.filename}: {exc.strerror}"
                ) from exc
            self._account(plan)
            if plan.mode == "unchanged":
                log.debug("config_snapshot_unchanged", files=plan.files_scanned)
                return
            for body in plan.bodies:
                if not emit(Record(DataClass.CONFIG, body)):
                    self._stats["refused"] += 1
                    log.info(
                        "config_snapshot_refused",
                        snapshot=plan.snapshot_id,
                        part=body["part"],
                        parts=body["parts"],
                    )
                    return
                self._stats["parts_sent"] += 1
            store, _ = self._open()
            await asyncio.to_thread(store.commit_sent, plan, now=now)
            self._stats.update(last_snapshot=plan.snapshot_id, last_sent_at=now)
            log.info(
                "config_snapshot_sent",
                snapshot=plan.snapshot_id,
                mode=plan.mode,
                parts=len(plan.bodies),
                files=len(plan.texts),
            )

    def _account(self, plan: snapshot.Plan) -> None:
        rules: Counter[str] = Counter(plan.fired)
        self._stats.update(
            runs=self._stats["runs"] + 1,
            files_scanned=plan.files_scanned,
            files_read=len(plan.fresh),
            skipped=dict(plan.skipped),
            rules=dict(rules),
            problems=len(plan.problems),
            last_mode=plan.mode,
            last_error=plan.problems[0]["problem"] if plan.problems else None,
        )

    def status(self) -> dict[str, Any]:
        """Counters: files scanned, skipped by reason, rules fired by count, last error."""
        return dict(self._stats)

    async def aclose(self) -> None:
        """Close the state database."""
        async with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None
