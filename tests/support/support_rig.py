"""Everything a remote-support test stands on, real: bastion sshd, the daemon, the NOC, a service.

- the vendor's **bastion**: a private OpenSSH sshd on a loopback port, with its
  own host key, where the box's key may only open remote forwards on loopback
  ports the NOC assigned (``restrict,port-forwarding,permitlisten=…``), no shell
  (``ForceCommand /bin/false``), and ``ClientAliveInterval`` to clear stale
  listeners;
- the **daemon**, started as a user starts it, with an uplink to the test
  session's mosquitto and a ``support`` section pinning the bastion's host key;
- the **NOC**: a real MQTT client with the NOC's certificate sending
  ``support.connect`` and reading the replies;
- a local **service** behind the tunnel (an echo server counting bytes), and,
  for vendor logins, the box's **own sshd** whose ``AuthorizedKeysCommand``
  asks the daemon (``agentctl support authorized-keys %u``) as ``nobody``.

The vendor's side of a forwarded port is the bastion's loopback, which is this
machine's: a test connects to ``127.0.0.1:<bastion port>`` as a vendor
engineer on the bastion would.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.support import signing
from tests.support.daemon import REPO, AgentProcess, base_config, wait_for
from tests.support.mosquitto import Mosquitto
from tests.support.noc import NocListener
from tests.support.pki import PKI
from tests.support.sshd import SUPPORT_USER, KeyPair, Sshd, free_port

DEVICE = "pbx-test-1"
BASTION_USER = "nobody"  # the box's account on the bastion (a per-device account in real life)


def interpreter_for_others() -> tuple[str, str]:
    """A Python that an unprivileged user may run, and the PYTHONPATH that finds the agent.

    The test's own interpreter may live where only root can go (a pyenv under /root);
    the system's python3 of the same version runs the checkout with the venv's packages.
    """
    import site

    own = Path(sys.executable).resolve()
    if all(os.stat(p).st_mode & 0o001 for p in own.parents if str(p) != "/"):
        return sys.executable, str(REPO)
    system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system.exists():
        raise AssertionError(f"no Python {sys.version_info[:2]} that nobody may run")
    return str(system), ":".join([str(REPO), *site.getsitepackages()])


class EchoServer:
    """A local TCP service that echoes what it gets and counts the bytes."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self.received = 0
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    self.received += len(data)
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        """Stop listening."""
        self._stop.set()
        self._listener.close()
        self._thread.join(2)


