"""The outbox's accounting rules one by one: refused records, the size bound, salvage, counters.

tests/test_outbox.py proves order, atomic delivery and durability; these pin
the counts and events an operator reads (status, health, the ledger, logs), so
that an off-by-one or a lost count fails (written to kill the mutants that
`make mutation` found surviving). A full disk is made real with a SQLite
trigger that refuses the insert.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent import ledger
from agent.errors import StateError
from agent.outbox import Outbox
from agent.salvage import Row
from tests.test_outbox import Box

REFUSE = "CREATE TRIGGER refuse BEFORE INSERT ON outbox BEGIN SELECT RAISE(ABORT, 'disk full'); END"


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    b = Box(tmp_path / "state")
    yield b
    b.close()


class Anchor:
    """Counts touches, as agent.anchor.Anchor would write them."""

    def __init__(self) -> None:
        self.touches: list[bool] = []

    def touch(self, *, force: bool = False) -> None:
        self.touches.append(force)


def test_a_fresh_outbox_counts_nothing(box: Box) -> None:
    assert box.outbox.stats() == {
        "queued": 0,
        "bytes": 0,
        "max_bytes": 1 << 20,
        "dropped": 0,
        "unstored": 0,
        "store_error": None,
        "delivered": 0,
        "last_seq": 0,
    }
    assert box.outbox.unstored_now == 0


def test_only_gate_envelopes_are_accepted(box: Box) -> None:
    with pytest.raises(TypeError, match="only envelopes approved by the policy gate"):
        box.outbox.put(object())  # type: ignore[arg-type]


def test_refused_records_are_counted_then_ledgered_once_storing_works_again(
    box: Box, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agent.outbox.time.time", lambda: 777.0)
    box.fill(2)
    box.conn.execute(REFUSE)
    with capture_logs() as refused_logs:
        for i in range(3):
            env = box.approve(10 + i)
            with pytest.raises(StateError, match="disk full"):
                box.outbox.put(env)
    # One error event per episode, not one per record.
    errors = [e for e in refused_logs if e["event"] == "outbox_cannot_store"]
    assert len(errors) == 1
    assert errors[0]["log_level"] == "error"
    assert errors[0]["data_class"] == "health"
    assert "disk full" in errors[0]["error"]
    assert errors[0]["note"] == (
        "records are dropped (and counted) until the store is writable again"
    )
    stats = box.outbox.stats()
    assert stats["unstored"] == 3 and box.outbox.unstored_now == 3
    assert stats["store_error"] is not None and "disk full" in stats["store_error"]
    assert stats["queued"] == 2 and stats["last_seq"] == 2
    assert ledger.verify(box.conn).entries == 0  # nothing ledgered while refused

    box.conn.execute("DROP TRIGGER refuse")
    with capture_logs() as again_logs:
        box.outbox.put(box.approve(20))
    storing = [e for e in again_logs if e["event"] == "outbox_storing_again"]
    assert storing == [{"event": "outbox_storing_again", "unstored": 3, "log_level": "warning"}]
    stats = box.outbox.stats()
    assert stats["unstored"] == 3 and box.outbox.unstored_now == 0
    assert stats["store_error"] is None and stats["queued"] == 3
    (dropped,) = list(ledger.read(box.conn, kind="dropped"))
    assert dropped.data["count"] == 3
    assert dropped.data["since"] == 777.0
    reason = dropped.data["reason"]
    assert reason.startswith("not stored: ") and "disk full" in reason
    assert box.conn.execute("SELECT value FROM meta WHERE key = 'unstored'").fetchone() == (3,)

    # A second episode adds to the first, and starts its own error event.
    box.conn.execute(REFUSE)
    with capture_logs() as second, pytest.raises(StateError):
        box.outbox.put(box.approve(30))
    assert [e["event"] for e in second].count("outbox_cannot_store") == 1
    box.conn.execute("DROP TRIGGER refuse")
    box.outbox.put(box.approve(31))
    assert box.outbox.stats()["unstored"] == 4
    assert box.conn.execute("SELECT value FROM meta WHERE key = 'unstored'").fetchone() == (4,)
    assert ledger.verify(box.conn).ok


def test_unstored_count_survives_a_restart(tmp_path: Path) -> None:
    b = Box(tmp_path / "state")
    b.conn.execute(REFUSE)
    with pytest.raises(StateError):
        b.outbox.put(b.approve(1))
    b.conn.execute("DROP TRIGGER refuse")
    b.outbox.put(b.approve(2))
    b.close()
    again = Box(tmp_path / "state")
    try:
        assert again.outbox.unstored == 1 and again.outbox.stats()["unstored"] == 1
        assert again.outbox.unstored_now == 0
    finally:
        again.close()


def test_the_bound_drops_exactly_enough_and_says_so(tmp_path: Path) -> None:
    b = Box(tmp_path / "state", max_bytes=3_100)
    try:
        envs = b.fill(3, size=900)
        sizes = [len(e.payload) for e in envs]
        assert sum(sizes) <= 3_100
        assert b.outbox.dropped == 0 and list(ledger.read(b.conn, kind="dropped")) == []
        with capture_logs() as logs:
            b.outbox.put(b.approve(3, size=900))
        (event,) = [e for e in logs if e["event"] == "outbox_full_dropped_oldest"]
        assert event == {
            "event": "outbox_full_dropped_oldest",
            "dropped": 1,
            "total": 1,
            "max_bytes": 3_100,
            "log_level": "warning",
        }
        (entry,) = list(ledger.read(b.conn, kind="dropped"))
        assert entry.data == {
            "count": 1,
            "bytes": sizes[0],
            "first_seq": 1,
            "last_seq": 1,
            "reason": "outbox full",
        }
        stats = b.outbox.stats()
        assert stats["queued"] == 3 and stats["dropped"] == 1
        stored = b.conn.execute("SELECT COUNT(*), SUM(LENGTH(payload)) FROM outbox").fetchone()
        assert (stats["queued"], stats["bytes"]) == stored
        assert b.conn.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone() == (1,)
        # An envelope exactly at the bound is kept whole.
        exact = Box(tmp_path / "exact", max_bytes=sum(sizes))
        try:
            for env in envs:
                exact.outbox.put(env)
            assert exact.outbox.dropped == 0 and exact.outbox.count == 3
        finally:
            exact.close()
    finally:
        b.close()


def test_one_put_can_drop_several(tmp_path: Path) -> None:
    b = Box(tmp_path / "state", max_bytes=5_000)
    try:
        b.fill(4, size=900)
        with capture_logs() as logs:
            b.outbox.put(b.approve(9, size=3_500))
        (event,) = [e for e in logs if e["event"] == "outbox_full_dropped_oldest"]
        assert event["dropped"] == 3 and event["total"] == 3
        (entry,) = list(ledger.read(b.conn, kind="dropped"))
        assert (entry.data["count"], entry.data["first_seq"], entry.data["last_seq"]) == (3, 1, 3)
        assert [p.seq for p in b.outbox.pending(10)] == [4, 5]
        assert b.outbox.count == 2
    finally:
        b.close()


def test_anchor_is_forced_on_put_and_paced_on_delivery(box: Box) -> None:
    anchor = Anchor()
    box.outbox.anchor = anchor  # type: ignore[assignment]
    box.fill(2)
    assert anchor.touches == [True, True]
    box.outbox.delivered(box.outbox.pending(2))
    assert anchor.touches == [True, True, False]
    box.outbox.delivered([])  # nothing acknowledged: nothing to anchor
    assert anchor.touches == [True, True, False]


def test_listeners_hear_each_put(box: Box) -> None:
    heard: list[int] = []
    box.outbox.listeners.append(lambda: heard.append(box.outbox.count))
    box.fill(3)
    assert heard == [1, 2, 3]


def test_delivered_counts_and_ledger_bodies(box: Box) -> None:
    envs = box.fill(3)
    box.outbox.delivered(box.outbox.pending(2))
    stats = box.outbox.stats()
    assert stats["delivered"] == 2 and stats["queued"] == 1
    assert stats["bytes"] == len(envs[2].payload)
    assert box.conn.execute("SELECT value FROM meta WHERE key = 'delivered'").fetchone() == (2,)
    box.outbox.delivered(box.outbox.pending(5))
    assert box.outbox.stats()["delivered"] == 3 and box.outbox.stats()["bytes"] == 0
    assert box.conn.execute("SELECT value FROM meta WHERE key = 'delivered'").fetchone() == (3,)


def test_pending_pages_after_a_seq(box: Box) -> None:
    box.fill(5)
    assert [p.seq for p in box.outbox.pending(2, after_seq=2)] == [3, 4]
    assert [p.seq for p in box.outbox.pending(10, after_seq=4)] == [5]
    assert box.outbox.pending(10, after_seq=5) == []
    assert [p.seq for p in box.outbox.pending(1)] == [1]


def _row(seq: int, payload: bytes = b'{"x":1}') -> Row:
    return Row(
        seq=seq, id=f"id-{seq}", data_class="health", ts="2026-01-01T00:00:00Z", payload=payload
    )


def test_restore_queues_salvaged_rows_verbatim(box: Box) -> None:
    box.fill(2)
    rows = [_row(40, b"a" * 10), _row(41, b"b" * 20), _row(2, b"dup")]  # seq 2 is already there
    box.outbox.restore(rows)
    assert box.outbox.last_seq == 41
    assert box.conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone() == (41,)
    stored = box.conn.execute("SELECT COUNT(*), SUM(LENGTH(payload)) FROM outbox").fetchone()
    assert (box.outbox.count, box.outbox.bytes) == stored
    assert box.outbox.count == 4
    back = {p.seq: p for p in box.outbox.pending(10)}
    assert back[40].payload == b"a" * 10 and back[40].id == "id-40"
    assert back[41].data_class == "health"
    assert back[2].payload != b"dup"  # the row already queued was kept, not replaced
    assert box.approve(0).seq == 3  # the gate's own counter is the caller's business
    box.outbox.restore([])
    assert box.outbox.last_seq == 41 and box.outbox.count == 4


def test_restore_never_lowers_last_seq(box: Box) -> None:
    box.fill(5)
    box.outbox.restore([_row(1)])  # already there: ignored
    assert box.outbox.last_seq == 5
    box.outbox.delivered(box.outbox.pending(10))
    box.outbox.restore([_row(3)])
    assert box.outbox.last_seq == 5
    assert box.conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone() == (5,)


def test_last_seq_is_the_highest_of_rows_meta_and_anchor(tmp_path: Path) -> None:
    b = Box(tmp_path / "state")
    b.fill(3)
    b.outbox.delivered(b.outbox.pending(1))
    conn, ledger_ = b.conn, b.ledger
    assert Outbox(conn, ledger_, max_bytes=1).last_seq == 3
    assert Outbox(conn, ledger_, max_bytes=1, floor_seq=9).last_seq == 9
    conn.execute("UPDATE meta SET value = 2 WHERE key = 'last_seq'")
    assert Outbox(conn, ledger_, max_bytes=1).last_seq == 3  # the rows still say 3
    conn.execute("DELETE FROM meta WHERE key = 'last_seq'")
    again = Outbox(conn, ledger_, max_bytes=1)
    assert again.last_seq == 3
    assert (again.count, again.bytes) == conn.execute(
        "SELECT COUNT(*), SUM(LENGTH(payload)) FROM outbox"
    ).fetchone()
    b.close()


def test_counters_are_read_from_meta(tmp_path: Path) -> None:
    b = Box(tmp_path / "state")
    conn: sqlite3.Connection = b.conn
    for key, value in (("dropped", 5), ("delivered", 6), ("unstored", 7)):
        conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
    o = Outbox(conn, b.ledger, max_bytes=100)
    stats = o.stats()
    assert (stats["dropped"], stats["delivered"], stats["unstored"]) == (5, 6, 7)
    assert stats["max_bytes"] == 100
    b.close()


def test_a_failed_delivery_leaves_the_ledger_head_where_it_was(box: Box) -> None:
    box.fill(3)
    head = box.ledger.head
    box.conn.execute(
        "CREATE TRIGGER no_count BEFORE INSERT ON meta WHEN NEW.key = 'delivered'"
        " BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    )
    with pytest.raises(StateError, match="outbox: cannot record delivery"):
        box.outbox.delivered(box.outbox.pending(3))
    assert box.ledger.head == head  # the entries rolled back with the transaction
    box.conn.execute("DROP TRIGGER no_count")
    box.outbox.delivered(box.outbox.pending(3))
    assert ledger.verify(box.conn).ok and box.outbox.count == 0


def test_a_failed_put_leaves_the_ledger_head_where_it_was(tmp_path: Path) -> None:
    b = Box(tmp_path / "state", max_bytes=2_500)
    try:
        b.fill(2, size=900)
        b.conn.execute(REFUSE)
        with pytest.raises(StateError):
            b.outbox.put(b.approve(5, size=900))
        b.conn.execute("DROP TRIGGER refuse")
        head = b.ledger.head
        # This put drops the oldest (a ledger entry) and then fails to count the refused one.
        b.conn.execute(
            "CREATE TRIGGER no_unstored BEFORE INSERT ON meta WHEN NEW.key = 'unstored'"
            " BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
        with pytest.raises(StateError, match="outbox: cannot store envelope"):
            b.outbox.put(b.approve(6, size=900))
        assert b.ledger.head == head
        b.conn.execute("DROP TRIGGER no_unstored")
        b.outbox.put(b.approve(7, size=900))
        assert ledger.verify(b.conn).ok
    finally:
        b.close()


def test_delivery_of_more_than_a_statement_can_bind(box: Box) -> None:
    box.fill(1_203, size=10)
    box.outbox.delivered(box.outbox.pending(2_000))
    assert box.outbox.count == 0 and box.outbox.stats()["delivered"] == 1_203
    assert box.conn.execute("SELECT COUNT(*) FROM outbox").fetchone() == (0,)
    assert len(list(ledger.read(box.conn, kind="delivered"))) == 1_203


def test_sync_fsyncs_the_write_ahead_log(box: Box, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl
    import os

    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        cloexec = bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), cloexec))
        real_fsync(fd)

    box.fill(2)
    box.outbox.delivered(box.outbox.pending(2), durable=False)
    monkeypatch.setattr("agent.outbox.os.fsync", fsync)
    box.outbox.sync()
    wal = str(box.state / "agent.db") + "-wal"
    assert synced == [(wal, True)]


def test_sync_failures_name_the_log(box: Box, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    box.fill(1)
    wal = str(box.state / "agent.db") + "-wal"

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("agent.outbox.os.fsync", eio)
    with pytest.raises(StateError) as info:
        box.outbox.sync()
    assert str(info.value) == f"outbox: cannot sync {wal}: Input/output error"

    def eacces(path: str, flags: int) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("agent.outbox.os.open", eacces)
    with pytest.raises(StateError) as opened:
        box.outbox.sync()
    assert str(opened.value) == f"outbox: cannot open {wal} to sync it: Permission denied"
