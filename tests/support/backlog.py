"""A backlog in the agent's own outbox, as a long outage would have left it.

The envelopes go through the real gate into the real outbox before the daemon
starts, so the daemon finds exactly what it would have queued itself.
"""

from __future__ import annotations

from pathlib import Path

from agent.config import PolicyConfig
from agent.ledger import Ledger
from agent.outbox import Outbox
from agent.policy.classes import DataClass, Record
from agent.policy.gate import Gate
from agent.store import open_db
from tests.support.payload import incompressible


def prefill(state_dir: Path, n: int, *, pad: int = 300) -> list[str]:
    """Put ``n`` health envelopes of about ``pad`` + 120 bytes into the outbox; their ids."""
    conn, _ = open_db(state_dir)
    try:
        conn.execute("PRAGMA synchronous=OFF")  # setting up, not under test: spare the fsyncs
        outbox = Outbox(conn, Ledger(conn), max_bytes=256 * 1024 * 1024)
        gate = Gate(
            policy=PolicyConfig(send=frozenset(DataClass)),
            switch_on=lambda: True,
            last_seq=outbox.last_seq,
        )
        ids = []
        for i in range(n):
            env = gate.approve(
                Record(DataClass.HEALTH, {"backlog": i, "pad": incompressible(pad, i)})
            )
            outbox.put(env)
            ids.append(env.id)
        return ids
    finally:
        conn.close()
