"""A full state disk, for real: a small tmpfs under the daemon, filled with dd while it works.

The daemon, mosquitto with mutual TLS, the NOC subscriber and the byte-counting
relay are all real; the fault is the kernel's ENOSPC. What must hold: the
switch works at once and says it is not persisted; delivery pauses instead of
reconnecting and re-sending; records that cannot be stored take no seq and are
counted; and when space returns, everything stored is delivered and the
account (ledger, seqs) is whole. Skipped with a message where mounting a
tmpfs is not permitted (not root).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import PolicyConfig
from agent.errors import EX_CANTCREAT, StateError
from agent.ledger import Ledger
from agent.ledger import read as ledger_read
from agent.ledger import verify as ledger_verify
from agent.outbox import Outbox
from agent.policy.classes import DataClass, Record
from agent.policy.gate import Gate
from agent.store import db_path, open_db
from agent.switch import read_switch, switch_path
from tests.support.backlog import prefill
from tests.support.daemon import AgentProcess, base_config, wait_for
from tests.support.faults import MountUnavailable, Tmpfs
from tests.support.mosquitto import Mosquitto
from tests.support.noc import NocListener
from tests.support.payload import incompressible
from tests.support.pki import PKI
from tests.support.relay import Relay

pytestmark = pytest.mark.integration
DEVICE = "pbx-test-1"
WINDOW = 20


def agent_config(root: Path, pki: PKI, port: int) -> dict[str, Any]:
    """Health every second, an uplink to localhost:``port``, quick reconnects, a small window."""
    creds = pki.device(DEVICE)
    cfg = base_config(root)
    cfg["uplink"] = {
        "broker": f"mqtts://localhost:{port}",
        "ca_file": str(pki.ca_file),
        "cert_file": str(creds.cert),
        "key_file": str(creds.key),
        "heartbeat": "30s",
        "reconnect_max": "1s",
        "connect_timeout": "5s",
        "max_inflight": WINDOW,
    }
    return cfg


@pytest.fixture
def state_fs(tmp_path: Path) -> Iterator[Tmpfs]:
    """A 16 MiB tmpfs mounted on the daemon's state directory (tmp_path/state)."""
    try:
        with Tmpfs(tmp_path / "state", size="16m") as fs:
            yield fs
    except MountUnavailable as exc:
        pytest.skip(f"cannot inject a full disk here: {exc}")


@pytest.fixture
def persistence_dir() -> Iterator[Path]:
    """A folder the broker (running as the mosquitto user) may keep its persistence in."""
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


def read_db(state_dir: Path) -> tuple[list[dict[str, Any]], list[int], dict[str, Any]]:
    """The ledger's entries, the seqs still queued and the meta table (read-only)."""
    conn = sqlite3.connect(f"file:{db_path(state_dir)}?mode=ro", uri=True, timeout=5)
    try:
        ledger = [
            {"kind": k, **json.loads(d)}
            for k, d in conn.execute("SELECT kind, data FROM ledger ORDER BY n")
        ]
        queued = [int(s) for (s,) in conn.execute("SELECT seq FROM outbox ORDER BY seq")]
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        return ledger, queued, meta
    finally:
        conn.close()


