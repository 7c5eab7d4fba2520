"""Lost state is noticed and said: agent.db deleted, truncated, replaced or corrupt between runs.

The daemon runs for real (local only, health every second, so envelopes stay
queued and seqs advance); the database is damaged between runs as a failing
disk or a careless restore would. Each time seq must continue above the last
one issued, the new ledger must begin with a ``reset`` entry naming what was
lost, and ``audit verify`` must not say "chain intact" without saying so.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import anchor
from agent.errors import EX_NOINPUT
from agent.store import db_path
from tests.support.backlog import prefill
from tests.support.daemon import AgentProcess, queueing_config, wait_for
from tests.support.faults import wreck_pages

pytestmark = pytest.mark.integration


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    """A daemon whose uplink never connects (nothing is delivered: envelopes stay queued)."""
    a = AgentProcess(tmp_path, queueing_config(tmp_path))
    yield a
    a.close()


def run_until(agent: AgentProcess, seq: int) -> dict[str, Any]:
    """Start, wait until ``seq`` has been issued, stop; the last status."""
    agent.start()
    wait_for(lambda: agent.status()["outbox"]["last_seq"] >= seq, what=f"seq {seq}")
    status = agent.status()
    code, _ = agent.stop()
    assert code == 0
    return status


def head(agent: AgentProcess) -> tuple[int, str]:
    """The ledger's last entry (n, hash), from `audit verify --json`."""
    out = json.loads(agent.ctl("audit", "verify", "--json").stdout)
    return int(out["entries"]), str(out["head"])


def entries(agent: AgentProcess) -> list[dict[str, Any]]:
    """The whole ledger, from `audit --json`."""
    out = agent.ctl("audit", "--json")
    return [json.loads(line) for line in out.stdout.splitlines()]


def seqs_queued(state_dir: Path) -> list[int]:
    """Seqs in the outbox, read-only."""
    conn = sqlite3.connect(f"file:{db_path(state_dir)}?mode=ro", uri=True, timeout=5)
    try:
        return [int(s) for (s,) in conn.execute("SELECT seq FROM outbox ORDER BY seq")]
    finally:
        conn.close()


def flip_twice(agent: AgentProcess) -> None:
    """Two ledger entries (off, on) so that the ledger has a head worth losing."""
    assert agent.ctl("uplink", "off").returncode == 0
    assert agent.ctl("uplink", "on").returncode == 0


def first_run(agent: AgentProcess) -> tuple[int, tuple[int, str], int]:
    """A run that issues seqs and ledgers flips; (last seq, ledger head, queued)."""
    agent.start()
    flip_twice(agent)
    wait_for(lambda: agent.status()["outbox"]["last_seq"] >= 3, what="three envelopes")
    agent.stop()
    status_seq = max(seqs_queued(agent.state_dir))
    return status_seq, head(agent), len(seqs_queued(agent.state_dir))


def assert_reset(
    agent: AgentProcess, *, reason: str, last_seq: int, old: tuple[int, str], lost: int
) -> dict[str, Any]:
    """The ledger starts with a reset naming what was lost; verify says so (exit 66)."""
    ledger = entries(agent)
    reset = (
        ledger[0]
        if ledger[0]["kind"] == "reset"
        else next(e for e in ledger if e["kind"] == "reset")
    )
    assert reason in reset["reason"]
    assert reset["lost"]["last_seq"] == last_seq
    assert (reset["lost"]["head_n"], reset["lost"]["head_hash"]) == old
    assert reset["lost"]["entries"] == lost
    verify = agent.ctl("audit", "verify")
    assert verify.returncode == EX_NOINPUT, verify.stdout
    assert f"chain intact since reset at entry {reset['n']}" in verify.stdout
    assert f"{lost} earlier entries lost" in verify.stdout
    assert old[1] in verify.stdout
    assert "ledger ok" not in verify.stdout
    return reset


@pytest.mark.parametrize("how", ["truncated", "deleted"])
def test_truncated_or_deleted_database_is_a_reset(agent: AgentProcess, how: str) -> None:
    """agent.db truncated to zero or deleted: seq continues, a reset names the loss."""
    last_seq, old, queued = first_run(agent)
    path = db_path(agent.state_dir)
    if how == "truncated":
        path.write_bytes(b"")
    else:
        path.unlink()
    # Even before the daemon runs again, verify does not call the ledger intact.
    before = agent.ctl("audit", "verify")
    assert before.returncode == EX_NOINPUT, before.stdout + before.stderr
    assert "LOST" in before.stdout and old[1] in before.stdout

    agent.start()
    wait_for(lambda: seqs_queued(agent.state_dir), what="a new envelope")
    assert min(seqs_queued(agent.state_dir)) == last_seq + 1
    reset = assert_reset(agent, reason="missing or empty", last_seq=last_seq, old=old, lost=old[0])
    assert reset["n"] == 1
    assert reset["lost"]["queued"] == queued


