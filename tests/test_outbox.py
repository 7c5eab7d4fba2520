"""The durable outbox on real SQLite files: order, the size bound, atomic delivery, corruption.

Failures inside a transaction are made real with SQLite triggers that raise,
so the rollback under test is SQLite's own, not a mock's.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent import ledger
from agent.config import PolicyConfig
from agent.errors import StateError
from agent.ledger import Ledger
from agent.outbox import Outbox, Stored
from agent.policy.classes import DataClass, Record
from agent.policy.gate import Envelope, Gate
from agent.store import db_path, open_db
from tests.support.daemon import AgentProcess, queueing_config, wait_for
from tests.support.payload import incompressible


class Box:
    """Database, ledger, outbox and gate over one state directory, as the daemon wires them."""

    def __init__(self, state: Path, max_bytes: int = 1 << 20) -> None:
        self.state = state
        self.conn, self.moved = open_db(state)
        self.ledger = Ledger(self.conn)
        self.outbox = Outbox(self.conn, self.ledger, max_bytes=max_bytes)
        self.gate = Gate(
            policy=PolicyConfig(send=frozenset(DataClass)),
            switch_on=lambda: True,
            last_seq=self.outbox.last_seq,
        )

    def approve(self, i: int, size: int = 100) -> Envelope:
        """An approved health envelope whose payload is a little over ``size`` bytes."""
        return self.gate.approve(Record(DataClass.HEALTH, {"i": i, "pad": incompressible(size, i)}))

    def fill(self, n: int, size: int = 100) -> list[Envelope]:
        """Approve and store ``n`` envelopes."""
        envs = [self.approve(i, size) for i in range(n)]
        for env in envs:
            self.outbox.put(env)
        return envs

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    """A fresh box in tmp_path/state."""
    b = Box(tmp_path / "state")
    yield b
    b.close()


def kinds(conn: sqlite3.Connection, kind: str) -> list[ledger.Entry]:
    """Ledger entries of one kind."""
    return list(ledger.read(conn, kind=kind))


def test_put_pending_delivered(box: Box) -> None:
    """Envelopes come back oldest first, after_seq pages, and delivery removes exactly those."""
    envs = box.fill(10)
    pending = box.outbox.pending(4)
    assert [p.seq for p in pending] == [1, 2, 3, 4]
    assert [p.id for p in pending] == [e.id for e in envs[:4]]
    assert all(
        p.payload == e.payload and p.data_class == "health"
        for p, e in zip(pending, envs[:4], strict=True)
    )
    assert [p.seq for p in box.outbox.pending(100, after_seq=8)] == [9, 10]
    box.outbox.delivered(pending)
    assert [p.seq for p in box.outbox.pending(100)] == [5, 6, 7, 8, 9, 10]
    stats = box.outbox.stats()
    assert stats["queued"] == 6
    assert stats["delivered"] == 4
    assert stats["bytes"] == sum(len(e.payload) for e in envs[4:])
    assert stats["last_seq"] == 10


def test_delivered_writes_ledger_entries(box: Box) -> None:
    """Each delivery leaves one ledger entry with id, class, seq, size and the body's SHA-256."""
    envs = box.fill(3)
    box.outbox.delivered(box.outbox.pending(10))
    entries = kinds(box.conn, "delivered")
    assert [e.data["id"] for e in entries] == [e.id for e in envs]
    for entry, env in zip(entries, envs, strict=True):
        assert entry.data == {
            "id": env.id,
            "class": "health",
            "seq": env.seq,
            "size": len(env.payload),
            "sha256": hashlib.sha256(env.payload).hexdigest(),
        }
    assert ledger.verify(box.conn).ok


def test_delivery_and_ledger_roll_back_together_when_ledger_write_fails(box: Box) -> None:
    """A ledger insert that fails mid-batch leaves every envelope queued and no entry written."""
    box.fill(5)
    box.conn.execute(
        "CREATE TRIGGER fail_ledger BEFORE INSERT ON ledger "
        "WHEN json_extract(NEW.data, '$.seq') = 3 BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
    )
    items = box.outbox.pending(10)
    with pytest.raises(StateError, match="cannot record delivery"):
        box.outbox.delivered(items)
    assert box.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 5
    assert box.outbox.count == 5
    assert kinds(box.conn, "delivered") == []
    assert box.outbox.stats()["delivered"] == 0
    # The in-memory head of the chain was rewound: the next entries still chain correctly.
    box.conn.execute("DROP TRIGGER fail_ledger")
    box.outbox.delivered(items)
    assert box.outbox.count == 0
    assert [e.data["seq"] for e in kinds(box.conn, "delivered")] == [1, 2, 3, 4, 5]
    verdict = ledger.verify(box.conn)
    assert verdict.ok and verdict.entries == 5


