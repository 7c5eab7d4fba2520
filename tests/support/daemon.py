"""Start the real daemon as a user would (``agentctl run``) and talk to it as a user would.

The daemon runs as a subprocess with its own configuration in a temporary
folder and a ``NOTIFY_SOCKET`` that the test binds, so READY=1, STATUS= and
STOPPING=1 are read from a real datagram socket, as systemd would read them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def base_config(root: Path, **overrides: Any) -> dict[str, Any]:
    """A configuration that keeps everything under ``root`` and collects only health."""
    cfg: dict[str, Any] = {
        "device_id": "pbx-test-1",
        "paths": {"state_dir": str(root / "state"), "runtime_dir": str(root / "run")},
        "control": {"read_group": "nogroup", "admin_group": False},
        "collectors": {
            "health": {"interval": "1s"},
            "config": {"enabled": False},
            "callstats": {"enabled": False},
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def queueing_config(root: Path, **overrides: Any) -> dict[str, Any]:
    """:func:`base_config` with an uplink that never connects, so approved envelopes stay
    queued (with no uplink at all nothing is queued: local-only mode keeps records local).

    The broker address is a closed loopback port and the TLS files do not exist: the
    session fails at its start and retries with backoff, and delivers nothing.
    """
    tls = root / "no-tls"
    uplink = {
        "broker": "mqtts://127.0.0.1:9",
        "ca_file": str(tls / "ca.pem"),
        "cert_file": str(tls / "cert.pem"),
        "key_file": str(tls / "key.pem"),
    }
    return base_config(root, uplink=uplink, **overrides)


def shipped_config(
    root: Path, *, broker_port: int, ca: Path, cert: Path, key: Path
) -> dict[str, Any]:
    """The shipped ``etc/agent.yaml`` as a user installs it, plus an uplink to ``broker_port``.

    Only what must point into ``root`` changes: the paths, the control groups, a copy of
    the sample PBX tree (``tests/fixtures/pbx``) as the configuration roots and CDR file,
    and the TLS files. Intervals, policy and everything else stay the defaults.
    """
    import shutil

    cfg: dict[str, Any] = yaml.safe_load((REPO / "etc" / "agent.yaml").read_text())
    pbx = root / "pbx"
    if not pbx.exists():
        shutil.copytree(REPO / "tests" / "fixtures" / "pbx", pbx, symlinks=True)
    etc = pbx / "etc"
    cfg["device_id"] = "pbx-test-1"
    cfg["paths"] = {"state_dir": str(root / "state"), "runtime_dir": str(root / "run")}
    cfg["control"] = {"read_group": "nogroup", "admin_group": False}
    snap = cfg["collectors"]["config"]
    snap["roots"] = [str(etc / "asterisk"), str(etc / "freepbx.conf"), str(etc / "amportal.conf")]
    snap["exclude"] = [f"{etc / 'asterisk' / 'keys'}/**"]
    snap["never_read"] = [str(pbx / "var" / "spool" / "asterisk")]
    csv = pbx / "var" / "log" / "asterisk" / "cdr-csv" / "Master.csv"
    cfg["collectors"]["callstats"]["source"] = {"csv": str(csv)}
    cfg["uplink"].update(
        broker=f"mqtts://localhost:{broker_port}",
        ca_file=str(ca),
        cert_file=str(cert),
        key_file=str(key),
    )
    return cfg


class AgentProcess:
    """One daemon subprocess with its configuration file and notify socket."""

    def __init__(self, root: Path, config: dict[str, Any]) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "agent.yaml"
        self.write_config(config)
        self.notify_path = root / "notify.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify: socket.socket | None = None
        self.messages: list[str] = []
        self.log_path = root / "daemon.log"

    def write_config(self, config: dict[str, Any] | str) -> None:
        """Replace the configuration file (a dict is written as YAML)."""
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        self.config_path.write_text(text)

    @property
    def state_dir(self) -> Path:
        """The daemon's state directory."""
        return self.root / "state"

    @property
    def socket_path(self) -> Path:
        """The control socket."""
        return self.root / "run" / "control.sock"

    def start(
        self,
        *,
        wait_ready: bool = True,
        env: dict[str, str] | None = None,
        nofile: int | None = None,
        module: str = "agent.cli",
    ) -> float:
        """Start ``agentctl run``; return seconds from spawn to READY=1.

        ``nofile`` sets the daemon's descriptor limit (soft and hard), as the unit's
        ``LimitNOFILE=`` would, so that exhaustion is cheap to reach. ``module`` is what
        ``python -m`` runs (``bench.as_installed`` hides the development tools).
        """
        if self.notify is None:
            self.notify_path.unlink(missing_ok=True)
            self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.notify.bind(str(self.notify_path))
        self.messages.clear()
        full_env = {
            **os.environ,
            "NOTIFY_SOCKET": str(self.notify_path),
            "PBX_AGENT_LOG_FORMAT": "json",
            **(env or {}),
        }
        log = self.log_path.open("ab")
        t0 = time.monotonic()
        argv = [sys.executable, "-m", module, "-c", str(self.config_path), "run"]
        if nofile is not None:
            argv = ["prlimit", f"--nofile={nofile}:{nofile}", "--", *argv]  # execs in place
        self.proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=REPO,
        )
        log.close()
        if wait_ready:
            self.wait_message("READY=1", timeout=15)
        return time.monotonic() - t0

    def read_notify(self, timeout: float) -> str | None:
        """One datagram from the daemon, or None within ``timeout``."""
        assert self.notify is not None
        self.notify.settimeout(timeout)
        try:
            data = self.notify.recv(4096).decode()
        except TimeoutError:
            return None
        self.messages.append(data)
        return data

    def wait_message(self, needle: str, timeout: float = 10.0) -> str:
        """Wait for a notify datagram containing ``needle``; fail if the daemon exits."""
        deadline = time.monotonic() + timeout
        for m in self.messages:
            if needle in m:
                return m
        while time.monotonic() < deadline:
            msg = self.read_notify(min(0.2, max(deadline - time.monotonic(), 0.01)))
            if msg is not None and needle in msg:
                return msg
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.proc.returncode} before "
                    f"{needle!r}; log:\n{self.log()}"
                )
        raise AssertionError(
            f"no {needle!r} from the daemon within {timeout} s; got "
            f"{self.messages}; log:\n{self.log()}"
        )

    def log(self) -> str:
        """Everything the daemon printed."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        """The daemon's JSON log lines, parsed."""
        events = []
        for line in self.log().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events

    def ctl(
        self, *args: str, user: int | None = None, check: bool = False, timeout: float = 20
    ) -> subprocess.CompletedProcess[str]:
        """Run ``agentctl -c CONFIG ARGS...`` (as another uid when ``user`` is given)."""
        kwargs: dict[str, Any] = {}
        if user is not None:
            kwargs["user"] = user
            kwargs["group"] = user
            kwargs["extra_groups"] = []
        return subprocess.run(
            [sys.executable, "-m", "agent.cli", "-c", str(self.config_path), *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=check,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            **kwargs,
        )

    def status(self) -> dict[str, Any]:
        """``agentctl status --json`` parsed."""
        out = self.ctl("status", "--json")
        return dict(json.loads(out.stdout))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> tuple[int, float]:
        """Send ``sig`` and wait; return the exit status and the seconds it took."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the daemon did not exit within {timeout} s of signal {sig}; its stacks "
                f"and log:\n{self._stacks_and_log()}"
            ) from None
        return code, time.monotonic() - t0

    def _stacks_and_log(self) -> str:
        """Ask a stuck daemon for its threads' and tasks' stacks; the end of its log."""
        assert self.proc is not None
        before = len(self.log())
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and "stacks_dumped" not in self.log()[before:]:
            time.sleep(0.05)
        if "stacks_dumped" not in self.log()[before:]:  # the loop itself is stuck
            self.proc.send_signal(signal.SIGABRT)
            self.proc.wait(timeout=5)
        return self.log()[-12000:]

    def close(self) -> None:
        """Kill the daemon if it still runs and close the notify socket."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.notify is not None:
            self.notify.close()
            self.notify = None
