"""`agentctl collect NAME --show`: the envelopes exactly as they would be sent, nothing advanced.

(``health --show`` against a real AMI server is in test_health_pbx.py.)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from agent import switch
from agent.cli import main
from agent.collectors.callstats.collector import CallstatsCollector
from agent.collectors.callstats.store import STATE_FILE
from agent.config import load
from agent.policy.classes import Record
from tests.fixtures.cdr.cdrgen import csv_bytes, make_calls

NOW = int(time.time())
T0 = NOW - 3 * 3600 - NOW % 300


def _digest(state: Path) -> str:
    # A logical dump: opening a WAL database, even read-only, may touch its -wal/-shm files.
    h = hashlib.sha256()
    conn = sqlite3.connect(f"file:{state / STATE_FILE}?mode=ro", uri=True)
    try:
        for stmt in conn.iterdump():
            h.update(stmt.encode())
    finally:
        conn.close()
    return h.hexdigest()


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """`collect --show` configures logging onto this test's captured stderr: undo it after."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def box(tmp_path: Path) -> Path:
    """A configuration with a small Asterisk tree and a CDR file; no daemon."""
    etc = tmp_path / "asterisk"
    etc.mkdir()
    (etc / "extensions.conf").write_text("[default]\nexten => 100,1,Answer()\n")
    (etc / "pjsip.conf").write_text("[t1]\ntype=auth\npassword=Sh0wMeN0t\n")
    (tmp_path / "Master.csv").write_bytes(csv_bytes(make_calls(120, start=T0, span=3 * 3600)))
    (tmp_path / "agent.yaml").write_text(
        "device_id: pbx-test\n"
        f"paths: {{state_dir: {tmp_path}/state, runtime_dir: {tmp_path}/run}}\n"
        "collectors:\n"
        f"  config: {{roots: [{etc}], exclude: []}}\n"
        f"  callstats: {{settle: 1h, source: {{csv: {tmp_path}/Master.csv}}}}\n"
    )
    return tmp_path


def _envelopes(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def test_config_show_prints_the_parts_redacted(
    box: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The snapshot's parts as config envelopes; the password masked; no state made."""
    assert main(["-c", str(box / "agent.yaml"), "collect", "config", "--show"]) == 0
    out = capsys.readouterr().out
    envs = _envelopes(out)
    assert envs and {e["class"] for e in envs} == {"config"}
    assert [e["seq"] for e in envs] == list(range(1, len(envs) + 1))
    assert envs[0]["body"]["schema"] == "pbx-config-snapshot/2"
    assert "Sh0wMeN0t" not in out
    assert not (box / "state").exists()  # nothing was made or advanced


def test_callstats_show_prints_pending_buckets_and_advances_nothing(
    box: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The buckets counted and not sent yet, as callstats envelopes; the state file untouched."""
    cfg = load(box / "agent.yaml")
    sent: list[dict[str, Any]] = []

    def emit(r: Record) -> bool:
        sent.append(dict(r.body))
        return True

    c = CallstatsCollector(cfg.collectors.callstats, cfg.paths.state_dir)
    asyncio.run(c.collect(emit, reason="schedule"))
    asyncio.run(c.aclose())
    before = _digest(box / "state")
    capsys.readouterr()
    assert main(["-c", str(box / "agent.yaml"), "collect", "callstats", "--show"]) == 0
    envs = _envelopes(capsys.readouterr().out)
    assert envs and {e["class"] for e in envs} == {"callstats"}
    assert main(["-c", str(box / "agent.yaml"), "callstats", "--json"]) == 0
    pending = [
        json.loads(line)["body"]
        for line in capsys.readouterr().out.splitlines()
        if json.loads(line)["status"] == "pending"
    ]
    assert [e["body"] for e in envs] == pending
    assert _digest(box / "state") == before


def test_show_with_the_switch_off_is_65(box: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Switch off: the bodies are printed, nothing is an envelope, and the exit says why."""
    switch.write_switch(box / "state", False, uid=0, via="test")
    assert main(["-c", str(box / "agent.yaml"), "collect", "config", "--show"]) == 65
    captured = capsys.readouterr()
    assert "switch-off" in captured.err
    body = json.loads(captured.out.splitlines()[0])
    assert body["schema"] == "pbx-config-snapshot/2" and "seq" not in body