def test_delivery_and_ledger_roll_back_together_when_deletion_fails(box: Box) -> None:
    """An outbox deletion that fails after earlier ledger entries were written undoes them too."""
    box.fill(4)
    box.conn.execute(
        "CREATE TRIGGER fail_delete BEFORE DELETE ON outbox "
        "WHEN OLD.seq = 4 BEGIN SELECT RAISE(ABORT, 'io error'); END"
    )
    with pytest.raises(StateError):
        box.outbox.delivered(box.outbox.pending(10))
    assert [p.seq for p in box.outbox.pending(10)] == [1, 2, 3, 4]
    assert box.conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0] == 0
    box.conn.execute("DROP TRIGGER fail_delete")
    box.ledger.record("switch", {"state": "off"})
    assert ledger.verify(box.conn).ok


def test_put_failure_stores_nothing(box: Box) -> None:
    """An insert that SQLite refuses raises StateError and changes no counter."""
    box.fill(2)
    box.conn.execute(
        "CREATE TRIGGER fail_put BEFORE INSERT ON outbox BEGIN SELECT RAISE(ABORT, 'full'); END"
    )
    env = box.approve(99)
    with pytest.raises(StateError, match=env.id):
        box.outbox.put(env)
    assert box.outbox.stats()["queued"] == 2
    assert box.outbox.last_seq == 2
    assert box.conn.execute("SELECT MAX(seq) FROM outbox").fetchone()[0] == 2


def test_unusable_database_raises_state_error(box: Box) -> None:
    """With the connection gone, put() and delivered() raise StateError, not sqlite3 errors."""
    env = box.approve(1)
    box.outbox.put(env)
    items = box.outbox.pending(1)
    box.conn.close()
    with pytest.raises(StateError):
        box.outbox.put(box.approve(2))
    with pytest.raises(StateError):
        box.outbox.delivered(items)


def test_size_bound_drops_oldest_and_counts(tmp_path: Path) -> None:
    """Over max_bytes the oldest envelopes go, are counted, and leave "dropped" ledger entries."""
    b = Box(tmp_path / "state", max_bytes=10_000)
    try:
        envs = b.fill(30, size=900)  # ~950 bytes each: about ten fit
        sizes = [len(e.payload) for e in envs]
        queued = b.outbox.pending(100)
        kept = [q.seq for q in queued]
        assert kept == list(range(kept[0], 31))  # the newest, contiguous
        assert sum(sizes[kept[0] - 1 :]) <= 10_000 < sum(sizes[kept[0] - 2 :])
        assert b.outbox.dropped == kept[0] - 1
        assert b.outbox.stats()["bytes"] == sum(len(q.payload) for q in queued) <= 10_000
        dropped = kinds(b.conn, "dropped")
        assert sum(d.data["count"] for d in dropped) == b.outbox.dropped
        assert dropped[0].data["first_seq"] == 1
        assert dropped[-1].data["last_seq"] == kept[0] - 1
        assert all(d.data["reason"] == "outbox full" for d in dropped)
        assert ledger.verify(b.conn).ok
    finally:
        b.close()


def test_delivery_of_an_envelope_dropped_in_flight_is_skipped(tmp_path: Path) -> None:
    """An envelope dropped by the bound while in flight gets no "delivered" entry when acked."""
    b = Box(tmp_path / "state", max_bytes=5_000)
    try:
        b.fill(4, size=900)
        in_flight = b.outbox.pending(2)
        b.fill(4, size=900)  # pushes the in-flight ones out
        assert b.outbox.pending(1)[0].seq > in_flight[-1].seq
        b.outbox.delivered(in_flight)
        assert kinds(b.conn, "delivered") == []
        assert b.outbox.stats()["delivered"] == 0
        assert b.outbox.count == b.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    finally:
        b.close()


def test_counters_survive_reopen(tmp_path: Path) -> None:
    """Queued count, bytes, drops, deliveries and last_seq are the same after a reopen."""
    state = tmp_path / "state"
    b = Box(state, max_bytes=5_000)
    b.fill(12, size=900)
    b.outbox.delivered(b.outbox.pending(2))
    before = b.outbox.stats()
    b.outbox.delivered(b.outbox.pending(100))  # everything: last_seq must persist regardless
    after_all = b.outbox.stats()
    b.close()
    assert before["dropped"] > 0 and before["delivered"] == 2

    again = Box(state, max_bytes=5_000)
    try:
        assert again.outbox.stats() == after_all
        assert again.outbox.last_seq == 12
        assert again.approve(0).seq == 13
        assert ledger.verify(again.conn).ok
    finally:
        again.close()


def test_put_is_durable_for_another_connection(tmp_path: Path) -> None:
    """What put() returned from is visible to another connection; WAL, synchronous=FULL."""
    b = Box(tmp_path / "state")
    try:
        envs = b.fill(3)
        assert b.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert b.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        other = sqlite3.connect(db_path(b.state))
        try:
            ids = [r[0] for r in other.execute("SELECT id FROM outbox ORDER BY seq")]
        finally:
            other.close()
        assert ids == [e.id for e in envs]
    finally:
        b.close()


def _garbage_header(path: Path) -> None:
    path.write_bytes(os.urandom(64 * 1024))


def _garbage_pages(path: Path) -> None:
    # Keep SQLite's 100-byte header intact so the file still opens; wreck the b-tree pages.
    data = bytearray(path.read_bytes())
    assert len(data) > 8192
    data[4096:] = b"\xa5" * (len(data) - 4096)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("wreck", [_garbage_header, _garbage_pages], ids=["header", "pages"])
