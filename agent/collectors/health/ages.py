"""What the agent itself knows about the PBX's freshness, without asking Asterisk.

Two figures a NOC can act on when AMI is not configured or not answering: how
old the newest CDR row the call-statistics collector has seen is (a growing age
on a busy box means CDRs stopped being written), and when the configuration
snapshot last saw the configuration change (correlates an outage with an
edit). Both are read from the other collectors' state files, opened read-only,
so they work in the daemon and in ``agentctl collect health --show`` alike.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from agent.errors import AgentError


def cdr_last_row(state_dir: Path) -> float | None:
    """The end time of the newest CDR row counted (epoch), or None when none was."""
    from agent.collectors.callstats.store import STATE_FILE, CallstatsStore

    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    store = CallstatsStore(path, readonly=True)
    try:
        value = store.get_meta("watermark")
    finally:
        store.close()
    return float(value) if isinstance(value, int | float) and value > 0 else None


def config_last_change(state_dir: Path) -> float | None:
    """When a snapshot last found the configuration changed (epoch), or None."""
    from agent.collectors.pbxconfig.snapshot import STATE_DB, Store

    path = state_dir / STATE_DB
    if not path.exists():
        return None
    store = Store(path, readonly=True)
    try:
        value = store.meta().get("changed_at")
    finally:
        store.close()
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def ages(state_dir: Path | None, now: float) -> dict[str, Any]:
    """``cdr`` and ``config`` of the ``pbx`` section: seconds since, or None (and why)."""
    out: dict[str, Any] = {}
    for key, field, read in (
        ("cdr", "last_row_age", cdr_last_row),
        ("config", "last_change_age", config_last_change),
    ):
        if state_dir is None:
            out[key] = {field: None}
            continue
        try:
            at = read(state_dir)
        except (AgentError, OSError, sqlite3.Error) as exc:
            out[key] = {field: None, "error": type(exc).__name__}
            continue
        out[key] = {field: max(int(now - at), 0) if at is not None else None}
    return out
