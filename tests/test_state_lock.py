"""One daemon per state directory: a second `agentctl run` leaves with exit 75, touching nothing."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import statelock
from agent.errors import EX_TEMPFAIL, StateLocked
from agent.store import db_path
from tests.support.daemon import REPO, AgentProcess, queueing_config, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    """A local-only daemon under tmp_path (not started)."""
    a = AgentProcess(tmp_path, queueing_config(tmp_path))
    yield a
    a.close()


def ledger_rows(state_dir: Path) -> list[tuple[int, str]]:
    """(n, hash) of every ledger entry, read-only."""
    conn = sqlite3.connect(f"file:{db_path(state_dir)}?mode=ro", uri=True, timeout=5)
    try:
        return [(int(n), str(h)) for n, h in conn.execute("SELECT n, hash FROM ledger ORDER BY n")]
    finally:
        conn.close()


def test_second_daemon_exits_75_and_leaves_the_first_alone(agent: AgentProcess) -> None:
    """A second daemon on the same config exits 75 naming the lock and the first's pid.

    The first keeps its control socket (same inode, still answering) and its
    database (the second wrote nothing: no new outbox row, no ledger entry, and
    its log has no daemon_started).
    """
    agent.start()
    assert agent.proc is not None
    wait_for(lambda: agent.status()["outbox"]["last_seq"] >= 1, what="a first envelope")
    sock_inode = agent.socket_path.stat().st_ino
    lock_file = statelock.lock_path(agent.state_dir)
    before = agent.status()["outbox"]["last_seq"]

    second = subprocess.run(
        [sys.executable, "-m", "agent.cli", "-c", str(agent.config_path), "run"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        env={**os.environ, "PBX_AGENT_LOG_FORMAT": "json"},
    )
    assert second.returncode == EX_TEMPFAIL, second.stderr
    assert str(lock_file) in second.stderr
    assert f"pid {agent.proc.pid}" in second.stderr
    assert "daemon_started" not in second.stderr + second.stdout
    events = [json.loads(line) for line in second.stdout.splitlines() if line.startswith("{")]
    events += [json.loads(line) for line in second.stderr.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "state_directory_locked" for e in events)

    assert agent.socket_path.stat().st_ino == sock_inode
    assert agent.ctl("status").returncode == 0
    assert agent.proc.poll() is None
    # The first goes on issuing seqs without a clash (no UNIQUE constraint failure).
    wait_for(lambda: agent.status()["outbox"]["last_seq"] >= before + 2, what="more envelopes")
    assert "UNIQUE constraint" not in agent.log()
    code, _ = agent.stop()
    assert code == 0


def test_lock_dies_with_its_holder(agent: AgentProcess) -> None:
    """After kill -9 the lock is free at once (flock), though the file still names the dead pid."""
    agent.start()
    assert agent.proc is not None
    dead = agent.proc.pid
    agent.proc.kill()
    agent.proc.wait(10)
    lock_file = statelock.lock_path(agent.state_dir)
    assert lock_file.read_text().strip() == str(dead)
    agent.start()
    assert agent.status()["daemon"]["pid"] != dead
    entries = ledger_rows(agent.state_dir)
    assert entries == sorted(entries)


def test_lock_names_its_holder_in_process(tmp_path: Path) -> None:
    """acquire() twice in one process: the second raises StateLocked naming file and pid."""
    held = statelock.acquire(tmp_path)
    try:
        with pytest.raises(StateLocked) as info:
            statelock.acquire(tmp_path)
        assert str(statelock.lock_path(tmp_path)) in str(info.value)
        assert f"pid {os.getpid()}" in str(info.value)
        assert info.value.exit_code == EX_TEMPFAIL
    finally:
        held.release()
    statelock.acquire(tmp_path).release()  # free again once released
