"""No loss: a broker outage and a kill -9 in the middle of a backlog lose no envelope.

Everything here is real: the daemon (``agentctl run``), mosquitto with mutual
TLS, the NOC subscriber with its own certificate, and the SQLite database that
the test reads behind the daemon's back (read-only) to know what was approved,
delivered and still queued.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import control
from agent.store import db_path
from tests.support.backlog import prefill
from tests.support.daemon import AgentProcess, base_config, wait_for
from tests.support.mosquitto import Mosquitto
from tests.support.noc import NocListener
from tests.support.pki import PKI

pytestmark = pytest.mark.integration
DEVICE = "pbx-test-1"


def agent_config(root: Path, pki: PKI, broker: Mosquitto, **uplink: Any) -> dict[str, Any]:
    """Health every second, an uplink to ``broker`` as pbx-test-1, quick reconnects."""
    creds = pki.device(DEVICE)
    cfg = base_config(root)
    cfg["uplink"] = {
        "broker": f"mqtts://localhost:{broker.port}",
        "ca_file": str(pki.ca_file),
        "cert_file": str(creds.cert),
        "key_file": str(creds.key),
        "heartbeat": "30s",
        "reconnect_max": "1s",
        "connect_timeout": "5s",
        **uplink,
    }
    return cfg


@pytest.fixture
def persistence_dir() -> Iterator[Path]:
    """A folder the broker (running as the mosquitto user) may write its persistence file to."""
    path = Path(tempfile.mkdtemp(prefix="pbx-mosquitto-db-"))
    path.chmod(0o755)
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("mosquitto")
        except KeyError:
            pass
        else:
            os.chown(path, pw.pw_uid, pw.pw_gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def read_db(state_dir: Path) -> tuple[list[dict[str, Any]], list[int], int]:
    """Delivered ledger entries, seqs still queued, and the outbox's last_seq (read-only)."""
    conn = sqlite3.connect(f"file:{db_path(state_dir)}?mode=ro", uri=True)
    try:
        delivered = [
            json.loads(d)
            for (d,) in conn.execute("SELECT data FROM ledger WHERE kind='delivered' ORDER BY n")
        ]
        queued = [s for (s,) in conn.execute("SELECT seq FROM outbox ORDER BY seq")]
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        return delivered, queued, int(meta.get("last_seq", 0))
    finally:
        conn.close()


def delivered_count(state_dir: Path) -> int:
    """How many "delivered" entries the ledger holds now (read-only, daemon running)."""
    conn = sqlite3.connect(f"file:{db_path(state_dir)}?mode=ro", uri=True, timeout=5)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM ledger WHERE kind='delivered'").fetchone()[0])
    finally:
        conn.close()


def first_arrivals(noc: NocListener, data_class: str) -> list[int]:
    """Seqs of one class in the order they first reached the NOC (repeats left out)."""
    seen: set[int] = set()
    order = []
    for env in noc.envelopes(data_class):
        if env["seq"] not in seen:
            seen.add(env["seq"])
            order.append(env["seq"])
    return order


