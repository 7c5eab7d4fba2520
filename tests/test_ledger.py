"""The egress ledger: the chain verifies, each kind of tampering is caught where it happened.

The tampering is done the way a person with the file would do it: plain SQL on
the real database. ``agentctl audit`` runs as the customer runs it, in a
subprocess.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import ledger
from agent.ledger import GENESIS, Ledger, canonical, entry_hash
from agent.store import open_db
from tests.support.daemon import base_config

REPO = Path(__file__).resolve().parents[1]
EX_DATAERR = 65


def delivered(i: int, data_class: str = "health") -> dict[str, object]:
    """The data of a "delivered" entry."""
    return {"id": f"ID{i:04d}", "class": data_class, "seq": i, "size": 100 + i, "sha256": "ab" * 32}


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """A database whose ledger holds 6 entries of mixed kinds."""
    conn, _ = open_db(tmp_path / "state")
    lg = Ledger(conn)
    lg.record("delivered", delivered(1))
    lg.record("switch", {"state": "off", "uid": 0, "via": "daemon"})
    lg.record("delivered", delivered(2))
    lg.record("command", {"id": "c1", "cmd": "ping", "ok": True, "size": 40})
    lg.record("delivered", delivered(3, "config"))
    lg.record("dropped", {"count": 2, "bytes": 300, "first_seq": 4, "last_seq": 5})
    yield conn
    conn.close()


def test_chain_verifies(chain: sqlite3.Connection) -> None:
    """An untouched ledger verifies, counting every entry; each links to the one before."""
    verdict = ledger.verify(chain)
    assert verdict.ok and verdict.entries == 6 and verdict.broken_at is None
    entries = list(ledger.read(chain))
    assert entries[0].prev == GENESIS
    assert all(b.prev == a.hash for a, b in itertools.pairwise(entries))
    for e in entries:
        assert e.hash == entry_hash(e.prev, e.n, e.ts, e.kind, canonical(e.data))


def test_empty_ledger_verifies(tmp_path: Path) -> None:
    """A fresh database has an intact, empty chain."""
    conn, _ = open_db(tmp_path / "s")
    try:
        assert ledger.verify(conn) == ledger.Verdict(True, 0)
    finally:
        conn.close()


def test_edited_data_detected(chain: sqlite3.Connection) -> None:
    """Changing one entry's data breaks the chain at that entry (its hash no longer matches)."""
    data = json.loads(chain.execute("SELECT data FROM ledger WHERE n = 3").fetchone()[0])
    data["size"] = 1
    chain.execute("UPDATE ledger SET data = ? WHERE n = 3", (canonical(data),))
    verdict = ledger.verify(chain)
    assert not verdict.ok
    assert verdict.broken_at == 3 and verdict.entries == 2
    assert verdict.reason is not None and "edited" in verdict.reason


@pytest.mark.parametrize(("column", "value"), [("kind", "'switch'"), ("ts", "ts + 1")])
def test_edited_kind_or_time_detected(chain: sqlite3.Connection, column: str, value: str) -> None:
    """Changing an entry's kind or time is caught at that entry too."""
    chain.execute(f"UPDATE ledger SET {column} = {value} WHERE n = 4")
    assert ledger.verify(chain).broken_at == 4


def test_edit_with_recomputed_own_hash_detected_at_next(chain: sqlite3.Connection) -> None:
    """Re-hashing an edited entry moves the break to the next entry, whose link no longer fits."""
    n, ts, kind, prev = chain.execute("SELECT n, ts, kind, prev FROM ledger WHERE n = 2").fetchone()
    data = canonical({"state": "on", "uid": 0, "via": "daemon"})
    chain.execute(
        "UPDATE ledger SET data = ?, hash = ? WHERE n = 2",
        (data, entry_hash(prev, n, ts, kind, data)),
    )
    verdict = ledger.verify(chain)
    assert verdict.broken_at == 3
    assert verdict.reason is not None and "link" in verdict.reason


def test_deleted_middle_entry_detected(chain: sqlite3.Connection) -> None:
    """Deleting entry 4 is reported as entry 4 missing."""
    chain.execute("DELETE FROM ledger WHERE n = 4")
    verdict = ledger.verify(chain)
    assert not verdict.ok
    assert verdict.broken_at == 4 and verdict.entries == 3
    assert verdict.reason is not None and "missing" in verdict.reason


