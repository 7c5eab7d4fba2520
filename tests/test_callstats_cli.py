"""``agentctl callstats``: the customer sees exactly what is (or would be) sent, read-only."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.cli.common import UsageError, parse_since
from agent.collectors.callstats.collector import CallstatsCollector
from agent.collectors.callstats.store import STATE_FILE
from agent.config import load
from agent.policy.classes import Record
from tests.fixtures.cdr.cdrgen import csv_bytes, make_calls

NOW = int(time.time())
T0 = NOW - 5 * 3600 - NOW % 300


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        "device_id: pbx-test\n"
        f"paths: {{state_dir: {tmp_path / 'state'}, runtime_dir: {tmp_path / 'run'}}}\n"
        "collectors:\n"
        "  callstats:\n"
        "    bucket: 5m\n"
        "    min_count: 3\n"
        f"    source: {{csv: {tmp_path / 'Master.csv'}}}\n"
    )
    return cfg


def _digest(state: Path) -> str:
    # A logical dump: opening a WAL database, even read-only, may create empty -wal/-shm files.
    h = hashlib.sha256()
    conn = sqlite3.connect(f"file:{state / STATE_FILE}?mode=ro", uri=True)
    try:
        for stmt in conn.iterdump():
            h.update(stmt.encode())
    finally:
        conn.close()
    return h.hexdigest()


def test_shows_exactly_the_sent_bodies_and_pending_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json prints the bodies offered to the gate, plus open buckets as they would be sent."""
    calls = make_calls(500, start=T0, span=5 * 3600, seed=31)
    (tmp_path / "Master.csv").write_bytes(csv_bytes(calls))
    cfg_path = _config(tmp_path)
    cfg = load(cfg_path)
    sent: list[dict[str, Any]] = []

    def emit(r: Record) -> bool:
        sent.append(json.loads(json.dumps(r.body)))
        return True

    c = CallstatsCollector(cfg.collectors.callstats, cfg.paths.state_dir)
    asyncio.run(c.collect(emit, reason="schedule"))
    asyncio.run(c.aclose())
    before = _digest(cfg.paths.state_dir)
    capsys.readouterr()  # drop the collector's own log lines
    assert main(["-c", str(cfg_path), "callstats", "--since", "1d", "--json"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["body"] for o in out if o["status"] == "sent"] == sent
    assert all(o["status"] in ("sent", "pending") for o in out)
    assert any(o["status"] == "pending" for o in out)  # the last buckets are still settling
    assert main(["-c", str(cfg_path), "callstats", "--since", "1d"]) == 0
    table = capsys.readouterr().out
    assert "█" in table and "pending" in table and "sent" in table
    biggest = max(b["calls"] for b in sent if not b["folded"])
    assert f" {biggest} " in table
    assert _digest(cfg.paths.state_dir) == before  # read-only: nothing advanced


def test_no_state_yet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before the collector ever ran, the command says so instead of failing."""
    cfg_path = _config(tmp_path)
    assert main(["-c", str(cfg_path), "callstats"]) == 0
    assert "No call statistics" in capsys.readouterr().out


def test_since_accepts_durations_and_iso_times() -> None:
    """--since takes 2h or an ISO time; anything else is a usage error with the value."""
    assert parse_since("2h", 10_000.0) == 10_000.0 - 7200
    assert parse_since("2026-05-01T10:00:00+00:00", 0) == 1_777_629_600
    with pytest.raises(UsageError, match="yesterday"):
        parse_since("yesterday", 0)