def test_broker_outage_loses_nothing(
    tmp_path: Path,
    pki: PKI,
    broker_factory: Callable[..., Mosquitto],
    persistence_dir: Path,
) -> None:
    """Every envelope approved before, during and after a broker outage reaches the NOC, in order.

    Proven: (1) from the agent's own database after it stops, the seqs delivered
    (ledger) and those still queued (outbox) are exactly 1..last_seq, disjoint,
    so the gate approved nothing that was lost; (2) every seq approved while the
    broker was down (5 or more, forced with `collect`) is among the delivered;
    (3) the NOC received every delivered envelope, including those published
    while it was itself disconnected: the broker keeps its persistent session
    (MQTT 3.1.1, clean_session false) on disk across the restart; (4) per class,
    seqs first reached the NOC in increasing order.
    """
    broker = broker_factory(
        extra_config=f"persistence true\npersistence_location {persistence_dir}/\n"
    )
    with NocListener(broker, persistent=True) as noc:
        agent = AgentProcess(tmp_path, agent_config(tmp_path, pki, broker))
        try:
            agent.start()
            sock = agent.socket_path
            wait_for(lambda: len(noc.envelopes("health")) >= 2, timeout=15, what="2 envelopes")

            broker.stop()
            wait_for(
                lambda: agent.status()["uplink"]["state"] != "connected",
                what="the agent to notice the outage",
            )
            first_down = agent.status()["gate"]["last_seq"] + 1
            for _ in range(5):
                seq = agent.status()["gate"]["last_seq"]
                control.request(sock, "collect", collector="health")
                wait_for(
                    lambda s=seq: agent.status()["gate"]["last_seq"] > s,  # type: ignore[misc]
                    what="a collection while the broker is down",
                )
            status = agent.status()
            last_down = status["gate"]["last_seq"]
            assert last_down - first_down + 1 >= 5
            assert status["outbox"]["queued"] >= 5
            assert status["uplink"]["state"] != "connected"

            broker.start()
            wait_for(
                lambda: agent.status()["outbox"]["delivered"] >= last_down,
                timeout=20,
                what="the backlog to drain after the broker came back",
            )
            code, _ = agent.stop()
            assert code == 0
        finally:
            agent.close()

        delivered, queued, last_seq = read_db(agent.state_dir)
        delivered_seqs = [d["seq"] for d in delivered]
        assert len(set(delivered_seqs)) == len(delivered_seqs), "a seq delivered twice"
        assert set(delivered_seqs).isdisjoint(queued)
        assert set(delivered_seqs) | set(queued) == set(range(1, last_seq + 1))
        assert set(range(first_down, last_down + 1)) <= set(delivered_seqs)

        want = {d["id"] for d in delivered}
        wait_for(
            lambda: want <= {e["id"] for e in noc.envelopes()},
            timeout=15,
            interval=0.1,
            what="the NOC to receive every delivered envelope",
        )
        for data_class in {d["class"] for d in delivered}:
            order = first_arrivals(noc, data_class)
            assert order == sorted(order), f"{data_class} out of order: {order}"
        assert agent.ctl("audit", "verify").returncode == 0


def test_kill_9_mid_backlog_loses_nothing(
    tmp_path: Path, pki: PKI, broker_factory: Callable[..., Mosquitto]
) -> None:
    """kill -9 while draining a backlog: after restart all arrives; duplicates only in the window.

    Proven: every envelope of a 3,000-envelope backlog (and every one the ledger
    says was delivered) reaches the NOC, the number of repeated ids is at most
    max_inflight (10), the ledger never records one id twice, and its chain
    survives the kill.
    """
    window, backlog = 10, 3000
    broker = broker_factory()
    with NocListener(broker) as noc:
        agent = AgentProcess(tmp_path, agent_config(tmp_path, pki, broker, max_inflight=window))
        try:
            ids = prefill(agent.state_dir, backlog)
            agent.start()
            wait_for(
                lambda: delivered_count(agent.state_dir) >= 600,
                timeout=20,
                interval=0.005,
                what="a fifth of the backlog delivered",
            )
            assert agent.proc is not None
            agent.proc.kill()
            agent.proc.wait(10)
            at_kill = delivered_count(agent.state_dir)
            assert at_kill < backlog, "the backlog drained before the kill: make it bigger"

            agent.start()
            wait_for(
                lambda: set(ids) <= {e["id"] for e in noc.envelopes()},
                timeout=30,
                interval=0.25,  # each poll parses every message received so far
                what="the whole backlog at the NOC",
            )
            wait_for(lambda: agent.status()["outbox"]["queued"] == 0, what="an empty outbox")
            agent.stop()
        finally:
            agent.close()

    delivered, _, _ = read_db(agent.state_dir)
    ledger_ids = [d["id"] for d in delivered]
    assert len(ledger_ids) == len(set(ledger_ids)), "the ledger records an id twice"
    assert set(ids) <= set(ledger_ids)
    received = Counter(e["id"] for e in noc.envelopes())
    assert set(ledger_ids) <= set(received)
    repeats = sum(c - 1 for c in received.values())
    assert repeats <= window, f"{repeats} repeated ids; at most the window of {window} expected"
    assert agent.ctl("audit", "verify").returncode == 0
