"""Ingest end to end: simulated boxes (the agent's real uplink), the shipped broker
configuration, ``noc ingest`` workers as real processes, a real PostgreSQL.

Each test counts what the boxes' gates approved against what PostgreSQL holds:
exactly once, across workers killed with SIGKILL and a broker restart.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.policy.gate import new_id
from noc.ingest import Worker
from tests.support.agents import SimFleet
from tests.support.nocbroker import NocBroker
from tests.support.nocservice import NocProcess, noc_config, noc_settings
from tests.support.pki import PKI

pytestmark = pytest.mark.integration


@pytest.fixture
def noc_broker(pki: PKI) -> Iterator[NocBroker]:
    """mosquitto with the shipped configuration, persistent sessions and all."""
    b = NocBroker(pki)
    b.start()
    try:
        yield b
    finally:
        b.close()


def count(dsn: str, sql: str, *args: Any) -> Any:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(sql, args).fetchone()
        assert row is not None
        return row[0]


def approved_ids(fleet: SimFleet) -> dict[str, set[str]]:
    """Every envelope id each box's gate approved."""
    return {a.device_id: set(a.approved) for a in fleet.agents}


def stored_ids(dsn: str) -> dict[str, list[str]]:
    with psycopg.connect(dsn) as conn:
        out: dict[str, list[str]] = {}
        for dev, env_id in conn.execute("SELECT device_id, id FROM envelopes"):
            out.setdefault(dev, []).append(env_id)
        return out


def workers(root: Path, data: dict[str, Any], names: list[str]) -> dict[str, NocProcess]:
    """``noc ingest`` processes; the last one also holds the standby session."""
    procs = {
        n: NocProcess(
            root / n,
            data,
            "ingest",
            "--name",
            n,
            *(["--standby"] if n == names[-1] else []),
            name=n,
        )
        for n in names
    }
    for p in procs.values():
        p.start()
    return procs


@pytest.mark.timeout(300)  # 6,100 envelopes, a SIGKILL, a broker restart, on 2 shared cores
def test_exactly_once_across_two_workers_a_kill_and_a_broker_restart(
    pki: PKI, noc_broker: NocBroker, noc_dsn: str, tmp_path: Path
) -> None:
    """Four boxes stream; worker A is SIGKILLed mid-stream and restarted, the broker restarted
    (B holds the standby session that covers mosquitto 2.0 forgetting shared subscriptions):
    every approved envelope is in PostgreSQL exactly once, and no box shows a gap."""
    data = noc_settings(pki, noc_broker, noc_dsn)
    procs = workers(tmp_path, data, ["A", "B"])
    ids = [f"pbx-ex-{i}" for i in range(4)]

    async def scenario() -> dict[str, set[str]]:
        fleet = SimFleet.make(pki.issue, pki.ca_file, noc_broker.port, ids, reconnect_max=2.0)
        try:
            for a in fleet.agents:
                for _ in range(1500):
                    a.put_health()
            # Workers first, so that their sessions exist before the stream starts.
            await asyncio.sleep(0)
            await fleet.wait(
                lambda: all("ingest_connected" in p.log() for p in procs.values()),
                20, "both workers connected", interval=0.2,
            )  # fmt: skip
            fleet.start()

            def stored() -> int:
                return int(count(noc_dsn, "SELECT count(*) FROM envelopes"))

            await fleet.wait(lambda: stored() >= 1000, 30, "a first thousand stored", interval=0.3)
            procs["A"].kill()  # mid-stream: whatever A held unacknowledged is redelivered later
            await fleet.wait(fleet.drained, 60, "every box's outbox drained into the broker")
            await asyncio.to_thread(noc_broker.restart)  # A's queued share must survive it
            for a in fleet.agents:  # a trickle after the restart, through reconnected sessions
                for _ in range(25):
                    a.put_health()
            procs["A"].start()
            await fleet.wait(fleet.drained, 60, "the trickle delivered after the restart")
            await fleet.wait(
                lambda: stored() >= 4 * 1525, 90, "every envelope stored", interval=0.5
            )
            await asyncio.sleep(1.0)  # let any duplicate redelivery land: it must change nothing
            return approved_ids(fleet)
        finally:
            await fleet.close()

    try:
        approved = asyncio.run(scenario())
        got = stored_ids(noc_dsn)
    finally:
        logs = {n: p.log() for n, p in procs.items()}
        for p in procs.values():
            p.stop()

    for dev in ids:
        assert len(approved[dev]) == 1525
        assert sorted(got[dev]) == sorted(approved[dev]), f"{dev}: stored != approved"
    assert count(noc_dsn, "SELECT sum(envelopes) FROM devices") == 4 * 1525
    assert count(noc_dsn, "SELECT sum(missing) FROM devices") == 0
    assert count(noc_dsn, "SELECT count(*) FROM seq_gaps") == 0
    assert count(noc_dsn, "SELECT count(*) FROM health") == 4 * 1525
    # A's restart resumed its persistent session (what the broker kept for it).
    events = [json.loads(line) for line in logs["A"].splitlines() if line.startswith("{")]
    connects = [e for e in events if e["event"] == "ingest_connected"]
    assert [e["session_present"] for e in connects] == [False, True]