def test_outbox_on_a_full_disk_refuses_counts_and_recovers(state_fs: Tmpfs) -> None:
    """A put the disk refuses raises StateError and is counted; once space returns the next
    put succeeds (no transaction was left open), and the ledger says how many were dropped."""
    conn, _ = open_db(state_fs.path)
    try:
        ledger = Ledger(conn)
        outbox = Outbox(conn, ledger, max_bytes=1 << 30)
        gate = Gate(policy=PolicyConfig(), switch_on=lambda: True, last_seq=0)
        outbox.put(gate.approve(Record(DataClass.HEALTH, {"i": 0})))
        state_fs.fill()
        errors: list[str] = []
        for i in range(1, 200):  # enough to outgrow whatever space SQLite already holds
            envelope = gate.approve(
                Record(DataClass.HEALTH, {"i": i, "pad": incompressible(2000, i)})
            )
            try:
                outbox.put(envelope)
            except StateError as exc:
                errors.append(str(exc))
                gate.withdraw(envelope)
        refused = len(errors)
        assert refused > 0
        assert all("disk is full" in e for e in errors)
        assert not conn.in_transaction
        assert outbox.stats()["unstored"] == refused
        state_fs.free()
        stored = gate.approve(Record(DataClass.HEALTH, {"i": "after"}))
        outbox.put(stored)
        assert stored.seq == outbox.last_seq == 200 - refused + 1  # no seq was skipped
        drops = list(ledger_read(conn, kind="dropped"))
        assert [d.data["count"] for d in drops] == [refused]
        assert "not stored" in drops[0].data["reason"]
        assert ledger_verify(conn).ok
    finally:
        conn.close()


def paused(agent: AgentProcess) -> dict[str, Any] | None:
    """The status when the uplink is connected with deliveries paused, else None."""
    s = agent.status()
    up = s["uplink"]
    return s if up["state"] == "connected" and up.get("paused") else None


def test_full_disk_pauses_delivery_and_loses_nothing(
    tmp_path: Path,
    state_fs: Tmpfs,
    pki: PKI,
    broker_factory: Callable[..., Mosquitto],
    persistence_dir: Path,
) -> None:
    """A full disk during delivery: one connection, one window out, no gaps; all arrives later.

    Proven: with the disk full while a 2,000-envelope backlog is delivered, the
    session stays connected (1 connect) and pauses; in 5 s the NOC receives at
    most one window of envelopes, each once; health records offered meanwhile
    are refused, counted as not stored, and take no seq. When the space is
    freed, the backlog drains by itself, every envelope reaches the NOC at most
    twice, the delivered and queued seqs are exactly 1..last_seq, a "dropped"
    entry ledgers the records not stored, and the chain verifies.
    """
    backlog = prefill(state_fs.path, 2000)
    broker = broker_factory(
        extra_config=f"persistence true\npersistence_location {persistence_dir}/\n"
    )
    with NocListener(broker, persistent=True) as noc:
        broker.stop()
        agent = AgentProcess(tmp_path, agent_config(tmp_path, pki, broker.port))
        try:
            agent.start()
            state_fs.fill()
            assert state_fs.free_bytes() < 64 * 1024
            seq_at_fill = agent.status()["gate"]["last_seq"]
            broker.start()
            status = wait_for(lambda: paused(agent), timeout=20, what="deliveries paused")
            assert "disk is full" in status["uplink"]["paused"]
            assert status["uplink"]["connects"] == 1
            wait_for(
                lambda: agent.status()["gate"]["refused"].get("health:not-stored", 0) >= 3,
                what="health records refused as not stored",
            )
            time.sleep(5)  # the episode: any reconnect loop or re-send would show in it
            status = agent.status()
            assert status["uplink"]["connects"] == 1, status["uplink"]
            assert status["uplink"]["state"] == "connected"
            assert status["gate"]["last_seq"] == max(seq_at_fill, 2000)
            unstored = status["outbox"]["unstored"]
            assert unstored >= 3
            assert "disk is full" in status["outbox"]["store_error"]
            human = agent.ctl("status").stdout
            assert "deliveries paused" in human and "could not be stored" in human
            during = Counter(e["id"] for e in noc.envelopes("health"))
            assert sum(during.values()) <= WINDOW, f"{sum(during.values())} publishes while full"
            assert max(during.values(), default=1) == 1

            state_fs.free()
            wait_for(
                lambda: agent.status()["outbox"]["queued"] == 0,
                timeout=30,
                what="the backlog to drain once space returned",
            )
            wait_for(
                lambda: set(backlog) <= {e["id"] for e in noc.envelopes()},
                timeout=15,
                interval=0.2,
                what="the whole backlog at the NOC",
            )
            final = agent.status()
            assert final["uplink"]["connects"] == 1
            assert final["uplink"]["paused"] is None
            code, _ = agent.stop()
            assert code == 0
        finally:
            agent.close()
        copies = Counter(e["id"] for e in noc.envelopes())

    assert max(copies.values()) <= 2, copies.most_common(3)
    ledger, queued, meta = read_db(state_fs.path)
    delivered = [e["seq"] for e in ledger if e["kind"] == "delivered"]
    assert len(delivered) == len(set(delivered))
    last_seq = int(meta["last_seq"])
    assert sorted(delivered + queued) == list(range(1, last_seq + 1)), "a gap in seq"
    drops = [e for e in ledger if e["kind"] == "dropped" and "not stored" in e["reason"]]
    assert sum(d["count"] for d in drops) >= unstored
    assert agent.ctl("audit", "verify").returncode == 0


