"""Local-only mode says so: with no uplink configured nothing is queued, and nothing says "sent".

The gate approves nothing (no envelope, no seq, no outbox row, no ledger entry);
the call statistics keep their buckets as ``local``; the configuration
snapshot logs "kept locally"; ``agentctl callstats`` and ``status`` say that
nothing leaves the box. (The daemon's side is in test_daemon.py's first test.)
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.cli import main
from agent.cli.cmd_status import print_status
from agent.collectors.callstats.collector import CallstatsCollector
from agent.collectors.callstats.store import STATE_FILE, BucketStatus, CallstatsStore
from agent.collectors.pbxconfig.collector import SnapshotCollector
from agent.collectors.pbxconfig.settings import SnapshotSettings
from agent.config import load
from agent.errors import PolicyRefused
from agent.policy.classes import DataClass, Record
from agent.policy.gate import Gate
from agent.policy.settings import PolicyConfig
from tests.fixtures.cdr.cdrgen import csv_bytes, make_calls

NOW = int(time.time())
T0 = NOW - 5 * 3600 - NOW % 300


def test_gate_approves_nothing_without_an_uplink() -> None:
    """No envelope and no seq: the refusal says the record is kept locally."""
    gate = Gate(policy=PolicyConfig(), switch_on=lambda: True, last_seq=41, local_only=True)
    with pytest.raises(PolicyRefused, match=r"kept locally \(no uplink configured\)"):
        gate.approve(Record(DataClass.HEALTH, {"cpu": 1}))
    stats = gate.stats()
    assert stats["last_seq"] == 41 and stats["approved"] == {}
    assert stats["refused"] == {"health:no-uplink": 1} and stats["local_only"] is True
    gate.local_only = False  # a reload that adds an uplink
    assert gate.approve(Record(DataClass.HEALTH, {"cpu": 1})).seq == 42


def _callstats_config(tmp_path: Path, uplink: bool) -> Path:
    cfg = tmp_path / "agent.yaml"
    text = (
        "device_id: pbx-test\n"
        f"paths: {{state_dir: {tmp_path / 'state'}, runtime_dir: {tmp_path / 'run'}}}\n"
        "collectors:\n"
        "  callstats:\n"
        f"    source: {{csv: {tmp_path / 'Master.csv'}}}\n"
    )
    if uplink:
        text += (
            "uplink:\n  broker: mqtts://127.0.0.1:9\n"
            f"  ca_file: {tmp_path}/ca.pem\n  cert_file: {tmp_path}/c.pem\n"
            f"  key_file: {tmp_path}/k.pem\n"
        )
    cfg.write_text(text)
    return cfg


def test_callstats_buckets_are_local_not_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Closed buckets are stored as `local`, the table says so, and none is offered again."""
    (tmp_path / "Master.csv").write_bytes(csv_bytes(make_calls(200, start=T0, span=4 * 3600)))
    cfg_path = _callstats_config(tmp_path, uplink=False)
    cfg = load(cfg_path)
    offered: list[Record] = []

    def gate_without_uplink(r: Record) -> bool:
        offered.append(r)
        return False

    c = CallstatsCollector(cfg.collectors.callstats, cfg.paths.state_dir, local_only=True)
    asyncio.run(c.collect(gate_without_uplink, reason="schedule"))
    asyncio.run(c.collect(gate_without_uplink, reason="schedule"))  # nothing offered twice
    asyncio.run(c.aclose())
    assert offered
    store = CallstatsStore(cfg.paths.state_dir / STATE_FILE, readonly=True)
    statuses = [r.status for r in store.since(0)]
    store.close()
    assert BucketStatus.SENT not in statuses and BucketStatus.REFUSED not in statuses
    assert statuses.count(BucketStatus.LOCAL) == len(offered)  # each offered once, kept
    capsys.readouterr()
    assert main(["-c", str(cfg_path), "callstats", "--since", "1d"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("No uplink configured (local only): nothing leaves this box")
    assert " local " in out and " sent " not in out
    assert main(["-c", str(cfg_path), "callstats", "--since", "1d", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["status"] for r in rows} <= {"local", "pending"}


def test_old_state_file_learns_the_local_status(tmp_path: Path) -> None:
    """A state file made before `local` existed is rebuilt to allow it, rows kept."""
    state = tmp_path / STATE_FILE
    db = sqlite3.connect(state)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE buckets (start INTEGER PRIMARY KEY, state TEXT NOT NULL, status TEXT "
        "NOT NULL CHECK (status IN ('open', 'sent', 'revise', 'refused')), revision INTEGER "
        "NOT NULL DEFAULT -1, body TEXT, offered_at REAL);"
        "INSERT INTO meta VALUES ('state_format', '2');"
    )
    db.close()
    store = CallstatsStore(state)
    with store.transaction() as conn:
        conn.execute("INSERT INTO buckets (start, state, status) VALUES (300, X'00', 'local')")
    store.close()
    db = sqlite3.connect(state)
    assert db.execute("SELECT status FROM buckets").fetchall() == [("local",)]
    db.close()


def test_config_snapshot_is_kept_locally_not_sent(tmp_path: Path) -> None:
    """The snapshot collector logs `config_snapshot_kept_locally`, never `..._sent`."""
    etc = tmp_path / "asterisk"
    etc.mkdir()
    (etc / "extensions.conf").write_text("[default]\nexten => 100,1,Answer()\n")
    c = SnapshotCollector(
        SnapshotSettings(roots=(etc,), exclude=()), tmp_path / "state", local_only=True
    )
    with capture_logs() as logs:
        asyncio.run(c.collect(lambda r: False, reason="schedule"))
    asyncio.run(c.aclose())
    events = [e["event"] for e in logs]
    assert "config_snapshot_kept_locally" in events
    assert not any(e.endswith("_sent") or e.endswith("_refused") for e in events)
    assert c.status()["last_sent_at"] is None


def test_status_explains_that_nothing_leaves(capsys: pytest.CaptureFixture[str]) -> None:
    """`agentctl status` on a local-only daemon: what is kept, and that nothing leaves."""
    status = {
        "versions": {"pbx-agent": "0"},
        "device_id": "pbx-test",
        "daemon": {"pid": 1, "uptime": 5},
        "switch": {"state": "on", "changed_at": None},
        "uplink": {"configured": False, "local_only": True},
        "outbox": {"queued": 0, "bytes": 0, "max_bytes": 1, "delivered": 0, "dropped": 0},
        "policy": {"effective": ["health"]},
        "collectors": {
            "health": {"interval": 60, "last_ok": time.time(), "records": 0, "refused": 4}
        },
        "components": {},
    }
    print_status(status)
    out = capsys.readouterr().out
    assert "uplink: not configured (local only): nothing leaves this box" in out
    assert "4 kept locally (no uplink)" in out and "sent to outbox" not in out
