"""journald natively: a priority per event and the event's fields, read from a real socket.

The daemon is started as systemd starts it: stderr is the "journal stream"
named by ``$JOURNAL_STREAM`` (device:inode of the file its stderr is), so the
automatic choice is exercised, not forced. ``$PBX_AGENT_JOURNAL_SOCKET`` points
the native protocol at a datagram socket this test binds, and every entry is
parsed as journald parses it (``KEY=value`` lines, or ``KEY``, a 64-bit
little-endian length and binary-safe data).
"""

from __future__ import annotations

import io
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from agent import journal, logs
from tests.support.daemon import AgentProcess, queueing_config

CANARY = "Pw-JOURNAL-5c1e"


def parse(datagram: bytes) -> dict[str, str]:
    """One native-protocol datagram as journald reads it."""
    out: dict[str, str] = {}
    i = 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        line = datagram[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            out[key.decode()] = value.decode()
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", datagram[nl + 1 : nl + 9])
            out[line.decode()] = datagram[nl + 9 : nl + 9 + size].decode()
            assert datagram[nl + 9 + size : nl + 10 + size] == b"\n"
            i = nl + 10 + size
    return out


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.fixture
def journal_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for /run/systemd/journal/socket."""
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    yield sock, path
    sock.close()


def drain(sock: socket.socket, until: float) -> list[dict[str, str]]:
    """Every entry that arrives before ``until`` (monotonic)."""
    got = []
    while (left := until - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(parse(sock.recv(1 << 20)))
        except TimeoutError:
            break
    return got


def test_entry_fields_priority_and_multiline(
    journal_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Level → PRIORITY, event → PBX_EVENT, keys → PBX_KEY; newlines binary-safe; no secret."""
    sock, path = journal_socket
    monkeypatch.setenv("PBX_AGENT_LOG_FORMAT", "journal")
    monkeypatch.setenv("PBX_AGENT_JOURNAL_SOCKET", path)
    logs.configure("debug")
    log = structlog.get_logger("t")
    log.error("uplink_failed", broker="mqtts://noc:8883", attempt=3, password=CANARY)
    log.warning("stack", text="line one\nline two")
    log.debug("chatty", n=1)
    entries = [parse(sock.recv(65536)) for _ in range(3)]
    first, second, third = entries
    assert first["PRIORITY"] == "3" and first["PBX_EVENT"] == "uplink_failed"
    assert first["PBX_BROKER"] == "mqtts://noc:8883" and first["PBX_ATTEMPT"] == "3"
    assert first["SYSLOG_IDENTIFIER"] == "pbx-agent"
    assert first["MESSAGE"].startswith("uplink_failed broker=mqtts://noc:8883 attempt=3")
    assert first["PBX_PASSWORD"] == "***"
    assert second["PRIORITY"] == "4" and second["PBX_TEXT"] == "line one\nline two"
    assert third["PRIORITY"] == "7"
    assert all(CANARY not in str(e) for e in entries)


def test_no_journal_falls_back_to_priority_prefixed_lines(tmp_path: Path) -> None:
    """With nothing listening, the line goes to stderr with its <N> prefix."""
    out = io.StringIO()
    logger = journal.JournalLogger(fallback=out, path=str(tmp_path / "absent.sock"))
    logger.warning(journal.fields({"event": "uplink_failed", "level": "warning", "n": 2}))
    assert out.getvalue() == "<4>uplink_failed n=2\n"


def test_format_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """auto: the journal only when stderr is $JOURNAL_STREAM; the variable overrides."""
    monkeypatch.delenv("PBX_AGENT_LOG_FORMAT", raising=False)
    with (tmp_path / "f").open("w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logs.log_format(f) == "journal"
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert logs.log_format(f) == "json"  # another stream: a pipe or file, JSON lines
        monkeypatch.setenv("PBX_AGENT_LOG_FORMAT", "journal")
        assert logs.log_format(f) == "journal"


def test_daemon_under_systemd_logs_to_the_journal(
    tmp_path: Path, journal_socket: tuple[socket.socket, str]
) -> None:
    """The real daemon, given a journal stream: entries with priorities and fields, no JSON
    on stderr, never the database password."""
    sock, path = journal_socket
    cfg = queueing_config(tmp_path)  # its TLS files are missing: preflight errors
    cfg["collectors"]["callstats"] = {
        "interval": "1s",
        "source": {"mariadb": f"mysql://agent:{CANARY}@127.0.0.1:1/asteriskcdrdb"},
    }
    agent = AgentProcess(tmp_path, cfg)
    agent.log_path.touch()
    st = agent.log_path.stat()
    try:
        agent.start(
            env={
                "PBX_AGENT_LOG_FORMAT": "auto",
                "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",
                "PBX_AGENT_JOURNAL_SOCKET": path,
            }
        )
        assert agent.ctl("uplink", "off").returncode == 0
        entries: list[dict[str, str]] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            entries += drain(sock, min(deadline, time.monotonic() + 0.5))
            prios = {e["PRIORITY"] for e in entries}
            events = {e["PBX_EVENT"] for e in entries}
            if "6" in prios and {"uplink_switch", "collector_failed"} <= events:
                break
    finally:
        agent.close()
    flip = next(e for e in entries if e["PBX_EVENT"] == "uplink_switch")
    assert flip["PRIORITY"] == "4" and flip["PBX_STATE"] == "off"
    problems = [e for e in entries if e["PBX_EVENT"] == "preflight_problem"]
    assert problems and all(e["PRIORITY"] == "3" for e in problems)
    assert {e["PBX_SETTING"] for e in problems} >= {"uplink.ca_file", "uplink.key_file"}
    refused = [e for e in entries if e["PBX_EVENT"] == "collector_failed"]
    assert refused and refused[0]["PRIORITY"] == "4" and "***" in refused[0]["MESSAGE"]
    assert any(e["PRIORITY"] == "6" for e in entries)
    assert all(e["SYSLOG_IDENTIFIER"] == "pbx-agent" and e["PBX_EVENT"] for e in entries)
    everything = "".join(str(e) for e in entries) + agent.log()
    assert CANARY not in everything
    assert '"event"' not in agent.log()  # no JSON lines: the journal got the events