def test_older_copy_put_back_is_a_reset(agent: AgentProcess, tmp_path: Path) -> None:
    """A backup of agent.db restored over a newer one: the missing entries are named."""
    first_run(agent)
    backup = tmp_path / "agent.db.backup"
    shutil.copy(db_path(agent.state_dir), backup)
    old_n = head(agent)[0]
    agent.start()
    flip_twice(agent)
    wait_for(lambda: agent.status()["outbox"]["last_seq"] >= 6, what="more envelopes")
    agent.stop()
    last_seq = max(seqs_queued(agent.state_dir))
    newer = head(agent)
    shutil.copy(backup, db_path(agent.state_dir))

    before = agent.ctl("audit", "verify")
    assert before.returncode == EX_NOINPUT, before.stdout
    assert "NOT the one this agent last wrote" in before.stdout

    agent.start()
    wait_for(
        lambda: agent.status()["outbox"]["last_seq"] > last_seq, what="a seq above the lost ones"
    )
    assert min(s for s in seqs_queued(agent.state_dir) if s > last_seq) == last_seq + 1
    reset = assert_reset(
        agent, reason="older copy", last_seq=last_seq, old=newer, lost=newer[0] - old_n
    )
    assert reset["n"] == old_n + 1  # appended to the restored chain, which verifies


def test_another_database_is_a_reset(agent: AgentProcess, tmp_path: Path) -> None:
    """An agent.db from elsewhere (another db_id) is not taken for this agent's own."""
    last_seq, old, _ = first_run(agent)
    other = AgentProcess(tmp_path / "other", queueing_config(tmp_path / "other"))
    try:
        run_until(other, 1)
    finally:
        other.close()
    shutil.copy(db_path(other.state_dir), db_path(agent.state_dir))
    agent.start()
    wait_for(lambda: agent.status()["outbox"]["last_seq"] > last_seq, what="seq above the old")
    assert_reset(agent, reason="another database", last_seq=last_seq, old=old, lost=old[0])


def test_same_database_is_no_reset(agent: AgentProcess) -> None:
    """Restarts on the same database record no reset and verify stays intact (exit 0)."""
    first_run(agent)
    run_until(agent, max(seqs_queued(agent.state_dir)) + 1)
    assert all(e["kind"] != "reset" for e in entries(agent))
    verify = agent.ctl("audit", "verify")
    assert verify.returncode == 0, verify.stdout
    assert "chain intact" in verify.stdout


def test_corrupt_database_gives_up_its_queue(agent: AgentProcess) -> None:
    """Pages overwritten in the middle of agent.db: it is moved aside, its readable queue salvaged.

    Proven on a real SQLite file damaged in place: quick_check fails, the file is
    kept aside untouched, every envelope on an undamaged page is queued again
    with its seq, id and bytes, the damaged ones are counted, and the reset
    entry says how many were salvaged.
    """
    backlog = 3000
    prefill(agent.state_dir, backlog)
    run_until(agent, backlog + 1)  # the daemon's anchor now knows this database
    path = db_path(agent.state_dir)
    conn = sqlite3.connect(path)
    original = {
        int(s): (i, bytes(p)) for s, i, p in conn.execute("SELECT seq, id, payload FROM outbox")
    }
    conn.close()
    last_seq = max(original)
    pages = path.stat().st_size // 4096
    wreck_pages(path, pages // 2, 3)

    agent.start()
    ledger = entries(agent)
    reset = ledger[0]
    assert reset["kind"] == "reset" and "corrupt" in reset["reason"]
    aside = Path(reset["aside"])
    assert aside.exists() and aside.name.startswith("agent.db.corrupt-")
    salvaged, unreadable = reset["salvaged"], reset["unreadable"]
    assert salvaged >= backlog * 0.9, reset
    assert unreadable >= 1, "three wrecked pages in the middle of the outbox lost no row?"
    assert salvaged + unreadable >= len(original) - 1

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        rows = {
            int(s): (i, bytes(p)) for s, i, p in conn.execute("SELECT seq, id, payload FROM outbox")
        }
    finally:
        conn.close()
    kept = {s: v for s, v in rows.items() if s <= last_seq}
    assert len(kept) == salvaged
    assert all(original[s] == v for s, v in kept.items()), (
        "a salvaged row differs from the original"
    )
    for _seq, (id_, payload) in kept.items():
        assert json.loads(payload)["id"] == id_
    wait_for(lambda: agent.status()["outbox"]["last_seq"] > last_seq, what="a new seq")
    assert min(s for s in seqs_queued(agent.state_dir) if s > last_seq) == last_seq + 1
    assert agent.status()["outbox"]["queued"] >= salvaged
    verify = agent.ctl("audit", "verify")
    assert verify.returncode == EX_NOINPUT
    assert f"{salvaged} salvaged" in verify.stdout


def test_anchor_write_is_cheap_and_never_raises(tmp_path: Path) -> None:
    """The anchor is rewritten at most once per interval unless forced; a failed write is kept."""
    clock = [0.0]
    marks = iter(range(1000))

    def current() -> anchor.Mark:
        return anchor.Mark(db_id="x", seq=next(marks), ledger_n=0, ledger_hash="0", queued=0)

    a = anchor.Anchor(tmp_path, current, interval=1.0, clock=lambda: clock[0])
    a.touch(force=True)
    first = anchor.read_anchor(tmp_path)
    assert first is not None and first.seq == 0
    a.touch()  # within the interval: not written
    assert anchor.read_anchor(tmp_path) == first
    clock[0] = 2.0
    a.touch()
    again = anchor.read_anchor(tmp_path)
    assert again is not None and again.seq == 1
    (tmp_path / "gone").mkdir()
    b = anchor.Anchor(tmp_path / "gone" / "deeper", current)
    b.touch(force=True)  # the folder does not exist: no exception, the reason kept
    assert b.error is not None and "No such file" in b.error
