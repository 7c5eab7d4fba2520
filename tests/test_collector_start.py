"""A collector that cannot start fails alone: reported, retried, and the daemon runs on.

The real daemon (``agentctl run``) is started over a state directory holding a
real call-statistics state file of a newer format than this agent reads: the
file is made by the real store and then stamped with a later format number, as
a newer agent would leave it after a downgrade.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.collectors.callstats.aggregate import STATE_FORMAT
from agent.collectors.callstats.store import STATE_FILE, CallstatsStore
from tests.support.daemon import REPO, AgentProcess, queueing_config, wait_for

pytestmark = pytest.mark.integration


def newer_state_file(state_dir: Path) -> Path:
    """A real callstats state file, stamped as written by a newer agent."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / STATE_FILE
    store = CallstatsStore(path)
    with store.transaction() as db:
        store.put_meta(db, "state_format", STATE_FORMAT + 1)
    store.close()
    return path


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    """A daemon with health every second and callstats over an (empty) CDR file."""
    cdr = tmp_path / "cdr" / "Master.csv"
    cdr.parent.mkdir()
    cdr.write_text("")
    cfg = queueing_config(
        tmp_path,
        collectors={
            "health": {"interval": "1s"},
            "config": {"enabled": False},
            "callstats": {"interval": "1s", "source": {"csv": str(cdr)}},
        },
    )
    a = AgentProcess(tmp_path, cfg)
    yield a
    a.close()


def events(agent: AgentProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in agent.log_events() if e.get("event") == name]


def test_unopenable_state_fails_that_collector_alone(agent: AgentProcess) -> None:
    """A newer-format state file: callstats reported and retried, health and the switch work."""
    state = newer_state_file(agent.state_dir)
    agent.start()
    # Reported in status with the reason, and tried again with backoff.
    status = wait_for(
        lambda: (s := agent.status())["collectors"]["callstats"]["start_attempts"] >= 3 and s,
        timeout=20,
        what="three attempts to start callstats",
    )
    cs = status["collectors"]["callstats"]
    assert cs["started"] is False
    assert "newer than this agent" in cs["start_error"] and str(state) in cs["start_error"]
    assert status["components"]["collector:callstats"]["restarts"] >= 3
    # The other collector keeps running, the daemon answers, the switch flips.
    health = status["collectors"]["health"]["records"]
    wait_for(
        lambda: agent.status()["collectors"]["health"]["records"] > health + 1,
        what="health records while callstats cannot start",
    )
    assert agent.ctl("uplink", "off").returncode == 0
    assert agent.status()["switch"]["state"] == "off"
    # An error event with the reason, once per attempt; no traceback, no exception group.
    failed = events(agent, "collector_start_failed")
    assert len(failed) >= 3 and all(e["level"] == "error" for e in failed)
    assert all(e["collector"] == "callstats" and "newer" in e["error"] for e in failed)
    assert "Traceback" not in agent.log() and "ExceptionGroup" not in agent.log()
    # The human status says it too.
    text = agent.ctl("status").stdout
    assert "callstats" in text and "cannot start" in text and "newer than this agent" in text
    # Moved aside, the file no longer stops it: a later attempt starts the collector.
    state.rename(state.with_suffix(".newer"))
    wait_for(
        lambda: agent.status()["collectors"]["callstats"]["started"],
        timeout=20,
        what="callstats to start once the file is moved aside",
    )
    assert events(agent, "collector_started")
    assert agent.status()["collectors"]["callstats"]["start_error"] is None
    assert agent.stop()[0] == 0


def test_status_json_of_a_collector_that_never_started(agent: AgentProcess) -> None:
    """'agentctl status --json' carries started/start_error for every collector."""
    newer_state_file(agent.state_dir)
    agent.start()
    wait_for(
        lambda: agent.status()["collectors"]["callstats"]["start_error"],
        what="the start error in status",
    )
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "-c", str(agent.config_path), "status", "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
        timeout=20,
    )
    collectors = json.loads(r.stdout)["collectors"]
    assert collectors["health"]["started"] is True and collectors["health"]["start_error"] is None
    assert collectors["callstats"]["started"] is False
