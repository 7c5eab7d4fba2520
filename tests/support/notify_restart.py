"""A restart command for the update unit where systemd is not PID 1 (the tests).

``python -m tests.support.notify_restart PIDFILE CONFIG``: stop the agent whose
pid is in PIDFILE, start the installed one (/usr/bin/agentctl run, as the
pbx-agent user, as the unit would) with a NOTIFY_SOCKET this script binds, and
exit 0 once READY=1 arrives within $PBX_AGENT_READY_WITHIN seconds, leaving it
running; else stop it and exit 1. systemctl restart of a Type=notify unit does
the same on a real box.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def stop(pidfile: Path) -> None:
    """Stop the agent this script started last, if it still runs."""
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.killpg(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)


def main() -> int:
    pidfile, config = Path(sys.argv[1]), sys.argv[2]
    within = float(os.environ.get("PBX_AGENT_READY_WITHIN", "30"))
    stop(pidfile)
    name = f"pbx-agent-update-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)  # abstract: the pbx-agent user can send to it
    cmd = ["setpriv", "--reuid=pbx-agent", "--regid=pbx-agent", "--init-groups",
           "/usr/bin/agentctl", "-c", config, "run"]  # fmt: skip
    env = dict(os.environ, NOTIFY_SOCKET="@" + name)
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    pidfile.write_text(str(proc.pid))
    deadline = time.monotonic() + within - 0.5
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            break
        if b"READY=1" in data.split(b"\n"):
            return 0
    stop(pidfile)
    return 1


if __name__ == "__main__":
    sys.exit(main())
