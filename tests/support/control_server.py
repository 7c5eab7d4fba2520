"""The daemon's control server alone, with limits chosen by the caller, in its own process.

Why it exists: with the daemon's own limits, control connections never exhaust
its descriptors, so the path taken when ``accept()`` fails with EMFILE cannot be
reached through the daemon. Run under a low descriptor limit with limits far
above it, this process reaches that path for real::

    prlimit --nofile=64:64 -- python -m tests.support.control_server SOCKET \\
        [--status-raises state|bug] [--limits TOTAL,PER_UID,RESERVE]

It serves ``ping`` and ``status`` (the server's counters), logs JSON to
standard error as the daemon does, and stops on SIGTERM. With
``--status-raises state``, ``status`` raises the ``StateError`` a daemon whose
state directory is unusable would raise; with ``bug``, a ``KeyError``, as a bug.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import structlog

from agent import logs
from agent.control import ControlServer, Limits, Peer
from agent.errors import StateError


async def serve(path: Path, status_raises: str | None, limits: Limits) -> None:
    """Serve until SIGTERM."""
    log = structlog.get_logger("control")
    server = ControlServer(
        path,
        read_group=None,
        admin_group=None,
        max_request=64 * 1024,
        log=log,
        limits=limits,
    )

    async def ping(req: dict[str, Any], peer: Peer) -> str:
        return "pong"

    async def status(req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        if status_raises == "state":
            raise StateError(f"cannot write {path.parent}/agent.db: database or disk is full")
        if status_raises == "bug":
            return {"missing": req["no-such-key"]}
        return server.stats()

    server.route("ping", ping, admin=False)
    server.route("status", status, admin=False)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await server.start()
    print("serving", flush=True)
    await stop.wait()
    await server.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("socket", type=Path)
    p.add_argument("--status-raises", choices=("state", "bug"))
    p.add_argument("--limits", default="100000,100000,100000", help="TOTAL,PER_UID,RESERVE")
    a = p.parse_args()
    total, per_uid, reserve = (int(n) for n in a.limits.split(","))
    logs.configure("info", sys.stderr)
    limits = Limits(total=total, per_uid=per_uid, reserve=reserve)
    asyncio.run(serve(a.socket, a.status_raises, limits))