@pytest.mark.timeout(300)  # 20,000 envelopes through 50 TLS sessions on 2 shared cores
def test_burst_of_20000_from_50_boxes_lands_complete(
    pki: PKI, noc_broker: NocBroker, noc_dsn: str, tmp_path: Path
) -> None:
    """50 boxes drain 400 envelopes each at full speed into the shipped broker configuration:
    all 20,000 reach PostgreSQL, none dropped by the broker's queue limits."""
    data = noc_settings(pki, noc_broker, noc_dsn)
    procs = workers(tmp_path, data, ["A", "B"])
    ids = [f"pbx-burst-{i:02d}" for i in range(50)]

    async def scenario() -> float:
        fleet = SimFleet.make(pki.issue, pki.ca_file, noc_broker.port, ids)
        try:
            for a in fleet.agents:
                for _ in range(400):
                    a.put_health()
            await fleet.wait(
                lambda: all("ingest_connected" in p.log() for p in procs.values()),
                20, "both workers connected", interval=0.2,
            )  # fmt: skip
            t0 = time.monotonic()
            fleet.start()
            await fleet.wait(fleet.drained, 90, "every box drained")
            await fleet.wait(
                lambda: count(noc_dsn, "SELECT count(*) FROM envelopes") >= 20_000,
                120, "20,000 envelopes stored", interval=0.5,
            )  # fmt: skip
            return time.monotonic() - t0
        finally:
            await fleet.close()

    try:
        seconds = asyncio.run(scenario())
    finally:
        for p in procs.values():
            p.stop()
    assert count(noc_dsn, "SELECT count(*) FROM envelopes") == 20_000
    assert count(noc_dsn, "SELECT count(DISTINCT device_id) FROM envelopes") == 50
    assert count(noc_dsn, "SELECT sum(missing) FROM devices") == 0
    assert "dropped" not in noc_broker.log_text().lower()
    print(f"burst: 20,000 envelopes from 50 boxes stored in {seconds:.1f} s")


def _device_client(pki: PKI, broker: NocBroker, cn: str) -> paho.Client:
    creds = pki.issue(cn)
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=cn, protocol=paho.MQTTv5)
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    ctx.load_cert_chain(creds.cert, creds.key)
    c.tls_set_context(ctx)
    c.connect("localhost", broker.port)
    c.loop_start()
    return c


