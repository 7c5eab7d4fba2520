"""The real daemon, started as `agentctl run`, driven over its real control socket."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import control
from tests.support.daemon import AgentProcess, base_config, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    """A daemon with a local-only configuration under tmp_path (not started)."""
    a = AgentProcess(tmp_path, base_config(tmp_path))
    yield a
    a.close()


def test_ready_status_and_clean_stop(agent: AgentProcess) -> None:
    """READY=1 arrives, status answers over the socket, SIGTERM stops it well within 5 s."""
    agent.start()
    status = wait_for(
        lambda: (s := agent.status())["collectors"]["health"]["last_ok"] and s,
        what="a health collection",
    )
    assert status["running"] is True
    assert status["device_id"] == "pbx-test-1"
    assert status["switch"]["state"] == "on"
    # No uplink configured: nothing is queued for sending, and status says why.
    assert status["outbox"]["queued"] == 0 and status["outbox"]["last_seq"] == 0
    assert status["gate"]["refused"]["health:no-uplink"] >= 1
    assert status["uplink"]["local_only"] is True
    started = next(e for e in agent.log_events() if e["event"] == "daemon_started")
    assert "kept locally" in started["uplink"]
    assert "nothing leaves this box" in agent.ctl("status").stdout
    code, took = agent.stop()
    assert code == 0
    assert took < 5.0
    assert any("STOPPING=1" in m for m in agent.messages) or agent.wait_message("STOPPING=1", 1)
    while agent.read_notify(0.2) is not None:  # the process is gone: drain what it sent
        pass
    assert sum("STOPPING=1" in m for m in agent.messages) == 1  # said once, not twice
    assert not agent.socket_path.exists()


def test_usr1_logs_every_thread_and_task_and_the_daemon_runs_on(agent: AgentProcess) -> None:
    """What to ask a daemon that looks stuck: every thread's stack, every task's awaits."""
    agent.start()
    wait_for(lambda: agent.status()["collectors"]["health"]["last_ok"], what="a health run")
    assert agent.proc is not None
    for _ in range(3):  # repeatedly: a dump must never take the daemon down
        before = len(agent.log_events())
        agent.proc.send_signal(signal.SIGUSR1)

        def dumped(before: int = before) -> list[dict[str, Any]]:
            new = agent.log_events()[before:]
            return new if any(e.get("event") == "stacks_dumped" for e in new) else []

        events = wait_for(dumped, what="a whole stack dump")
        end = next(e for e in events if e["event"] == "stacks_dumped")
        tasks = {e["task"]: e for e in events if e["event"] == "task_stack"}
        threads = {e["thread"]: e for e in events if e["event"] == "thread_stack"}
        assert "collector:health" in tasks
        assert any("supervisor.py" in f for f in tasks["collector:health"]["awaits"])
        assert all(e["cancelling"] == 0 for e in tasks.values())
        assert any("_log_stacks" in f for f in threads["MainThread"]["frames"])
        assert (end["threads"], end["tasks"]) == (len(threads), len(tasks))
    assert agent.proc.poll() is None
    code, _took = agent.stop()
    assert code == 0


def test_sigabrt_from_the_watchdog_leaves_every_thread_stack(agent: AgentProcess) -> None:
    """systemd's watchdog kills a stuck daemon with SIGABRT; the journal gets its stacks."""
    agent.start()
    agent.wait_message("READY=1", 10)
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGABRT)
    assert agent.proc.wait(timeout=10) == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in agent.log()
    assert "most recent call first" in agent.log()


def test_status_when_daemon_down(agent: AgentProcess) -> None:
    """With no daemon, status says so, shows the switch from its file and exits 69."""
    out = agent.ctl("status")
    assert out.returncode == 69
    assert "daemon: not running" in out.stdout
    assert "uplink switch: on" in out.stdout