def test_deleted_first_entry_detected(chain: sqlite3.Connection) -> None:
    """Deleting entry 1 is reported at once: the chain starts at 2, earlier entries removed."""
    chain.execute("DELETE FROM ledger WHERE n = 1")
    verdict = ledger.verify(chain)
    assert not verdict.ok
    assert verdict.broken_at == 2 and verdict.entries == 0
    assert verdict.reason is not None and "removed" in verdict.reason


def test_deleted_and_renumbered_detected(chain: sqlite3.Connection) -> None:
    """Deleting entry 3 and renumbering the rest to hide the gap breaks the chain at 3."""
    chain.execute("DELETE FROM ledger WHERE n = 3")
    chain.execute("UPDATE ledger SET n = n - 1 WHERE n > 3")
    verdict = ledger.verify(chain)
    assert verdict.broken_at == 3


def test_reordered_entries_detected(chain: sqlite3.Connection) -> None:
    """Swapping entries 3 and 5 (everything but their numbers) breaks the chain at 3."""
    rows = {
        n: row
        for n, *row in chain.execute(
            "SELECT n, ts, kind, data, prev, hash FROM ledger WHERE n IN (3, 5)"
        )
    }
    for n, other in ((3, 5), (5, 3)):
        chain.execute(
            "UPDATE ledger SET ts = ?, kind = ?, data = ?, prev = ?, hash = ? WHERE n = ?",
            (*rows[other], n),
        )
    verdict = ledger.verify(chain)
    assert not verdict.ok
    assert verdict.broken_at == 3 and verdict.entries == 2


def test_append_after_reload_continues_chain(chain: sqlite3.Connection) -> None:
    """A new Ledger on the same database continues the chain from its head."""
    lg = Ledger(chain)
    entry = lg.record("reset", {"reason": "test"})
    assert entry.n == 7
    assert ledger.verify(chain).ok


def test_reset_entries_are_reported_by_verify(chain: sqlite3.Connection) -> None:
    """A chain holding a reset verifies, and the verdict says entries were lost and which."""
    lg = Ledger(chain)
    lg.record(
        "reset",
        {
            "reason": "agent.db was missing or empty",
            "lost": {
                "entries": 41,
                "last_seq": 77,
                "head_n": 41,
                "head_hash": "ab" * 32,
                "queued": 5,
                "db_id": "x",
            },
        },
    )
    verdict = ledger.verify(chain)
    assert verdict.ok and verdict.lost
    (reset,) = verdict.resets
    text = ledger.describe_reset(reset)
    assert "reset at entry 7: 41 earlier entries lost" in text
    assert "ab" * 32 in text and "last seq 77" in text and "5 envelopes were queued" in text
    assert not ledger.verify(chain).resets[0].data.get("salvaged")


# -- agentctl audit, as the customer runs it ----------------------------------------------


def write_config(root: Path) -> Path:
    """An agent.yaml whose state_dir is root/state; returns its path."""
    path = root / "agent.yaml"
    path.write_text(yaml.safe_dump(base_config(root)))
    return path


def agentctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m agent.cli -c CONFIG ARGS`` as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "-c", str(config), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=30,
        check=False,
    )


def test_audit_verify_cli_ok_then_tampered(chain: sqlite3.Connection, tmp_path: Path) -> None:
    """`agentctl audit verify` exits 0 on an intact chain, 65 naming the entry once tampered."""
    config = write_config(tmp_path)
    ok = agentctl(config, "audit", "verify")
    assert ok.returncode == 0, ok.stderr
    assert "6 entries" in ok.stdout and "intact" in ok.stdout
    chain.execute("UPDATE ledger SET data = replace(data, 'ping', 'narrow') WHERE n = 4")
    bad = agentctl(config, "audit", "verify")
    assert bad.returncode == EX_DATAERR, bad.stdout + bad.stderr
    assert "entry 4" in bad.stdout and "BROKEN" in bad.stdout
    as_json = agentctl(config, "audit", "verify", "--json")
    assert as_json.returncode == EX_DATAERR
    report = json.loads(as_json.stdout)
    assert report["ok"] is False and report["broken_at"] == 4 and report["entries"] == 3


