"""A real mosquitto with mutual TLS and the per-device ACL, on a free loopback port.

Why it exists: ACL denials, client-certificate refusals and acknowledgement
timing are properties of the real broker, not of a mock. The broker runs in the
foreground with its real PID, can be stopped and started again on the same port
(to prove that nothing is lost across an outage), and writes its log to a file
that tests can read.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from tests.support.pki import PKI

MOSQUITTO = "/usr/sbin/mosquitto"
HOST = "127.0.0.1"

# The NOC reads everything and may send commands; every box is confined to its
# own subtree by its certificate's CN (use_identity_as_username).
ACL = """\
# Every device may only touch its own subtree; %u is its certificate's CN.
pattern readwrite pbx/%u/#

# The NOC's own client certificate has CN "noc".
user noc
topic read pbx/#
topic write pbx/+/cmd
"""


class MosquittoUnavailable(RuntimeError):
    """mosquitto is not installed or does not start; the message says what to do."""


def require_mosquitto() -> str:
    """Path of the mosquitto binary, or an error telling how to get it."""
    path = MOSQUITTO if os.access(MOSQUITTO, os.X_OK) else shutil.which("mosquitto")
    if not path:
        raise MosquittoUnavailable(
            f"{MOSQUITTO} not found: the integration tests need Debian's mosquitto package. "
            f"Run `make test`, which installs it (or: apt-get install mosquitto)."
        )
    return path


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, deadline: float, proc: subprocess.Popen[bytes] | None) -> bool:
    """Wait until ``host:port`` accepts a TCP connection; False if ``proc`` died or time ran out."""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.01)
    return False


class Mosquitto:
    """One mosquitto process configured for mutual TLS; ``start()``/``stop()`` may repeat."""

    def __init__(
        self,
        pki: PKI,
        *,
        workdir: Path | None = None,
        port: int | None = None,
        max_queued_messages: int = 1_000_000,
        extra_config: str = "",
        acl: str = ACL,
        broker_cert: Path | None = None,
        broker_key: Path | None = None,
    ) -> None:
        self.binary = require_mosquitto()
        self.pki = pki
        self.host = HOST
        self.port = port if port is not None else free_port()
        self.broker_cert = broker_cert or pki.broker_cert
        self.broker_key = broker_key or pki.broker_key
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="pbx-mosquitto-"))
        os.chmod(self.workdir, 0o755)  # the broker user reads its config here
        self.acl_file = self.workdir / "acl"
        self.conf_file = self.workdir / "mosquitto.conf"
        self.log_file = self.workdir / "mosquitto.log"
        self.acl_file.write_text(acl)
        os.chmod(self.acl_file, 0o644)
        self.conf_file.write_text(
            self.config_text(max_queued_messages=max_queued_messages, extra=extra_config)
        )
        os.chmod(self.conf_file, 0o644)
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def config_text(self, *, max_queued_messages: int, extra: str) -> str:
        """The configuration file: mutual TLS, identity from the certificate, the ACL."""
        return (
            f"per_listener_settings false\n"
            f"listener {self.port} {self.host}\n"
            f"cafile {self.pki.ca_file}\n"
            f"certfile {self.broker_cert}\n"
            f"keyfile {self.broker_key}\n"
            f"require_certificate true\n"
            f"use_identity_as_username true\n"
            f"allow_anonymous false\n"
            f"acl_file {self.acl_file}\n"
            f"persistence false\n"
            # Without it, PUBACKs of pipelined QoS 1 publishes wait on Nagle's algorithm.
            f"set_tcp_nodelay true\n"
            # The default (1000) silently drops QoS 1 messages to a slow subscriber.
            f"max_queued_messages {max_queued_messages}\n"
            f"log_dest stderr\n"
            f"log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            f"connection_messages true\n"
            f"{extra}"
        )

    @property
    def ca_file(self) -> Path:
        """The CA that clients must pin to trust this broker."""
        return self.pki.ca_file

    @property
    def pid(self) -> int | None:
        """The real PID of the running mosquitto, or None."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.pid is not None

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and return once its port accepts connections."""
        if self.running:
            return
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1
        if not wait_port(self.host, self.port, time.monotonic() + timeout, self._proc):
            rc = self._proc.poll()
            self.stop()
            raise MosquittoUnavailable(
                f"mosquitto did not accept connections on {self.host}:{self.port} within "
                f"{timeout}s (exit status {rc}); its log {self.log_file}:\n{self.log_text()}"
            )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout``) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the broker: an abrupt outage, no DISCONNECTs, no will delays honoured."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5.0)

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start(timeout)

    def log_text(self) -> str:
        """Everything the broker has logged so far (all runs)."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 5.0) -> re.Match[str]:
        """Wait until the log matches ``pattern`` (a regex); AssertionError with the log if not."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log_text())
            if m is not None:
                return m
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"mosquitto log did not match {pattern!r} in {timeout}s:\n{self.log_text()}"
                )
            time.sleep(0.02)

    def close(self) -> None:
        """Stop the broker and remove its working folder if we made it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
