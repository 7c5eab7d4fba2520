"""What one message does to the NOC's database, message by message (real PostgreSQL, no broker).

The ingest workers call noc.store.handle inside their transaction; these tests
call it the same way, so that de-duplication, revisions, gaps and snapshot
reassembly are proven on the real database, in any arrival order.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import psycopg
import pytest

from agent.collectors.pbxconfig import parts
from agent.collectors.pbxconfig.collector import SnapshotCollector
from agent.collectors.pbxconfig.settings import SnapshotSettings
from agent.policy.classes import Record
from agent.policy.gate import new_id
from noc import store
from noc.store import Outcome, Rejected

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "pbx"
DEV = "pbx-store-1"


def envelope(data_class: str, seq: int, body: dict[str, Any], env_id: str | None = None) -> bytes:
    """An envelope as the gate makes it."""
    return json.dumps(
        {"v": 1, "id": env_id or new_id(), "ts": "2026-05-01T10:00:00.000Z",
         "class": data_class, "seq": seq, "body": body}
    ).encode()  # fmt: skip


def put(conn: psycopg.Connection[Any], data_class: str, payload: bytes, dev: str = DEV) -> Outcome:
    """Handle one message in its own transaction, as a worker would."""
    with conn.transaction():
        return store.handle(conn, f"pbx/{dev}/up/{data_class}", payload)


def one(conn: psycopg.Connection[Any], sql: str, *args: Any) -> Any:
    row = conn.execute(sql, args).fetchone()
    assert row is not None
    return row[0] if len(row) == 1 else row


def bucket(revision: int, calls: int, answered: int) -> dict[str, Any]:
    """A callstats/1 body for the 10:00 bucket."""
    return {
        "schema": "callstats/1", "bucket_start": "2026-05-01T10:00:00Z", "bucket_seconds": 300,
        "revision": revision, "min_count": 3, "folded": False, "calls": calls,
        "answered": answered, "duration_sum": 100 * calls, "billsec_sum": 80 * answered,
        "asr": round(answered / calls, 4), "acd": 80.0, "peak_concurrent": 4,
        "by_direction": {"inbound": calls}, "by_disposition": {"ANSWERED": answered},
        "by_trunk": {}, "by_hour": {"10": calls},
    }  # fmt: skip


def test_duplicate_envelope_changes_nothing(noc_dsn: str) -> None:
    """The same envelope twice: one row, the device's counter and health rows count it once."""
    payload = envelope("health", 1, {"cpu": {"percent": 5.0}, "load": [0.5, 0.4, 0.3]})
    with psycopg.connect(noc_dsn) as conn:
        assert put(conn, "health", payload) is Outcome.STORED
        assert put(conn, "health", payload) is Outcome.DUPLICATE
        assert one(conn, "SELECT envelopes FROM devices WHERE device_id = %s", DEV) == 1
        assert one(conn, "SELECT count(*) FROM health") == 1
        assert one(conn, "SELECT cpu_pct FROM devices WHERE device_id = %s", DEV) == 5.0


def test_callstats_revision_replaces_its_bucket(noc_dsn: str) -> None:
    """Revision 1 replaces revision 0 of a bucket; a late revision 0 changes nothing."""
    with psycopg.connect(noc_dsn) as conn:
        put(conn, "callstats", envelope("callstats", 1, bucket(0, calls=10, answered=6)))
        put(conn, "callstats", envelope("callstats", 2, bucket(1, calls=14, answered=9)))
        put(conn, "callstats", envelope("callstats", 3, bucket(0, calls=10, answered=6)))
        rows = conn.execute("SELECT revision, calls, answered FROM callstats").fetchall()
        assert rows == [(1, 14, 9)]
        total = one(conn, "SELECT sum(calls) FROM callstats WHERE device_id = %s", DEV)
        assert total == 14  # replaced, never added: 10 + 14 would be 24


def test_sequence_gaps_open_and_close(noc_dsn: str) -> None:
    """Seq 1, 2, 6 leaves 3..5 missing; late 4 splits the gap; 3 and 5 close it."""
    with psycopg.connect(noc_dsn) as conn:
        for seq in (1, 2, 6):
            put(conn, "health", envelope("health", seq, {}))
        assert one(conn, "SELECT missing FROM devices WHERE device_id = %s", DEV) == 3
        put(conn, "health", envelope("health", 4, {}))
        gaps = conn.execute("SELECT first_seq, last_seq FROM seq_gaps ORDER BY 1").fetchall()
        assert gaps == [(3, 3), (5, 5)]
        for seq in (3, 5):
            put(conn, "health", envelope("health", seq, {}))
        assert one(conn, "SELECT missing FROM devices WHERE device_id = %s", DEV) == 0
        assert one(conn, "SELECT count(*) FROM seq_gaps") == 0


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("pbx/x/up/health", b"\xff\xfe", "not JSON"),
        ("pbx/x/up/health", b"[1]", "not a JSON object"),
        ("pbx/x/up/health", b'{"v": 2}', "version"),
        ("pbx/x/up/health", b'{"v": 1, "id": "a", "seq": 0, "class": "health"}', "seq"),
        ("pbx/x/up/config", b'{"v":1,"id":"a","seq":1,"class":"health","body":{}}', "class"),
        ("pbx/x/status", b"sleepy", "status"),
        ("pbx/x/y/z/w", b"{}", "not a fleet topic"),
        ("pbx/../up/health", b"{}", "not a fleet topic"),
    ],
)
def test_hostile_messages_are_rejected_with_a_reason(
    noc_dsn: str, topic: str, payload: bytes, reason: str
) -> None:
    """A message that cannot be read raises Rejected naming why, and writes nothing."""
    with psycopg.connect(noc_dsn) as conn:
        with pytest.raises(Rejected, match=reason), conn.transaction():
            store.handle(conn, topic, payload)
        assert one(conn, "SELECT count(*) FROM envelopes") == 0


