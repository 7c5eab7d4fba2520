"""The NOC's processes for tests: a configuration file, and ``python -m noc ...`` subprocesses.

Why it exists: "a worker killed mid-stream misses nothing" is only proven by a
real process killed with SIGKILL; the dashboard is tested as uvicorn serves it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from noc.config import NocConfig, parse
from tests.support import signing
from tests.support.mosquitto import Mosquitto, free_port, wait_port
from tests.support.pki import PKI

REPO = Path(__file__).resolve().parents[2]


def noc_settings(pki: PKI, broker: Mosquitto, dsn: str, **sections: Any) -> dict[str, Any]:
    """A NOC configuration (as a dict) for this broker and database."""
    noc = pki.device("noc")
    data: dict[str, Any] = {
        "database": dsn,
        "broker": {
            "url": f"mqtts://localhost:{broker.port}",
            "ca_file": str(pki.ca_file),
            "cert_file": str(noc.cert),
            "key_file": str(noc.key),
            "keepalive": 5,
        },
        "ingest": {"batch": 200},
        "signing": {"key_file": str(signing.command_key_file())},
        "command_timeout": "5s",
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


def noc_config(data: dict[str, Any]) -> NocConfig:
    """The parsed configuration."""
    return parse(data, "(test)")


class NocProcess:
    """One ``python -m noc -c FILE ...`` subprocess with its log file."""

    def __init__(self, root: Path, data: dict[str, Any], *args: str, name: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "noc.yaml"
        self.config_path.write_text(yaml.safe_dump(data))
        self.args = list(args)
        self.log_path = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process (it runs until stopped or killed)."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "noc", "-c", str(self.config_path), *self.args],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "NOC_LOG_FORMAT": "json"},
        )  # fmt: skip
        log.close()

    def kill(self) -> None:
        """SIGKILL: no goodbye, no last acknowledgement."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM and wait; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def log(self) -> str:
        """What the process printed."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def running(self) -> bool:
        """Whether it is alive."""
        return self.proc is not None and self.proc.poll() is None


def start_web(root: Path, data: dict[str, Any]) -> tuple[NocProcess, str]:
    """``noc web`` on a free loopback port; returns the process and its base URL."""
    port = free_port()
    data = {**data, "web": {**data.get("web", {}), "host": "127.0.0.1", "port": port}}
    proc = NocProcess(root, data, "web", name="web")
    proc.start()
    if not wait_port("127.0.0.1", port, time.monotonic() + 20, proc.proc):
        raise AssertionError(f"noc web did not listen on {port}: {proc.log()}")
    return proc, f"http://127.0.0.1:{port}"