def test_switch_persists_across_restart(agent: AgentProcess) -> None:
    """`uplink off` through the daemon is recorded with uid and survives a restart."""
    agent.start()
    off = agent.ctl("uplink", "off")
    assert off.returncode == 0, off.stderr
    assert "uplink switch: off" in off.stdout
    again = agent.ctl("uplink", "off")  # idempotent: the audit below holds one "off"
    assert again.returncode == 0 and "already off: nothing changed" in again.stdout
    agent.stop()
    agent.start()
    s = agent.status()
    assert s["switch"]["state"] == "off"
    assert s["switch"]["changed_by_uid"] == os.getuid()
    # Collection for upload stops: health records are refused by the gate, not queued.
    queued = s["outbox"]["queued"]
    wait_for(lambda: agent.status()["collectors"]["health"]["refused"] >= 2, what="refusals")
    assert agent.status()["outbox"]["queued"] == queued
    on = agent.ctl("uplink", "on")
    assert on.returncode == 0 and "uplink switch: on" in on.stdout
    audit = agent.ctl("audit", "--kind", "switch", "--json")
    states = [json.loads(line)["state"] for line in audit.stdout.splitlines()]
    assert states == ["off", "on"]


def test_switch_flipped_while_daemon_down_is_honoured(agent: AgentProcess) -> None:
    """`uplink off` with no daemon writes the file; the daemon starts with it off."""
    off = agent.ctl("uplink", "off")
    assert off.returncode == 0, off.stderr
    assert "daemon not running" in off.stdout
    agent.start()
    s = agent.status()
    assert s["switch"]["state"] == "off"
    assert s["switch"]["history"][-1]["via"] == "agentctl"
    audit = agent.ctl("audit", "--kind", "switch", "--json")
    assert json.loads(audit.stdout.splitlines()[0])["via"] == "agentctl"


def test_switch_file_corrupt_means_off(agent: AgentProcess) -> None:
    """A switch file that cannot be parsed is read as off: when in doubt, nothing leaves."""
    agent.state_dir.mkdir(parents=True)
    (agent.state_dir / "uplink-switch.json").write_text("{not json")
    agent.start()
    s = agent.status()
    assert s["switch"]["state"] == "off"
    assert "corrupt" in s["switch"]["error"]


def test_sighup_good_and_bad_config(agent: AgentProcess, tmp_path: Path) -> None:
    """SIGHUP adopts a valid change; an invalid one is refused and the old one kept."""
    agent.start()
    assert agent.proc is not None
    cfg = base_config(tmp_path)
    cfg["collectors"]["health"] = {"interval": "7s"}
    agent.write_config(cfg)
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: agent.status()["collectors"].get("health", {}).get("interval") == 7,
        what="the new interval",
    )
    cfg["collectors"]["health"] = {"interval": "never"}
    agent.write_config(cfg)
    agent.proc.send_signal(signal.SIGHUP)
    status = wait_for(
        lambda: (s := agent.status())["daemon"]["last_reload_error"] and s,
        what="the reload to be rejected",
    )
    assert "collectors.health.interval" in status["daemon"]["last_reload_error"]
    assert status["collectors"]["health"]["interval"] == 7
    assert agent.proc.poll() is None
    events = agent.log_events()
    assert any(e["event"] == "reload_rejected_keeping_running_config" for e in events)


def test_reload_keeps_device_id_and_paths_until_a_restart(
    agent: AgentProcess, tmp_path: Path
) -> None:
    """A reload that changes device_id or the folders adopts the rest and keeps those two: the
    database, the lock and the socket are where they were; status says a restart is needed."""
    agent.start()
    assert agent.proc is not None
    cfg = base_config(tmp_path)
    cfg["device_id"] = "pbx-other-9"
    cfg["paths"] = {"state_dir": str(tmp_path / "elsewhere"), "runtime_dir": str(tmp_path / "r2")}
    cfg["collectors"]["health"] = {"interval": "9s"}
    agent.write_config(cfg)
    agent.proc.send_signal(signal.SIGHUP)
    sock = agent.socket_path  # the running daemon's; agentctl would now look in r2/

    def reloaded() -> dict[str, Any] | None:
        s: dict[str, Any] = control.request(sock, "status")
        return s if s["collectors"].get("health", {}).get("interval") == 9 else None

    status = wait_for(reloaded, what="the reload")
    assert status["device_id"] == "pbx-test-1"
    assert "restart" in status["daemon"]["last_reload_error"]
    assert agent.socket_path.exists()
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "r2").exists()


