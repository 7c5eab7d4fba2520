"""The ledger's rules one by one, in process: the hash, the chain, what verify says, reset texts.

tests/test_ledger.py proves the ledger through the daemon and `agentctl audit`;
these pin each rule so that a changed separator, an off-by-one in the chain or
a reworded verdict fails a test (they were written to kill the mutants that
`make mutation` found surviving).
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import ledger
from agent.errors import StateError
from agent.ledger import GENESIS, Entry, Ledger, canonical, describe_reset, entry_hash, verify
from agent.store import open_db


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    c, _ = open_db(tmp_path / "state")
    yield c
    c.close()


def test_entry_hash_is_the_documented_formula() -> None:
    expected = hashlib.sha256(b"p\n3\n1.5\ndelivered\n{}").hexdigest()
    assert entry_hash("p", 3, 1.5, "delivered", "{}") == expected
    assert GENESIS == "0" * 64


def test_canonical_is_sorted_compact_ascii() -> None:
    assert canonical({"b": 1, "a": "é", "c": [1, {"z": 0, "y": None}]}) == (
        '{"a":"\\u00e9","b":1,"c":[1,{"y":null,"z":0}]}'
    )


def test_append_chains_and_stores_what_it_returns(conn: sqlite3.Connection) -> None:
    led = Ledger(conn)
    assert led.head == (0, GENESIS)
    first = led.append("switch", {"state": "off"}, ts=10.0)
    second = led.append("delivered", {"id": "x", "size": 3}, ts=11.0)
    assert first == Entry(
        1,
        10.0,
        "switch",
        {"state": "off"},
        GENESIS,
        entry_hash(GENESIS, 1, 10.0, "switch", '{"state":"off"}'),
    )
    assert second.n == 2 and second.prev == first.hash
    assert second.hash == entry_hash(first.hash, 2, 11.0, "delivered", '{"id":"x","size":3}')
    assert led.head == (2, second.hash)
    conn.commit()
    assert list(ledger.read(conn)) == [first, second]
    again = Ledger(conn)  # a new process continues the chain where it stopped
    assert again.head == (2, second.hash)
    assert again.append("switch", {}, ts=12.0).prev == second.hash


def test_append_takes_the_clock_when_no_time_is_given(
    conn: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agent.ledger.time.time", lambda: 1234.5)
    assert Ledger(conn).append("switch", {}).ts == 1234.5


def test_append_many_is_the_same_chain_as_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agent.ledger.time.time", lambda: 50.0)
    datas = [{"id": str(i), "size": i} for i in range(5)]
    one, _ = open_db(tmp_path / "one")
    many, _ = open_db(tmp_path / "many")
    try:
        a = Ledger(one)
        a.append("switch", {"state": "on"}, ts=50.0)
        for d in datas:
            a.append("delivered", d, ts=50.0)
        b = Ledger(many)
        b.append("switch", {"state": "on"}, ts=50.0)
        b.append_many("delivered", datas)
        one.commit()
        many.commit()
        assert a.head == b.head
        assert list(ledger.read(one)) == list(ledger.read(many))
        assert verify(many).ok and verify(many).entries == 6
        b.append("switch", {}, ts=51.0)  # the head moved past the batch
        many.commit()
        assert verify(many).ok and verify(many).entries == 7
    finally:
        one.close()
        many.close()


def test_record_commits_and_mark_rewind_restore_the_head(conn: sqlite3.Connection) -> None:
    led = Ledger(conn)
    entry = led.record("switch", {"state": "off"})
    assert conn.execute("SELECT COUNT(*) FROM ledger").fetchone() == (1,)
    mark = led.mark()
    assert mark == (1, entry.hash) == led.head
    conn.execute("BEGIN")
    led.append("switch", {"state": "on"})
    conn.execute("ROLLBACK")
    led.rewind(mark)
    assert led.head == mark
    assert led.record("switch", {"state": "on"}).prev == entry.hash
    assert verify(conn).ok and verify(conn).entries == 2


def test_record_that_cannot_be_stored_is_a_state_error_and_keeps_the_head(
    conn: sqlite3.Connection,
) -> None:
    led = Ledger(conn)
    led.record("switch", {"state": "off"})
    head = led.head
    conn.execute("DROP TABLE ledger")
    with pytest.raises(StateError, match="ledger: cannot record a delivered entry"):
        led.record("delivered", {"id": "y"})
    assert led.head == head


def _chain(conn: sqlite3.Connection, n: int) -> list[Entry]:
    led = Ledger(conn)
    out = [led.append("delivered", {"i": i, "class": "health"}, ts=float(i)) for i in range(n)]
    conn.commit()
    return out


def test_verify_an_empty_ledger(conn: sqlite3.Connection) -> None:
    v = verify(conn)
    assert v == ledger.Verdict(True, 0)
    assert v.head is None and v.lost is False


def test_verify_an_intact_chain(conn: sqlite3.Connection) -> None:
    entries = _chain(conn, 4)
    v = verify(conn)
    assert v.ok and v.entries == 4 and v.broken_at is None and v.reason is None
    assert v.head == entries[-1].hash and v.resets == () and v.lost is False


def test_verify_names_a_removed_first_entry(conn: sqlite3.Connection) -> None:
    _chain(conn, 3)
    conn.execute("DELETE FROM ledger WHERE n = 1")
    v = verify(conn)
    assert (v.ok, v.entries, v.broken_at) == (False, 0, 2)
    assert v.reason == "the ledger starts at entry 2, not 1: earlier entries were removed"


def test_verify_names_a_missing_entry(conn: sqlite3.Connection) -> None:
    _chain(conn, 4)
    conn.execute("DELETE FROM ledger WHERE n = 3")
    v = verify(conn)
    assert (v.ok, v.entries, v.broken_at, v.reason) == (False, 2, 3, "entry 3 is missing")


def test_verify_names_a_broken_link(conn: sqlite3.Connection) -> None:
    _chain(conn, 4)
    conn.execute("UPDATE ledger SET prev = ? WHERE n = 3", ("f" * 64,))
    v = verify(conn)
    assert (v.ok, v.entries, v.broken_at) == (False, 2, 3)
    assert v.reason == "its link does not match the previous entry's hash"


def test_verify_names_an_edited_entry(conn: sqlite3.Connection) -> None:
    _chain(conn, 4)
    conn.execute("""UPDATE ledger SET data = '{"class":"health","i":99}' WHERE n = 2""")
    v = verify(conn)
    assert (v.ok, v.entries, v.broken_at) == (False, 1, 2)
    assert v.reason == "its content does not match its hash (edited)"


def test_verify_reports_resets_as_lost_state(conn: sqlite3.Connection) -> None:
    led = Ledger(conn)
    led.append("delivered", {"i": 0}, ts=1.0)
    reset = led.append("reset", {"reason": "agent.db was empty", "lost": None}, ts=2.0)
    led.append("delivered", {"i": 1}, ts=3.0)
    conn.commit()
    v = verify(conn)
    assert v.ok and v.entries == 3 and v.lost is True
    assert v.resets == (reset,)


def test_read_filters_by_time_kind_and_class(conn: sqlite3.Connection) -> None:
    led = Ledger(conn)
    a = led.append("delivered", {"class": "health"}, ts=1.0)
    b = led.append("delivered", {"class": "config"}, ts=2.0)
    c = led.append("switch", {"state": "off"}, ts=3.0)
    d = led.append("dropped", {"class": "health"}, ts=4.0)
    conn.commit()
    assert list(ledger.read(conn)) == [a, b, c, d]
    assert list(ledger.read(conn, since=2.0)) == [b, c, d]  # inclusive
    assert list(ledger.read(conn, kind="delivered")) == [a, b]
    assert list(ledger.read(conn, data_class="health")) == [a, d]
    assert list(ledger.read(conn, since=1.5, kind="delivered", data_class="config")) == [b]
    assert list(ledger.read(conn, since=5.0)) == []


def _reset(data: dict[str, object], n: int = 7) -> Entry:
    return Entry(n, 0.0, "reset", data, GENESIS, GENESIS)


def test_reset_without_a_count_says_so() -> None:
    assert describe_reset(_reset({"reason": "agent.db deleted"})) == (
        "reset at entry 7: agent.db deleted; what was lost before it is not known"
    )
    assert describe_reset(_reset({}, n=1)) == (
        "reset at entry 1: no reason recorded; what was lost before it is not known"
    )


def test_reset_with_what_was_lost() -> None:
    lost = {"entries": 12, "head_n": 12, "head_hash": "ab12", "last_seq": 40, "queued": 3}
    assert describe_reset(_reset({"reason": "truncated", "lost": lost})) == (
        "reset at entry 7: 12 earlier entries lost (old head: entry 12, hash ab12; "
        "last seq 40; 3 envelopes were queued). Why: truncated"
    )


def test_reset_with_an_unknown_count_and_a_salvage() -> None:
    lost = {"head_n": 5, "head_hash": "cd", "last_seq": 9, "queued": 4}
    data = {"reason": "corrupt", "lost": lost, "salvaged": 3}
    assert describe_reset(_reset(data)) == (
        "reset at entry 7: an unknown number of earlier entries lost (old head: entry 5, "
        "hash cd; last seq 9; 4 envelopes were queued, 3 salvaged, 0 unreadable). Why: corrupt"
    )
    data["unreadable"] = 1
    assert describe_reset(_reset(data)).endswith(
        "4 envelopes were queued, 3 salvaged, 1 unreadable). Why: corrupt"
    )