def test_corrupt_database_moved_aside_and_fresh_one_started(tmp_path: Path, wreck: object) -> None:
    """open_db moves a corrupt file aside with a clear log line, says why, and starts afresh."""
    state = tmp_path / "state"
    b = Box(state)
    b.fill(50, size=500)
    b.close()
    path = db_path(state)
    assert not Path(str(path) + "-wal").exists()
    wreck(path)  # type: ignore[operator]
    with capture_logs() as logs:
        conn, moved = open_db(state)
    try:
        assert moved is not None
        assert str(path) in moved and "corrupt" in moved
        aside = [p for p in state.iterdir() if p.name.startswith("agent.db.corrupt-")]
        assert len(aside) == 1
        assert str(aside[0]) in moved
        events = [e for e in logs if e["event"] == "database_corrupt_moved_aside"]
        assert len(events) == 1
        assert events[0]["log_level"] == "error"
        assert events[0]["path"] == str(path) and events[0]["aside"] == str(aside[0])
        assert events[0]["error"]
        fresh = Outbox(conn, Ledger(conn), max_bytes=1 << 20)
        assert fresh.count == 0 and fresh.last_seq == 0
        assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    _, again = open_db(state)  # the fresh one is healthy: nothing moved the second time
    assert again is None


@pytest.mark.integration
def test_daemon_starts_on_corrupt_database(tmp_path: Path) -> None:
    """A corrupt database is moved aside, "reset" is entry 1, status serves, verify says lost."""
    agent = AgentProcess(tmp_path, queueing_config(tmp_path))
    try:
        agent.state_dir.mkdir(parents=True)
        (agent.state_dir / "agent.db").write_bytes(b"this is not SQLite " * 2000)
        agent.start()
        out = agent.ctl("status", "--json")
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        assert status["device_id"] == "pbx-test-1"
        wait_for(lambda: agent.status()["outbox"]["last_seq"] >= 1, what="a health envelope")
        audit = agent.ctl("audit", "--json")
        entries = [json.loads(line) for line in audit.stdout.splitlines()]
        assert entries[0]["kind"] == "reset" and entries[0]["n"] == 1
        assert "corrupt" in entries[0]["reason"]
        assert any(p.name.startswith("agent.db.corrupt-") for p in agent.state_dir.iterdir())
        events = agent.log_events()
        assert any(e.get("event") == "database_corrupt_moved_aside" for e in events)
        assert agent.proc is not None and agent.proc.poll() is None
        verify = agent.ctl("audit", "verify")
        assert verify.returncode == 66, verify.stdout  # intact since the reset, not before
        assert "chain intact since reset at entry 1" in verify.stdout
    finally:
        agent.close()


def test_stored_is_what_the_uplink_reads(box: Box) -> None:
    """pending() returns Stored records carrying exactly the approved bytes."""
    env = box.fill(1)[0]
    (item,) = box.outbox.pending(1)
    assert item == Stored(env.seq, env.id, "health", env.payload)
    assert json.loads(item.payload)["id"] == env.id


def test_streaming_delivery_commits_like_a_durable_one(box: Box) -> None:
    """The uplink's group commit (durable=False, then sync and synced) deletes, ledgers and
    counts exactly as a durable delivery, leaves the connection at synchronous=FULL for
    the next put, and moves the anchor only once the log is synced."""
    touches: list[bool] = []

    class Probe:
        def touch(self, *, force: bool = False) -> None:
            touches.append(force)

    box.outbox.anchor = Probe()  # type: ignore[assignment]
    envs = box.fill(6)
    touches.clear()
    items = box.outbox.pending(10)
    box.outbox.delivered(items[:4], durable=False)
    assert touches == []  # the head is not on disk yet
    assert box.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again
    box.outbox.sync()
    box.outbox.synced()
    assert touches == [False]
    box.outbox.delivered(items[4:])  # the durable path, after a streamed batch
    assert [e.data["seq"] for e in kinds(box.conn, "delivered")] == [1, 2, 3, 4, 5, 6]
    assert [e.data["sha256"] for e in kinds(box.conn, "delivered")] == [
        hashlib.sha256(e.payload).hexdigest() for e in envs
    ]
    assert box.outbox.stats()["delivered"] == 6 and box.outbox.count == 0
    assert ledger.verify(box.conn).ok
    other = sqlite3.connect(db_path(box.state))
    try:
        assert other.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
    finally:
        other.close()


def test_streaming_delivery_that_fails_restores_full_sync(box: Box) -> None:
    """A refused streamed commit rolls back whole and still restores synchronous=FULL."""
    box.fill(3)
    box.conn.execute(
        "CREATE TRIGGER fail_ledger BEFORE INSERT ON ledger "
        "WHEN json_extract(NEW.data, '$.seq') = 2 BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
    )
    with pytest.raises(StateError, match="cannot record delivery"):
        box.outbox.delivered(box.outbox.pending(10), durable=False)
    assert box.conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert box.outbox.count == 3 and kinds(box.conn, "delivered") == []
