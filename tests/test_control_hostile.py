"""Hostile local clients: the control socket answers root however the read group misbehaves.

The daemon runs as a user starts it (``tests/support/daemon.py``) under the
descriptor limit the unit sets; the hostile client is a forked child that has
dropped to ``nobody``/``nogroup`` for real (``nogroup`` is the configured read
group), holding idle connections and reconnecting as fast as it can. Paths the
daemon's own limits make unreachable (``accept()`` failing with EMFILE, a
handler raising) are driven through the same server code in a process of its
own (``tests/support/control_server.py``) under a tiny descriptor limit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import control
from agent.control import Limits
from agent.errors import EX_CANTCREAT, EX_SOFTWARE, EX_TEMPFAIL, DaemonRefused
from tests.support.daemon import REPO, AgentProcess, base_config, wait_for
from tests.support.hog import Hog

NOBODY, NOGROUP = 65534, 65534
UNIT_NOFILE = 1024  # LimitNOFILE= in systemd/pbx-agent.service

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to run a client under another uid"
)


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A folder the unprivileged client can traverse (pytest's tmp_path is 0700)."""
    root = Path(tempfile.mkdtemp(prefix="pbx-agent-hostile-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def daemon(shared_root: Path) -> Iterator[AgentProcess]:
    """The daemon under the unit's descriptor limit, health every 60 s (a quiet log)."""
    a = AgentProcess(
        shared_root, base_config(shared_root, collectors={"health": {"interval": "60s"}})
    )
    a.start(nofile=UNIT_NOFILE)
    yield a
    a.close()


def raw(path: Path, data: bytes, timeout: float = 5.0) -> dict[str, Any]:
    """Send raw bytes on a fresh connection and read one reply line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        try:
            s.sendall(data)
        except BrokenPipeError:
            pass  # refused at once (busy), perhaps before we wrote: its reply is still there
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    assert buf, f"no reply to {data[:60]!r}"
    reply: dict[str, Any] = json.loads(buf)
    return reply


def p99(samples: list[float]) -> float:
    """The 99th percentile (nearest rank)."""
    ordered = sorted(samples)
    return ordered[max(0, int(len(ordered) * 0.99 + 0.5) - 1)]


def log_lines_after(agent: AgentProcess, offset: int) -> list[str]:
    """The daemon's log lines written after ``offset`` characters."""
    return agent.log()[offset:].splitlines()


# -- limits ----------------------------------------------------------------------------------


def test_limits_leave_most_descriptors_to_the_daemon() -> None:
    """Whatever the descriptor limit, the socket may hold at most a quarter of it."""
    for nofile in (32, 64, 256, 1024, 4096, 65536):
        lim = Limits.for_descriptors(nofile)
        assert lim.total + lim.reserve <= max(nofile // 4, 6)
        assert 1 <= lim.per_uid <= lim.total and lim.reserve >= 2
    unit = Limits.for_descriptors(UNIT_NOFILE)
    assert (unit.total, unit.per_uid, unit.reserve) == (64, 8, 16)


# -- the real daemon, a hostile member of the read group ---------------------------------------


@needs_root
@pytest.mark.integration
def test_root_status_p99_under_a_reconnect_storm(daemon: AgentProcess) -> None:
    """1,100 connections from a read-group member, reopened as fast as they are closed: root's
    status keeps a p99 under 1 s, the refusals are counted, and the log says so once."""
    offset = len(daemon.log())
    with Hog(daemon.socket_path, 1_100, uid=NOBODY, gid=NOGROUP, churn=6.0) as hog:
        first = hog.start()
        assert first["opened"] + first["refused"] == 1_100
        assert first["open_now"] <= Limits.for_descriptors(UNIT_NOFILE).per_uid
        samples = []
        until = time.monotonic() + 4.0  # inside the storm (it lasts 6 s)
        while time.monotonic() < until:
            t0 = time.monotonic()
            assert control.request(daemon.socket_path, "status", timeout=5)["daemon"]["pid"]
            samples.append(time.monotonic() - t0)
        cli = daemon.ctl("status", timeout=10)
        storm = hog.next_report(30)
    assert cli.returncode == 0, cli.stderr
    assert "control socket:" in cli.stdout and "per-uid" in cli.stdout
    assert len(samples) >= 20
    assert p99(samples) < 1.0, f"p99 {p99(samples):.3f} s over {len(samples)} requests"
    assert storm["reopened"] > 1_000, storm  # the storm really happened
    st = daemon.status()["control"]
    assert st["refused"].get("per-uid", 0) >= 1_092
    assert st["accept_pauses"] == 0  # the limits kept the descriptors from running out
    lines = log_lines_after(daemon, offset)
    assert len(lines) <= 6, "\n".join(lines[:20])
    assert not [ln for ln in lines if "Traceback" in ln or "socket.accept" in ln]
    refusals = [json.loads(ln) for ln in lines if "control_connection_refused" in ln]
    assert refusals and refusals[0]["uid"] == NOBODY


@needs_root
@pytest.mark.integration
def test_a_low_descriptor_limit_shrinks_the_limits(shared_root: Path) -> None:
    """Under LimitNOFILE=128, 1,100 held connections leave the daemon descriptors to spare:
    no accept() failure, root answered, and the health collector still runs (it used to fail
    with EMFILE)."""
    agent = AgentProcess(
        shared_root, base_config(shared_root, collectors={"health": {"interval": "60s"}})
    )
    agent.start(nofile=128)
    try:
        limits = agent.status()["control"]["limits"]
        assert limits["total"] + limits["reserve"] <= 128 // 4
        with Hog(agent.socket_path, 1_100, uid=NOBODY, gid=NOGROUP) as hog:
            assert hog.start()["open_now"] <= limits["per_uid"]
            before = agent.status()["collectors"]["health"]["last_ok"]
            control.request(agent.socket_path, "collect", collector="health")
            health = wait_for(
                lambda: (h := agent.status()["collectors"]["health"])["last_ok"] != before and h,
                what="a health collection during the attack",
            )
            assert health["last_error"] is None
            st = agent.status()["control"]
        assert st["accept_pauses"] == 0 and st["refused"]["per-uid"] >= 1_100 - limits["per_uid"]
        assert "Traceback" not in agent.log() and "EMFILE" not in agent.log()
    finally:
        agent.close()


@needs_root
@pytest.mark.integration
def test_idle_connections_time_out_sooner_under_pressure(daemon: AgentProcess) -> None:
    """A lone idle read-group connection is left alone; once refusals start, idle ones close
    within about 2 s instead of 30 s."""
    with Hog(daemon.socket_path, 1, uid=NOBODY, gid=NOGROUP) as quiet:
        assert quiet.start()["open_now"] == 1
        time.sleep(3.0)  # longer than the short limit: it would have been closed by now
        assert daemon.status()["control"]["timed_out"] == 0
    with Hog(daemon.socket_path, 20, uid=NOBODY, gid=NOGROUP) as noisy:
        noisy.start()
        t0 = time.monotonic()
        wait_for(
            lambda: daemon.status()["control"]["timed_out"] >= 8,
            timeout=5,
            what="the held connections timed out",
        )
        assert time.monotonic() - t0 < 4.0


# -- malformed requests -------------------------------------------------------------------------

HOSTILE_REQUESTS = [
    (b"[" * 60_000 + b"\n", "bad-request"),
    (b'{"cmd":"status","x":' + b"[" * 20 + b"]" * 20 + b"}\n", "bad-request"),
    (b'{"cmd":"status","n":' + b"9" * 5_000 + b"}\n", "bad-request"),
    (b'{"cmd":"status","n":NaN}\n', "bad-request"),
    (b'{"cmd":"status","cmd":"uplink"}\n', "bad-request"),
    (b'{"cmd":"\\ud800"}\n', "bad-request"),
    (b'{"cmd":"status\\u0000"}\n', "unknown-command"),
    (b'{"cmd":"st\xffatus"}\n', "bad-request"),
    ('{"cmd":"status"}\n'.encode("utf-16"), "bad-request"),
    (b"[1,2]\n", "bad-request"),
    (b'"status"\n', "bad-request"),
    (b"12\n", "bad-request"),
    (b"null\n", "bad-request"),
    (b'{"cmd":5}\n', "bad-request"),
    (b'{"cmd":"uplink","state":5}\n', "bad-request"),
    (b'{"cmd":"uplink","state":["off"]}\n', "bad-request"),
    (b'{"cmd":"collect","collector":{"a":1}}\n', "bad-request"),
    (b'{"cmd":"collect"}\n', "bad-request"),
    (b'{"cmd":"status","x":"' + b"a" * 200_000 + b'"}\n', "too-large"),
]


@pytest.fixture(scope="module")
def quiet_daemon() -> Iterator[AgentProcess]:
    """One daemon for the malformed-request cases; it must log no traceback for any of them."""
    root = Path(tempfile.mkdtemp(prefix="pbx-agent-malformed-"))
    agent = AgentProcess(root, base_config(root, collectors={"health": {"interval": "60s"}}))
    agent.start(nofile=UNIT_NOFILE)
    yield agent
    agent.close()
    log = agent.log()
    shutil.rmtree(root, ignore_errors=True)
    assert "Traceback" not in log, log[-4000:]


@pytest.mark.parametrize(("payload", "code"), HOSTILE_REQUESTS, ids=range(len(HOSTILE_REQUESTS)))
def test_malformed_requests_get_an_error_reply(
    quiet_daemon: AgentProcess, payload: bytes, code: str
) -> None:
    """Every shape of malformed request gets an error reply with its code and exit status."""
    reply = raw(quiet_daemon.socket_path, payload)
    assert reply["ok"] is False and reply["code"] == code, reply
    assert reply["exit"] == control.EXIT_OF_CODE[code]
    assert len(reply["error"]) < 400
    assert quiet_daemon.proc is not None and quiet_daemon.proc.poll() is None


def test_one_connection_survives_many_bad_requests(shared_root: Path) -> None:
    """Bad requests on one connection each get their reply; a good one after them still works,
    and the daemon logs no traceback."""
    agent = AgentProcess(shared_root, base_config(shared_root))
    agent.start(nofile=UNIT_NOFILE)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(agent.socket_path))
            stream = s.makefile("rwb")
            for payload, code in HOSTILE_REQUESTS[:-1]:  # the oversized one ends a connection
                if b"\n" in payload.rstrip(b"\n"):
                    continue
                stream.write(payload)
                stream.flush()
                assert json.loads(stream.readline())["code"] == code
            stream.write(b'{"cmd":"ping"}\n')
            stream.flush()
            assert json.loads(stream.readline()) == {"ok": True, "result": "pong"}
        assert "Traceback" not in agent.log()
    finally:
        agent.close()


# -- errors raised in handlers, and descriptor exhaustion (the server in its own process) ----


class Server:
    """tests/support/control_server.py as a subprocess; its log is its standard error."""

    def __init__(self, root: Path, *args: str, nofile: int | None = None) -> None:
        self.root = root
        self.path = root / "run" / "control.sock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = root / "server.log"
        argv = [sys.executable, "-m", "tests.support.control_server", str(self.path), *args]
        if nofile is not None:
            argv = ["prlimit", f"--nofile={nofile}:{nofile}", "--", *argv]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=REPO,
                env={**os.environ, "PBX_AGENT_LOG_FORMAT": "json"},
            )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == b"serving\n", self.log()

    def log(self) -> str:
        """What the server logged."""
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        """SIGTERM and reap."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def test_agent_error_in_a_handler_is_an_error_reply_with_its_exit_status(tmp_path: Path) -> None:
    """A StateError raised by a handler reaches the client as exit 73 (control.request raises
    DaemonRefused; `agentctl status` exits 73 and prints the reason)."""
    server = Server(tmp_path, "--status-raises", "state")
    try:
        reply = raw(server.path, b'{"cmd":"status"}\n')
        assert reply == {
            "ok": False,
            "error": reply["error"],
            "code": "failed",
            "exit": EX_CANTCREAT,
        }
        assert "database or disk is full" in reply["error"]
        with pytest.raises(DaemonRefused) as caught:
            control.request(server.path, "status")
        assert caught.value.exit_code == EX_CANTCREAT
        cfg = tmp_path / "agent.yaml"
        cfg.write_text(yaml.safe_dump(base_config(tmp_path)))
        out = subprocess.run(
            [sys.executable, "-m", "agent.cli", "-c", str(cfg), "status"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=20,
        )
        assert out.returncode == EX_CANTCREAT, out
        assert "database or disk is full" in out.stderr
        assert control.request(server.path, "ping") == "pong"  # the server lives on
    finally:
        server.close()


def test_a_bug_in_a_handler_is_an_internal_error_reply(tmp_path: Path) -> None:
    """A handler that raises an unforeseen exception: an "internal" reply (exit 70) every time,
    the connection answered, and one logged traceback, not one per request."""
    server = Server(tmp_path, "--status-raises", "bug")
    try:
        for _ in range(20):
            reply = raw(server.path, b'{"cmd":"status"}\n')
            assert reply["code"] == "internal" and reply["exit"] == EX_SOFTWARE
            assert "KeyError" in reply["error"]
        assert control.request(server.path, "ping") == "pong"
    finally:
        server.close()
    events = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    failed = [e for e in events if e["event"] == "control_request_failed"]
    assert len(failed) == 1 and "KeyError" in failed[0]["exception"]


def test_over_the_limit_is_a_busy_reply_exit_75(tmp_path: Path) -> None:
    """A connection over the limits gets a "busy" reply and exit 75, not a silent close."""
    server = Server(tmp_path, "--limits", "2,1,1")  # root may hold total + reserve = 3
    held = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
    try:
        for s in held:  # each admitted and answered once, then left idle
            s.settimeout(5)
            s.connect(str(server.path))
            s.sendall(b'{"cmd":"ping"}\n')
            assert json.loads(s.makefile("rb").readline())["result"] == "pong"
        reply = raw(server.path, b'{"cmd":"ping"}\n')
        assert reply["code"] == "busy" and reply["exit"] == EX_TEMPFAIL
        with pytest.raises(DaemonRefused) as caught:
            control.request(server.path, "ping")
        assert caught.value.exit_code == EX_TEMPFAIL and "busy" in str(caught.value)
        held.pop().close()
        wait_for(lambda: _pings(server), what="room again after one closed")
    finally:
        for s in held:
            s.close()
        server.close()


def _pings(server: Server) -> bool:
    try:
        return bool(control.request(server.path, "ping") == "pong")
    except DaemonRefused:
        return False


@pytest.mark.integration
def test_descriptor_exhaustion_pauses_accepting_without_a_log_flood(tmp_path: Path) -> None:
    """accept() failing with EMFILE (limits far above a 48-descriptor budget) pauses accepting
    and logs once, not a traceback per attempt; idle holders are closed after 2 s; once the
    holders are gone, it answers at once."""
    server = Server(tmp_path, nofile=48)
    held: list[socket.socket] = []
    try:
        for _ in range(150):  # far more than the server has descriptors for
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(server.path))
            except BlockingIOError:
                s.close()
                break  # the listen backlog is full too
            held.append(s)
        time.sleep(3.0)  # accept attempts, pauses, and the first idle holders closed
        assert server.proc.poll() is None
    finally:
        for s in held:
            s.close()
    try:
        t0 = time.monotonic()
        stats = control.request(server.path, "status", timeout=10)
        assert time.monotonic() - t0 < 3
        assert stats["accept_pauses"] >= 1
        assert stats["timed_out"] >= 1
    finally:
        server.close()
    log = server.log()
    lines = log.splitlines()
    assert "Traceback" not in log and "socket.accept() out of system resource" not in log
    paused = [ln for ln in lines if "control_accept_paused" in ln]
    assert len(paused) == 1, lines
    assert len(lines) <= 3, lines