def round_trip(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    """Send ``payload`` to ``127.0.0.1:port`` and read as many bytes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        got = bytearray()
        sender = threading.Thread(target=s.sendall, args=(payload,), daemon=True)
        sender.start()
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        sender.join(timeout)
        return bytes(got)


def refuses(port: int) -> bool:
    """Whether nothing listens on ``127.0.0.1:port`` any more."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def usable(port: int) -> bool:
    """Whether ``127.0.0.1:port`` relays a few bytes to the echo service and back."""
    try:
        return round_trip(port, b"ping", timeout=2) == b"ping"
    except OSError:
        return False


class SupportRig:
    """The bastion, the daemon, the NOC and the services of one test; ``close()`` stops all."""

    def __init__(
        self,
        root: Path,
        pki: PKI,
        broker: Mosquitto,
        *,
        services: tuple[str, ...] = ("web",),
        support: dict[str, Any] | None = None,
        box_sshd: bool = False,
        addresses: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        root.mkdir(mode=0o755)
        self.pki = pki
        self.broker = broker
        self.echo = EchoServer()
        self.ports = {name: free_port() for name in services}
        self.bastion = Sshd(root, "bastion", self._bastion_settings())
        self.box: Sshd | None = None
        self.sshd_log: Path | None = None
        local: dict[str, str] = {n: f"127.0.0.1:{self.echo.port}" for n in services if n != "ssh"}
        if box_sshd:
            self.box = Sshd(root, "box", self._box_settings())
            self.sshd_log = self.box.log_file
            local["ssh"] = f"127.0.0.1:{self.box.port}"
        local.update(addresses or {})
        self.agent_root = root / "agent"
        cfg = base_config(self.agent_root)
        creds = pki.device(DEVICE)
        cfg["uplink"] = {
            "broker": f"mqtts://localhost:{broker.port}",
            "ca_file": str(pki.ca_file),
            "cert_file": str(creds.cert),
            "key_file": str(creds.key),
            "command_root": str(signing.root_pub()),
            "reconnect_max": "2s",
            "connect_timeout": "5s",
        }
        cfg["support"] = {
            "bastion": {
                "host": "127.0.0.1",
                "port": self.bastion.port,
                "user": BASTION_USER,
                "host_key": self.bastion.known_hosts_line,
            },
            "services": local,
            "keepalive_interval": "1s",
            "keepalive_deadline": "1s",
            "reconnect_max": "1s",
            "connect_timeout": "5s",
            **({"sshd_log": str(self.sshd_log)} if self.sshd_log else {}),
            **(support or {}),
        }
        self.config = cfg
        self.agent = AgentProcess(self.agent_root, cfg)
        self.noc = NocListener(broker)
        self._noc_open = False
        self._counter = 0
        self.box_key = ""

    # -- the servers -------------------------------------------------------------------------

    def _bastion_settings(self) -> list[str]:
        return [
            f"AuthorizedKeysFile {self.root / 'bastion' / 'authorized_keys'}",
            f"AllowUsers {BASTION_USER}",
            "AllowTcpForwarding remote",
            "GatewayPorts no",
            "PermitTTY no",
            "X11Forwarding no",
            "AllowAgentForwarding no",
            "ForceCommand /bin/false",
            "ClientAliveInterval 2",
            "ClientAliveCountMax 2",
        ]

    def _box_settings(self) -> list[str]:
        keys_cmd = self.root / "box" / "keys-cmd"
        return [
            "AuthorizedKeysFile none",
            f"AuthorizedKeysCommand {keys_cmd} %u",
            "AuthorizedKeysCommandUser nobody",
            f"AllowUsers {SUPPORT_USER}",
            "AllowTcpForwarding no",
            "X11Forwarding no",
        ]

    def authorize_box_key(self, public_line: str, ports: list[int] | None = None) -> None:
        """Install the box's key on the bastion, restricted to remote forwards on ``ports``."""
        listen = ",".join(f'permitlisten="127.0.0.1:{p}"' for p in ports or self.ports.values())
        path = self.root / "bastion" / "authorized_keys"
        tmp = path.with_name(".authorized_keys")
        tmp.write_text(f"restrict,port-forwarding,{listen} {public_line}\n" if public_line else "")
        tmp.chmod(0o644)
        tmp.replace(path)  # sshd may be reading it

    def _write_keys_cmd(self) -> None:
        # sshd runs it as nobody, with an empty environment; it and its folders are root's.
        # (Installed, it is the venv's agentctl; here the checkout and the venv's packages.)
        assert self.box is not None
        python, path = interpreter_for_others()
        script = self.root / "box" / "keys-cmd"
        script.write_text(
            "#!/bin/sh\n"
            f"exec /usr/bin/env PYTHONPATH={path} PYTHONDONTWRITEBYTECODE=1 {python} "
            f'-m agent.cli -c {self.agent.config_path} support authorized-keys "$1"\n'
        )
        script.chmod(0o755)

    def start(self) -> SupportRig:
        """Start the servers (holding their ports at once), the daemon and the NOC; install the
        box's key on the bastion (sshd reads authorized_keys at each login)."""
        self.authorize_box_key("")
        self.bastion.start()
        if self.box is not None:
            self._write_keys_cmd()
            self.box.start()
        self.noc.__enter__()
        self._noc_open = True
        self.agent.start()
        out = self.agent.ctl("support", "key")
        assert out.returncode == 0, out.stderr
        self.box_key = out.stdout.strip().splitlines()[0]
        self.authorize_box_key(self.box_key)
        wait_for(self.online, timeout=15, what="the uplink online")
        return self

    def online(self) -> bool:
        """Whether the daemon's uplink is connected (support.connect can reach it)."""
        st = self.agent.status()
        return bool(st["uplink"]["state"] == "connected")

    def close(self) -> None:
        """Stop everything this rig started."""
        self.agent.close()
        self.bastion.close()
        if self.box is not None:
            self.box.close()
        if self._noc_open:
            self.noc.__exit__(None, None, None)
        self.echo.close()

    # -- the customer ------------------------------------------------------------------------

    def open_window(
        self, duration: str = "10m", *, ticket: str | None = None, services: list[str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``agentctl support open``; asserts it succeeded."""
        args = ["support", "open", "--for", duration]
        if ticket:
            args += ["--ticket", ticket]
        if services:
            args += ["--service", *services]
        out = self.agent.ctl(*args)
        assert out.returncode == 0, out.stderr
        return out

    def support_status(self) -> dict[str, Any]:
        """``agentctl support status --json``."""
        out = self.agent.ctl("support", "status", "--json")
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    def ledger(self, event: str | None = None) -> list[dict[str, Any]]:
        """Support entries of the ledger (``agentctl audit --kind support --json``)."""
        out = self.agent.ctl("audit", "--kind", "support", "--json")
        assert out.returncode == 0, out.stderr
        entries = [json.loads(line) for line in out.stdout.splitlines()]
        return [e for e in entries if event is None or e["event"] == event]

    # -- the NOC ---------------------------------------------------------------------------

    def command(self, cmd: str, args: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        """Send a NOC command to the box and return its reply."""
        self._counter += 1
        cmd_id = f"t{time.monotonic_ns()}-{self._counter}"
        self.noc.send(DEVICE, {"v": 1, "id": cmd_id, "ts": time.time(), "cmd": cmd, "args": args})

        def reply() -> dict[str, Any] | None:
            return next((r for r in self.noc.replies(DEVICE) if r["id"] == cmd_id), None)

        return dict(wait_for(reply, timeout=timeout, what=f"the reply to {cmd}"))

    def connect(self, **args: Any) -> dict[str, Any]:
        """``support.connect`` with the rig's ports unless ``ports`` is given."""
        args.setdefault("ports", dict(self.ports))
        return self.command("support.connect", args)

    def wait_usable(self, service: str = "web", timeout: float = 15) -> None:
        """Wait until the bastion's port for ``service`` relays to the echo service."""
        wait_for(lambda: usable(self.ports[service]), timeout=timeout, what=f"{service} forwarded")

    def wait_refused(self, service: str = "web", timeout: float = 1.0) -> float:
        """Wait until the bastion's port for ``service`` refuses; return how long it took."""
        t0 = time.monotonic()
        wait_for(
            lambda: refuses(self.ports[service]),
            timeout=timeout,
            interval=0.01,
            what=f"bastion port {self.ports[service]} to refuse connections",
        )
        return time.monotonic() - t0


@contextlib.contextmanager
def vendor_key_file(root: Path) -> Any:
    """A one-time vendor key pair on disk (private 0600), as the NOC would make it."""
    pair = KeyPair()
    path = pair.write_private(root / "vendor_key")
    yield pair, path


def as_user(uid: int, gid: int, *args: str) -> tuple[int, str]:
    """Run agentctl's main() in a forked child under another uid; its exit code and stdout.

    What the command imports is imported here first: the interpreter's own library may
    sit where the other user cannot read (a pyenv under /root).
    """
    import agent.cli
    import agent.cli.cmd_support
    import agent.config
    import agent.control
    import agent.paths
    import agent.sshkeys
    import agent.support_window
    import agent.switch

    del agent
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges for real, then act as that user would
        code = 70
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            sys.stdout = os.fdopen(write_end, "w")  # pytest holds the original sys.stdout
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115 -- the child exits right after
            from agent.cli import main

            code = main(list(args))
            sys.stdout.flush()
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out