def test_audit_filters_since_and_class(tmp_path: Path) -> None:
    """`agentctl audit --since 1h --class health --json` lists only recent health deliveries."""
    conn, _ = open_db(tmp_path / "state")
    try:
        lg = Ledger(conn)
        now = time.time()
        old, recent = now - 2 * 3600, now - 600
        for i, (ts, data_class) in enumerate(
            [(old, "health"), (old, "config"), (recent, "health"), (recent, "config")], start=1
        ):
            conn.execute("BEGIN IMMEDIATE")
            lg.append("delivered", delivered(i, data_class), ts=ts)
            conn.execute("COMMIT")
        lg.record("switch", {"state": "off", "uid": 0, "via": "daemon"})
        lg.record("delivered", delivered(5))
    finally:
        conn.close()
    config = write_config(tmp_path)
    out = agentctl(config, "audit", "--since", "1h", "--class", "health", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["seq"] for r in rows] == [3, 5]
    assert all(r["kind"] == "delivered" and r["class"] == "health" for r in rows)
    assert all(r["ts"] >= now - 3600 for r in rows)
    every = agentctl(config, "audit", "--json")
    assert len(every.stdout.splitlines()) == 6
    text = agentctl(config, "audit", "--since", "1h", "--class", "config")
    assert text.returncode == 0
    assert "ID0004" in text.stdout and "ID0002" not in text.stdout
    assert "-- 1 entries" in text.stdout


def test_a_rolled_back_transaction_rewinds_the_ledger_head(tmp_path: Path) -> None:
    """The one transaction path: entries appended in a transaction that does not commit leave
    the in-memory head where it was, and the next entry chains to the last one stored."""
    from agent.errors import StateError
    from agent.store import transaction

    conn, _ = open_db(tmp_path)
    lg = Ledger(conn)
    lg.record("switch", {"state": "off"})
    before = lg.head

    def append_then_fail() -> None:
        with transaction(conn, "test", follows=lg):
            lg.append("switch", {"state": "on"})
            raise RuntimeError("something after the append failed")

    def append_then_sqlite_error() -> None:
        with transaction(conn, "writing a bad row", follows=lg) as c:
            lg.append("switch", {"state": "on"})
            c.execute("INSERT INTO no_such_table VALUES (1)")  # sqlite3 error, translated

    with pytest.raises(RuntimeError):
        append_then_fail()
    assert lg.head == before
    with pytest.raises(StateError, match="writing a bad row: "):
        append_then_sqlite_error()
    assert lg.head == before
    lg.record("switch", {"state": "on"})
    verdict = ledger.verify(conn)
    assert verdict.ok and verdict.entries == 2
    conn.close()


_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["health", "config", "callstats", "01JD8ZQ4R7X-3f2a", ""]
)


@settings(max_examples=300, deadline=None)
@given(
    data_class=_TEXT,
    envelope_id=_TEXT,
    seq=st.integers(min_value=-(2**63), max_value=2**63),
    size=st.integers(min_value=0, max_value=2**40),
    sha256=_TEXT | st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
)
def test_delivered_text_is_the_canonical_json(
    data_class: str, envelope_id: str, seq: int, size: int, sha256: str
) -> None:
    """The delivery path's hand-spelt entry is canonical() byte for byte, escapes included,
    so the chain it feeds verifies and reads as before."""
    data = {"id": envelope_id, "class": data_class, "seq": seq, "size": size, "sha256": sha256}
    text = ledger.delivered_text(data_class, envelope_id, seq, size, sha256)
    assert text == canonical(data)
    assert json.loads(text) == data


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(_TEXT, _TEXT, st.integers(0, 2**40), st.integers(0, 2**20), _TEXT), max_size=8
    )
)
def test_delivered_texts_spell_each_row_canonically(
    rows: list[tuple[str, str, int, int, str]],
) -> None:
    """The batch form gives each row's canonical text, plain batches and escaped ones alike."""
    want = [
        canonical({"class": c, "id": i, "seq": s, "size": z, "sha256": h}) for c, i, s, z, h in rows
    ]
    assert ledger.delivered_texts(rows) == want


def test_batched_entries_verify_and_read_as_single_ones(tmp_path: Path) -> None:
    """append_texts (one timestamp, inlined hashing) chains exactly as append() does."""
    conn, _ = open_db(tmp_path)
    lg = Ledger(conn)
    lg.record("switch", {"state": "on"})
    datas = [delivered(i) for i in range(1, 6)]
    lg.append_texts("delivered", [canonical(d) for d in datas])
    lg.record("delivered", delivered(6))
    rows = conn.execute("SELECT n, ts, kind, data, prev, hash FROM ledger ORDER BY n").fetchall()
    for n, ts, kind, data, prev, digest in rows:
        assert digest == entry_hash(prev, n, ts, kind, data)
    assert [e.data for e in ledger.read(conn, kind="delivered")] == [*datas, delivered(6)]
    verdict = ledger.verify(conn)
    assert verdict.ok and verdict.entries == 7
    conn.close()