def test_bad_config_at_start_exits_78(agent: AgentProcess) -> None:
    """A daemon started on a bad configuration exits 78 and logs the key."""
    agent.write_config("device_id: pbx-test-1\nunknown_thing: 1\n")
    agent.start(wait_ready=False)
    assert agent.proc is not None
    assert agent.proc.wait(timeout=15) == 78
    assert "unknown_thing" in agent.log()


def test_watchdog_pings(agent: AgentProcess) -> None:
    """With WatchdogSec set (WATCHDOG_USEC), the daemon sends WATCHDOG=1 regularly."""
    agent.start(env={"WATCHDOG_USEC": "200000"})
    agent.wait_message("WATCHDOG=1", timeout=5)
    count = sum("WATCHDOG=1" in m for m in agent.messages)
    wait_for(
        lambda: (
            agent.read_notify(0.5) and sum("WATCHDOG=1" in m for m in agent.messages) >= count + 2
        ),
        what="more pings",
    )


def raw_request(path: Path, data: bytes) -> dict[str, object]:
    """Send raw bytes on the control socket and read one reply line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(data)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return dict(json.loads(buf))


def test_hostile_requests_get_error_replies(agent: AgentProcess) -> None:
    """Malformed, unknown and oversized requests get an error reply; the daemon lives on."""
    agent.start()
    sock = agent.socket_path
    assert raw_request(sock, b"not json\n")["code"] == "bad-request"
    assert raw_request(sock, b"[1,2]\n")["code"] == "bad-request"
    assert raw_request(sock, b'{"cmd":"rm -rf"}\n')["code"] == "unknown-command"
    assert raw_request(sock, b'{"cmd":"uplink","state":"maybe"}\n')["ok"] is False
    big = b'{"cmd":"status","x":"' + b"a" * 200_000 + b'"}\n'
    assert raw_request(sock, big)["code"] == "too-large"
    assert control.request(sock, "ping") == "pong"


def _as_user(uid: int, gid: int, fn: str, *args: str) -> int:
    """Run agentctl's main() in a forked child under another uid; return its exit code."""
    pid = os.fork()
    if pid == 0:  # child: drop privileges for real, then act as that user would
        code = 70
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            from agent.cli import main

            code = main([fn, *args])
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client under other uids")
def test_peer_credentials() -> None:
    """Read group may read status but not flip; a uid outside it cannot even connect."""
    root = Path(tempfile.mkdtemp(prefix="pbx-agent-cred-"))
    root.chmod(0o755)  # the unprivileged clients must reach the socket and the config
    agent = AgentProcess(root, base_config(root))
    try:
        agent.config_path.chmod(0o644)
        agent.start()
        cfg = str(agent.config_path)
        nobody, nogroup = 65534, 65534  # nogroup is the configured read_group
        assert _as_user(nobody, nogroup, "-c", cfg, "status") == 0
        assert _as_user(nobody, nogroup, "-c", cfg, "uplink", "off") == 77
        assert agent.status()["switch"]["state"] == "on"
        assert _as_user(1, 1, "-c", cfg, "status") == 77  # daemon:daemon, not in the group
        events = agent.log_events()
        assert any(e["event"] == "control_denied" and e["uid"] == nobody for e in events)
    finally:
        agent.close()
        shutil.rmtree(root)


def test_state_files_are_where_configured(agent: AgentProcess) -> None:
    """The daemon keeps its database and socket in the configured folders, nowhere else."""
    agent.start()
    assert (agent.state_dir / "agent.db").exists()
    assert agent.socket_path.is_socket()
    mode = agent.socket_path.stat().st_mode & 0o777
    assert mode == 0o660
    cfg = yaml.safe_load(agent.config_path.read_text())
    assert cfg["paths"]["state_dir"] == str(agent.state_dir)
