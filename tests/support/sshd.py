"""Private OpenSSH servers for tests: a support bastion and the box's own sshd.

Each runs Debian's ``/usr/sbin/sshd -D -e -f CONFIG`` on a free loopback port
with a host key made for it; a test can kill or freeze it whole (listener and
session processes). Nothing here touches the system's ssh service.

``StrictModes`` refuses an authorized-keys file when any folder above it is
writable by others, and /tmp and /var/tmp are: everything lives under a
root-owned 0755 tree in /run (:func:`private_root`).
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

SSHD = Path("/usr/sbin/sshd")
TESTS_BASE = Path("/run/pbx-agent-tests")
SUPPORT_USER = "pbx-support"


class SshdUnavailable(Exception):
    """sshd cannot run here (not installed, not root)."""


def require_sshd() -> None:
    """Raise SshdUnavailable unless a private sshd can be started."""
    if not SSHD.exists():
        raise SshdUnavailable("OpenSSH server is not installed (make test installs it)")
    if os.geteuid() != 0:
        raise SshdUnavailable("a private sshd needs root (privilege separation, other users)")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)


@contextlib.contextmanager
def private_root() -> Iterator[Path]:
    """A fresh root-owned 0755 folder whose every parent is closed to others."""
    TESTS_BASE.mkdir(mode=0o755, exist_ok=True)
    os.chmod(TESTS_BASE, 0o755)
    path = Path(tempfile.mkdtemp(prefix="t", dir=TESTS_BASE))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    """A loopback TCP port nobody uses now, below the kernel's ephemeral range.

    A port the kernel hands out (bind to 0) is also what it gives the next outgoing
    connection on this busy machine, which may take it before sshd, or the bastion's
    forward, binds it; one picked below the range stays free for them.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free loopback port below the ephemeral range")


class KeyPair:
    """An Ed25519 key pair in OpenSSH formats."""

    def __init__(self) -> None:
        self.key = ed25519.Ed25519PrivateKey.generate()

    @property
    def private_openssh(self) -> bytes:
        """The private key, OpenSSH PEM, unencrypted."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )

    @property
    def public_line(self) -> str:
        """``ssh-ed25519 BASE64``."""
        return (
            self.key.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )

    @property
    def fingerprint(self) -> str:
        """``SHA256:...`` as OpenSSH prints it."""
        import hashlib

        blob = base64.b64decode(self.public_line.split()[1])
        return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")

    def write_private(self, path: Path) -> Path:
        """Write the private key with mode 0600."""
        path.write_bytes(self.private_openssh)
        path.chmod(0o600)
        return path


class Sshd:
    """One private sshd; ``start()`` returns when it answers with its banner.

    The processes of one server are the listener and what it forked (found through
    /proc): killing or freezing the server reaches its session processes too.
    """

    def __init__(self, root: Path, name: str, settings: list[str], port: int | None = None):
        self.dir = root / name
        self.dir.mkdir(mode=0o755, exist_ok=True)
        self.port = port or free_port()
        self.host_key = KeyPair()
        self.host_key_file = self.host_key.write_private(self.dir / "host_ed25519")
        self.log_file = self.dir / "sshd.log"
        self.config = self.dir / "sshd_config"
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None
        self.probes = 0  # connections start() made itself to see the banner
        self.write_config()

    def write_config(self) -> None:
        """(Re)write the configuration file."""
        lines = [
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key_file}",
            f"PidFile {self.dir / 'sshd.pid'}",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "StrictModes yes",
            "LogLevel VERBOSE",
            "MaxStartups 100",
            *self.settings,
        ]
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def known_hosts_line(self) -> str:
        """The host key as an OpenSSH known_hosts line for this port."""
        return f"[127.0.0.1]:{self.port} {self.host_key.public_line}"

    def new_host_key(self) -> None:
        """Replace the host key (takes effect at the next start)."""
        self.host_key = KeyPair()
        self.host_key.write_private(self.host_key_file)

    def start(self, timeout: float = 10.0) -> Sshd:
        """Start sshd in its own process group and wait for its banner."""
        require_sshd()
        check = subprocess.run(
            [str(SSHD), "-t", "-f", str(self.config)], capture_output=True, text=True
        )
        if check.returncode != 0:
            raise AssertionError(f"sshd -t refused {self.config}: {check.stderr}")
        log = self.log_file.open("ab")
        self.proc = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(self.config), "-E", str(self.log_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    self.probes += 1
                    if s.recv(64).startswith(b"SSH-2.0-"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"sshd on port {self.port} did not start:\n{self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        """What sshd logged."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def clients(self) -> int:
        """Connections sshd accepted from others than start()'s own banner checks."""
        return self.log().count("Connection from ") - self.probes

    def processes(self) -> list[int]:
        """The listener and every process under it (sshd puts each session in its own session
        with setsid(), so a process group signal would miss them)."""
        if self.proc is None:
            return []
        parents: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2 :].split()
            parents[int(stat.parent.name)] = int(fields[1])
        found = [self.proc.pid] if self.proc.poll() is None else []
        found += [pid for pid in parents if self._descends(pid, parents)]
        return found

    def _descends(self, pid: int, parents: dict[int, int]) -> bool:
        assert self.proc is not None
        seen = 0
        while pid in parents and seen < 64:
            pid = parents[pid]
            if pid == self.proc.pid:
                return True
            seen += 1
        return False

    def signal_all(self, sig: int) -> None:
        """Send ``sig`` to the listener and every session process it forked."""
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill(self) -> None:
        """kill -9 the whole server, sessions included, and reap the listener."""
        if self.proc is None:
            return
        pids = self.processes()
        for sig in (signal.SIGKILL, signal.SIGCONT):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    def freeze(self) -> None:
        """SIGSTOP everything: connections stay open, nothing answers (a dead server)."""
        self.signal_all(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after :meth:`freeze`."""
        self.signal_all(signal.SIGCONT)

    def close(self) -> None:
        """Stop the server (and any session processes) for good."""
        self.kill()


def ensure_user(name: str = SUPPORT_USER) -> bool:
    """Create the local account vendor logins use; True if this call created it.

    ``usermod -p '*'``: useradd leaves ``!`` in /etc/shadow, which sshd (UsePAM no)
    takes for a locked account; ``*`` allows no password either, but is not locked.
    """
    if subprocess.run(["id", name], capture_output=True).returncode == 0:
        return False
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--home-dir", "/", "--shell", "/bin/sh", name],
        check=True,
        capture_output=True,
    )
    subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True)
    return True


def remove_user(name: str = SUPPORT_USER) -> None:
    """Remove the account :func:`ensure_user` made."""
    subprocess.run(["userdel", name], capture_output=True)