def _snapshot_bodies(base: Path, monkeypatch: pytest.MonkeyPatch) -> list[list[dict[str, Any]]]:
    """Two snapshots of the fixture PBX by the agent's own collector, split into small parts."""
    # Small parts, and files over 1 KiB in chunks: many parts of every kind.
    monkeypatch.setattr(parts, "MAX_BODY", 16384)
    monkeypatch.setattr(parts, "GROUP_MAX_RAW", 1024)
    shutil.copytree(FIXTURES, base, dirs_exist_ok=True, symlinks=True)
    etc = base / "etc" / "asterisk"
    settings = SnapshotSettings(roots=(etc,), exclude=())
    collector = SnapshotCollector(
        settings, base / "state", forbidden=[base / "var" / "spool" / "asterisk"]
    )
    runs: list[list[dict[str, Any]]] = []

    def emit(record: Record) -> bool:
        runs[-1].append(json.loads(json.dumps(record.body)))
        return True

    runs.append([])
    asyncio.run(collector.collect(emit, reason="schedule"))
    conf = etc / "extensions_custom.conf"
    conf.write_text(conf.read_text() + "\n[added-by-test]\nexten => 42,1,Hangup()\n")
    runs.append([])
    asyncio.run(collector.collect(emit, reason="schedule"))
    return runs


def test_snapshot_parts_reassembled_in_any_order(
    noc_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts arriving last-first are assembled once all are in; the delta is a redacted diff."""
    full, delta = _snapshot_bodies(tmp_path, monkeypatch)
    assert len(full) >= 3, "the collector should have split the snapshot into several parts"
    seq = 0
    with psycopg.connect(noc_dsn) as conn:
        for body in reversed(full):
            seq += 1
            snap = body["snapshot"]
            assert one(conn, "SELECT count(*) FROM config_files") == 0  # not before the last
            put(conn, "config", envelope("config", seq, body))
        assert one(
            conn, "SELECT complete_at IS NOT NULL FROM snapshots WHERE snapshot_id = %s", snap
        )
        sent = parts.reassemble(full).texts  # the agent's reference receiver
        assert any("chunk" in b for b in full), "a file should have travelled in chunks"
        stored: dict[str, str] = dict(
            conn.execute(
                "SELECT path, content FROM config_files WHERE content IS NOT NULL"
            ).fetchall()
        )
        assert stored == sent
        assert one(conn, "SELECT count(*) FROM snapshot_parts") == 0
        summary = one(conn, "SELECT summary FROM snapshots WHERE snapshot_id = %s", snap)
        assert "noc_problems" not in summary  # every digest and the manifest digest verified
        for body in delta:
            seq += 1
            put(conn, "config", envelope("config", seq, body))
        diffs = conn.execute(
            "SELECT path, change, diff FROM config_diffs WHERE snapshot_id = %s",
            (delta[0]["snapshot"],),
        ).fetchall()
        assert [(p.rsplit("/", 1)[-1], c) for p, c, _ in diffs] == [
            ("extensions_custom.conf", "changed")
        ]
        assert "+[added-by-test]" in diffs[0][2]
        history = one(conn, "SELECT count(*) FROM snapshots WHERE complete_at IS NOT NULL")
        assert history == 2


def test_asterisk_state_is_true_false_or_unknown(noc_dsn: str) -> None:
    """running true/false is kept; running null (AMI not configured, no process check) stays
    unknown rather than becoming "down" and raising a false alert."""
    with psycopg.connect(noc_dsn) as conn:
        for n, (dev, running) in enumerate((("a", True), ("b", False), ("c", None))):
            body = {"pbx": {"asterisk": {"running": running}}}
            put(conn, "health", envelope("health", n + 1, body), dev=dev)
        states: dict[str, bool | None] = dict(
            conn.execute("SELECT device_id, asterisk_up FROM devices").fetchall()
        )
    assert states == {"a": True, "b": False, "c": None}


def test_retention_prunes_only_what_is_older(noc_dsn: str) -> None:
    """Rows older than their retention go; newer rows, devices and open alerts stay."""
    from noc import retention
    from noc.config import RetentionSettings

    with psycopg.connect(noc_dsn) as conn:
        for seq in (1, 2):
            put(conn, "health", envelope("health", seq, {"cpu": {"percent": 1.0}}))
        put(conn, "callstats", envelope("callstats", 3, bucket(0, calls=10, answered=6)))
        with conn.transaction():
            for seq, age in ((1, "40 days"), (2, "1 day")):
                conn.execute(
                    "UPDATE health SET ts = now() - %s::interval WHERE envelope_id ="
                    " (SELECT id FROM envelopes WHERE seq = %s)",
                    (age, seq),
                )
            conn.execute("UPDATE callstats SET bucket_start = now() - interval '10 days'")
            conn.execute(
                "UPDATE envelopes SET received_at = now() - interval '40 days' WHERE seq = 1"
            )
            conn.execute(
                "INSERT INTO alerts (device_id, rule, severity, detail, opened_at)"
                " VALUES (%s, 'disk', 'warning', 'old but open', now() - interval '1 year')",
                (DEV,),
            )
        counts = retention.prune(conn, RetentionSettings())
        assert counts["health"] == 1 and counts["envelopes"] == 1
        assert counts["callstats"] == 0  # a bucket is kept 400 days
        assert one(conn, "SELECT count(*) FROM health") == 1
        assert one(conn, "SELECT count(*) FROM devices") == 1
        assert one(conn, "SELECT count(*) FROM alerts WHERE resolved_at IS NULL") == 1