def test_duplicate_delivery_does_not_double_a_counter(
    pki: PKI, noc_broker: NocBroker, noc_dsn: str
) -> None:
    """The same envelope published twice (the agent's at-least-once) is stored and counted once."""
    worker = Worker(noc_config(noc_settings(pki, noc_broker, noc_dsn)), name="dup")
    worker.start()
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    dev = "pbx-dup-1"
    c = _device_client(pki, noc_broker, dev)
    try:
        assert worker.wait_connected(10)
        env = {"v": 1, "id": new_id(), "ts": "2026-05-01T10:00:00.000Z", "class": "health",
               "seq": 1, "body": {"cpu": {"percent": 3.0}}}  # fmt: skip
        payload = json.dumps(env).encode()
        for _ in range(2):
            c.publish(f"pbx/{dev}/up/health", payload, qos=1).wait_for_publish(5)
        marker = {**env, "id": new_id(), "seq": 2}
        c.publish(f"pbx/{dev}/up/health", json.dumps(marker).encode(), qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 20
        while worker.counters.stored + worker.counters.duplicates < 3:
            assert time.monotonic() < deadline, f"worker counters: {worker.counters}"
            time.sleep(0.05)
    finally:
        c.disconnect()
        c.loop_stop()
        worker.stop()
        thread.join(10)
    assert worker.counters.duplicates == 1
    assert count(noc_dsn, "SELECT envelopes FROM devices WHERE device_id = %s", dev) == 2
    assert count(noc_dsn, "SELECT count(*) FROM health WHERE device_id = %s", dev) == 2


def test_garbage_is_kept_aside_and_the_stream_goes_on(
    pki: PKI, noc_broker: NocBroker, noc_dsn: str
) -> None:
    """A message that is not an envelope lands in rejects with its reason; the next is stored."""
    worker = Worker(noc_config(noc_settings(pki, noc_broker, noc_dsn)), name="bad")
    worker.start()
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    dev = "pbx-bad-1"
    c = _device_client(pki, noc_broker, dev)
    try:
        assert worker.wait_connected(10)
        c.publish(f"pbx/{dev}/up/health", b"\x00not json", qos=1).wait_for_publish(5)
        good = {"v": 1, "id": new_id(), "ts": "2026-05-01T10:00:00.000Z", "class": "health",
                "seq": 1, "body": {}}  # fmt: skip
        c.publish(f"pbx/{dev}/up/health", json.dumps(good).encode(), qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 20
        while count(noc_dsn, "SELECT count(*) FROM envelopes") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        c.disconnect()
        c.loop_stop()
        worker.stop()
        thread.join(10)
    assert count(noc_dsn, "SELECT count(*) FROM rejects") == 1
    assert "not JSON" in count(noc_dsn, "SELECT reason FROM rejects")


def test_a_box_cannot_read_the_fleet_through_a_shared_subscription(
    pki: PKI, noc_broker: NocBroker
) -> None:
    """With the shipped ACL, a box that subscribes to $share/x/pbx/+/up/# receives nothing of
    another box's (mosquitto checks read access on every delivered message's real topic)."""
    got: list[str] = []
    snoop = _device_client(pki, noc_broker, "pbx-snoop")
    snoop.on_message = lambda c, u, m: got.append(m.topic)
    victim = _device_client(pki, noc_broker, "pbx-victim")
    try:
        snoop.subscribe("$share/other/pbx/+/up/#", qos=1)
        snoop.subscribe("pbx/+/up/#", qos=1)
        time.sleep(0.5)  # SUBACKs say granted either way: the proof is what arrives
        for i in range(5):
            env = {"v": 1, "id": new_id(), "ts": "2026-05-01T10:00:00.000Z", "class": "health",
                   "seq": i + 1, "body": {}}  # fmt: skip
            victim.publish(
                "pbx/pbx-victim/up/health", json.dumps(env).encode(), qos=1
            ).wait_for_publish(5)
        own = {"v": 1, "id": new_id(), "ts": "2026-05-01T10:00:00.000Z", "class": "health",
               "seq": 1, "body": {}}  # fmt: skip
        snoop.publish("pbx/pbx-snoop/up/health", json.dumps(own).encode(), qos=1).wait_for_publish(
            5
        )
        deadline = time.monotonic() + 5
        while "pbx/pbx-snoop/up/health" not in got and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for c in (snoop, victim):
            c.disconnect()
            c.loop_stop()
    assert "pbx/pbx-snoop/up/health" in got  # its own subtree arrives: the subscription works
    assert not [t for t in got if "pbx-victim" in t]
