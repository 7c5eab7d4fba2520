"""Simulated boxes that speak with the agent's real uplink code.

Why it exists: the NOC's tests and the fleet bench need many agents at once.
Each simulated box here is the agent's own data path, minus the collectors:
the real :class:`~agent.policy.gate.Gate` stamps the envelopes, the real
:class:`~agent.outbox.Outbox` keeps them in a SQLite file of its own, and the
real :class:`~agent.uplink.session.UplinkSession` delivers them over mutual
TLS with the box's own certificate, reconnects with its jittered backoff and
deletes an envelope only on its PUBACK. What is simulated is only the health
body (the real collector walks /proc: 500 of them would measure this machine,
not the NOC), with the same shape and made-up figures. Many boxes share one
event loop in one process, each with its own socket.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import PolicyConfig, loads
from agent.ledger import Ledger
from agent.outbox import Outbox
from agent.policy.classes import DataClass, Record
from agent.policy.gate import Gate
from agent.store import open_db
from agent.uplink.session import UplinkSession
from tests.support import signing
from tests.support.pki import Creds


class _Host:
    """The daemon's side of NOC commands: ``ping`` and ``policy`` work, collect knows health."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def collectors_known(self) -> list[str]:
        return ["health"]

    def collect_now(self, name: str) -> None:
        pass


def health_body(
    rng: random.Random, outbox: dict[str, Any], *, asterisk: bool = True
) -> dict[str, Any]:
    """A health body shaped like ``agent/collectors/health.py`` makes, with made-up figures."""
    disk = round(rng.uniform(20, 70), 1)
    return {
        "cpu": {"percent": round(rng.uniform(1, 40), 1), "count": 4},
        "load": [round(rng.uniform(0.05, 2.0), 2), 0.5, 0.4],
        "memory": {"total": 8 << 30, "available": 5 << 30,
                   "percent": round(rng.uniform(20, 60), 1)},
        "swap": {"total": 2 << 30, "used": 0, "percent": 0.0},
        "disks": [{"mount": "/", "fstype": "ext4", "total": 100 << 30, "used": 40 << 30,
                   "percent": disk}],
        "uptime": 86400 + rng.randrange(86400 * 30),
        "net": {"errin": 0, "errout": 0, "dropin": 0, "dropout": 0},
        "pbx": {"asterisk": {"running": asterisk, "count": 1 if asterisk else 0}},
        "agent": {"pid": 1234, "rss": 40 << 20, "cpu_percent": 0.3, "threads": 4,
                  "outbox": outbox, "switch": "on"},
    }  # fmt: skip