def test_switch_off_with_a_full_disk(
    tmp_path: Path,
    state_fs: Tmpfs,
    pki: PKI,
    broker_factory: Callable[..., Mosquitto],
) -> None:
    """`uplink off` on a full disk during delivery: exit 0 in under 1 s, then 0 bytes.

    Proven: the reply comes in under a second with a warning that the switch is
    not persisted; the byte-counting relay sees the connection closed and not
    one byte more, through a switch-file poll that re-reads the stale "on" and
    a refused `uplink on` (exit 73, stays off). Status says "off (not
    persisted: ...)". When space returns the daemon writes "off" by itself and
    ledgers the flip, and a restart keeps the uplink off.
    """
    prefill(state_fs.path, 2000)
    broker = broker_factory()
    broker.stop()
    with Relay(broker.host, broker.port) as relay:
        agent = AgentProcess(tmp_path, agent_config(tmp_path, pki, relay.port))
        try:
            # A switch file that says "on", so that a later poll has something stale to read.
            assert agent.ctl("uplink", "on").returncode == 0
            agent.start()
            state_fs.fill()
            broker.start()
            wait_for(lambda: paused(agent), timeout=20, what="delivering, paused by the disk")
            assert agent.status()["outbox"]["queued"] > 1000

            t0 = time.monotonic()
            off = agent.ctl("uplink", "off")
            took = time.monotonic() - t0
            assert off.returncode == 0, off.stderr
            assert took < 1.0, f"`uplink off` took {took:.2f} s"  # interpreter start included
            print(f"uplink off with a full disk: {took * 1000:.0f} ms")
            assert "not persisted" in off.stdout
            assert "could not be written" in off.stderr
            assert relay.wait_closed(0.25)
            after = relay.bytes_up

            os.utime(switch_path(state_fs.path))  # the poll re-reads the file: still "on"
            assert read_switch(state_fs.path).on
            on = agent.ctl("uplink", "on")
            assert on.returncode == EX_CANTCREAT, on.stdout + on.stderr
            assert "stays off" in on.stderr
            wait_for(
                lambda: any(
                    e.get("event") == "switch_off_not_persisted" for e in agent.log_events()
                ),
                what="the failed write logged",
            )
            time.sleep(2.5)  # two polls of the switch file: any reconnect would show here
            status = agent.status()
            assert status["switch"]["state"] == "off"
            assert status["switch"]["persisted"] is False
            assert "off (not persisted: " in agent.ctl("status").stdout
            assert relay.bytes_up == after
            assert relay.connections == 0

            state_fs.free()
            wait_for(lambda: not read_switch(state_fs.path).on, what="off written once space came")
            wait_for(lambda: agent.status()["switch"]["persisted"], what="status: persisted")
            audit = agent.ctl("audit", "--kind", "switch", "--json")
            states = [json.loads(line)["state"] for line in audit.stdout.splitlines()]
            assert states[-1] == "off"
            agent.stop()
            agent.start()
            assert agent.status()["switch"]["state"] == "off"
            time.sleep(1.0)  # a moment in which a reconnect after the restart would show
            assert relay.bytes_up == after
        finally:
            agent.close()