@dataclass
class SimAgent:
    """One simulated box: its own state folder, certificate, outbox and uplink session."""

    device_id: str
    creds: Creds
    ca_file: Path
    port: int
    root: Path
    keepalive: int = 60
    heartbeat: int = 60
    reconnect_max: float = 30.0
    session: UplinkSession | None = None
    outbox: Outbox | None = None
    gate: Gate | None = None
    task: asyncio.Task[None] | None = None
    approved: list[str] = field(default_factory=list)  # ids of every envelope the gate made
    rng: random.Random = field(default_factory=random.Random)

    def open(self) -> None:
        """Open the outbox and build the session (nothing connects yet)."""
        config = loads(
            f"device_id: {self.device_id}\n"
            f"uplink:\n"
            f"  broker: mqtts://localhost:{self.port}\n"
            f"  ca_file: {self.ca_file}\n"
            f"  cert_file: {self.creds.cert}\n"
            f"  key_file: {self.creds.key}\n"
            f"  command_root: {signing.root_pub()}\n"
            f"  keepalive: {self.keepalive}s\n"
            f"  heartbeat: {self.heartbeat}s\n"
            f"  reconnect_max: {self.reconnect_max}s\n"
        )
        conn, _ = open_db(self.root / self.device_id)
        conn.execute("PRAGMA synchronous=OFF")  # 500 boxes on one disk: durability is not measured
        self.outbox = Outbox(conn, Ledger(conn), max_bytes=256 << 20)
        self.gate = Gate(
            policy=PolicyConfig(send=frozenset(DataClass)),
            switch_on=lambda: True,
            last_seq=self.outbox.last_seq,
        )
        assert config.uplink is not None
        self.session = UplinkSession(
            uplink=config.uplink,
            device_id=config.device_id,
            outbox=self.outbox,
            ledger=self.outbox.ledger,
            switch_on=lambda: True,
            commands=_Host(self.gate),
        )

    def put(self, data_class: DataClass, body: dict[str, Any]) -> None:
        """Approve a record through the real gate and store it in the real outbox."""
        assert self.gate is not None and self.outbox is not None
        envelope = self.gate.approve(Record(data_class, body))
        self.approved.append(envelope.id)
        self.outbox.put(envelope)

    def put_health(self) -> None:
        """One health record with made-up figures."""
        assert self.outbox is not None
        self.put(DataClass.HEALTH, health_body(self.rng, self.outbox.stats()))

    def start(self) -> None:
        """Run the uplink session as a task of the running loop."""
        assert self.session is not None
        self.task = asyncio.create_task(self.session.run(), name=f"sim-{self.device_id}")

    async def stop(self) -> None:
        """Cancel the session (it says offline and disconnects) and close the outbox."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None
        if self.outbox is not None:
            self.outbox.conn.close()
            self.outbox = None

    def kill(self) -> None:
        """Drop the connection the way a dead process does: the socket closes, nothing is said."""
        assert self.session is not None
        link = self.session.link
        if link is not None:
            # No DISCONNECT is sent: the broker sees the socket close and publishes the will.
            link.close_now("killed")
        if self.task is not None:
            self.task.cancel()

    @property
    def connected(self) -> bool:
        """Whether the session is connected now."""
        return self.session is not None and self.session.state == "connected"

    @property
    def pending(self) -> int:
        """Envelopes still in the outbox (not yet acknowledged by the broker)."""
        return self.outbox.count if self.outbox is not None else 0


class SimFleet:
    """Many simulated boxes in one event loop; their files under one temporary folder."""

    def __init__(self, agents: list[SimAgent], root: Path) -> None:
        self.agents = agents
        self.root = root

    @classmethod
    def make(
        cls,
        issue: Any,
        ca_file: Path,
        port: int,
        ids: list[str],
        **kwargs: Any,
    ) -> SimFleet:
        """``issue(cn)`` returns the Creds of a new certificate for ``cn``."""
        root = Path(tempfile.mkdtemp(prefix="pbx-sim-"))
        agents = [SimAgent(d, issue(d), ca_file, port, root, **kwargs) for d in ids]
        for a in agents:
            a.open()
        return cls(agents, root)

    def start(self) -> None:
        """Start every session."""
        for a in self.agents:
            a.start()

    async def wait(
        self,
        predicate: Any,
        timeout: float,  # noqa: ASYNC109 -- a deadline for a polled condition, as wait_for() has
        what: str,
        *,
        interval: float = 0.05,
    ) -> None:
        """Wait on the loop until ``predicate()`` holds; AssertionError after ``timeout``.

        A predicate that asks the database blocks the loop the boxes run on: give
        it a longer ``interval``.
        """
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            for a in self.agents:
                if a.task is not None and a.task.done() and not a.task.cancelled():
                    a.task.result()  # a session that crashed says why
            await asyncio.sleep(interval)

    def all_connected(self) -> bool:
        """Every session is connected."""
        return all(a.connected for a in self.agents)

    def drained(self) -> bool:
        """Every outbox is empty (every envelope acknowledged by the broker)."""
        return all(a.pending == 0 for a in self.agents)

    async def close(self) -> None:
        """Stop every session and remove the files."""
        await asyncio.gather(*(a.stop() for a in self.agents))
        shutil.rmtree(self.root, ignore_errors=True)
