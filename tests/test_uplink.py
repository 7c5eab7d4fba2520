"""The way out, end to end: daemon → gate → outbox → mTLS MQTT → a real mosquitto → the NOC."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import control
from tests.support import signing
from tests.support.daemon import AgentProcess, base_config, wait_for
from tests.support.mosquitto import Mosquitto
from tests.support.noc import NocListener
from tests.support.pki import PKI
from tests.support.relay import Relay

pytestmark = pytest.mark.integration
DEVICE = "pbx-test-1"


def uplink_config(root: Path, pki: PKI, host: str, port: int, **uplink: Any) -> dict[str, Any]:
    """A daemon configuration with an uplink to ``host:port`` as pbx-test-1."""
    creds = pki.device(DEVICE)
    cfg = base_config(root)
    cfg["uplink"] = {
        "broker": f"mqtts://{host}:{port}",
        "ca_file": str(pki.ca_file),
        "cert_file": str(creds.cert),
        "key_file": str(creds.key),
        "command_root": str(signing.root_pub()),
        "heartbeat": "30s",
        "reconnect_max": "2s",
        "connect_timeout": "5s",
        **uplink,
    }
    return cfg


@pytest.fixture
def noc(broker: Mosquitto) -> Iterator[NocListener]:
    """The NOC, subscribed to everything under pbx/."""
    with NocListener(broker) as n:
        yield n


@pytest.fixture
def agent(tmp_path: Path, pki: PKI, broker: Mosquitto) -> Iterator[AgentProcess]:
    """A daemon connected to the session broker (not started)."""
    a = AgentProcess(tmp_path, uplink_config(tmp_path, pki, "localhost", broker.port))
    yield a
    a.close()


def connected(agent: AgentProcess) -> bool:
    """Whether the daemon says its uplink is connected."""
    return bool(agent.status()["uplink"]["state"] == "connected")


def test_health_round_trip_and_ledger(agent: AgentProcess, noc: NocListener) -> None:
    """Health envelopes reach the NOC in the v1 shape, and each one is in the ledger."""
    agent.start()
    wait_for(lambda: len(noc.envelopes("health")) >= 2, timeout=15, what="two health envelopes")
    env = noc.envelopes("health")[0]
    # Health travels compressed with its dictionary; the test NOC decoded "body" for us.
    assert set(env) == {"v", "id", "ts", "class", "seq", "enc", "zdict", "body"}
    assert (env["enc"], env["zdict"]) == ("zlib+base64", "health/1")
    assert env["v"] == 1
    assert env["class"] == "health"
    assert "cpu" in env["body"] and "agent" in env["body"]
    assert "online" in noc.statuses(DEVICE)
    got = {e["id"] for e in noc.envelopes()}
    wait_for(lambda: agent.status()["outbox"]["queued"] == 0, what="an empty outbox")
    audit = agent.ctl("audit", "--kind", "delivered", "--json")
    ledgered = {json.loads(line)["id"] for line in audit.stdout.splitlines()}
    assert got <= ledgered
    verify = agent.ctl("audit", "verify")
    assert verify.returncode == 0, verify.stdout
    assert "chain intact" in verify.stdout


def test_orderly_stop_says_offline(agent: AgentProcess, noc: NocListener) -> None:
    """SIGTERM leaves the retained status at offline, within the stop budget."""
    agent.start()
    wait_for(lambda: "online" in noc.statuses(DEVICE), timeout=15, what="online")
    code, took = agent.stop()
    assert code == 0
    assert took < 5
    wait_for(lambda: noc.statuses(DEVICE)[-1] == "offline", what="offline")


def test_switch_cuts_every_byte(
    tmp_path: Path, pki: PKI, broker: Mosquitto, noc: NocListener
) -> None:
    """After `uplink off` returns, the relay sees the connection closed and zero more bytes."""
    with Relay(broker.host, broker.port) as relay:
        a = AgentProcess(tmp_path, uplink_config(tmp_path, pki, "localhost", relay.port))
        try:
            a.start()
            wait_for(lambda: connected(a), timeout=15, what="connected")
            out = a.ctl("uplink", "off")
            assert out.returncode == 0, out.stderr
            assert relay.wait_closed(0.25)
            before = relay.bytes_up
            assert "severed" in [m for m in noc.statuses(DEVICE)] or wait_for(
                lambda: "severed" in noc.statuses(DEVICE), what="severed"
            )
            # Gathering goes on being refused while off; nothing reaches the relay.
            control.request(a.socket_path, "collect", collector="health")
            wait_for(
                lambda: a.status()["gate"]["refused"].get("health:switch-off", 0) >= 1,
                what="a refusal",
            )
            time.sleep(0.5)  # a window in which any stray byte would show
            assert relay.bytes_up == before
            assert relay.connections == 0
            on = a.ctl("uplink", "on")
            assert on.returncode == 0
            wait_for(lambda: connected(a), timeout=10, what="reconnected")
        finally:
            a.close()


def test_fifty_flips_under_load(tmp_path: Path, pki: PKI, broker: Mosquitto) -> None:
    """Across 50 off/on flips while collecting, every off leaves zero bytes and no connection."""
    with Relay(broker.host, broker.port) as relay:
        cfg = uplink_config(tmp_path, pki, "localhost", relay.port)
        cfg["collectors"]["health"] = {"interval": "1s"}
        a = AgentProcess(tmp_path, cfg)
        try:
            a.start()
            sock = a.socket_path
            for i in range(50):
                wait_for(
                    lambda: (
                        control.request(sock, "uplink-status")["uplink"]["state"] == "connected"
                    ),
                    timeout=10,
                    what=f"connected before flip {i}",
                )
                control.request(sock, "collect", collector="health")
                control.request(sock, "uplink", state="off")
                # The agent closed its socket before replying; the relay's thread notices the
                # EOF a moment later, so allow it that moment and no more.
                assert relay.wait_closed(0.25), f"flip {i}: connection still open"
                frozen = relay.bytes_up
                control.request(sock, "collect", collector="health")
                time.sleep(0.02)
                assert relay.bytes_up == frozen, f"flip {i}: bytes after off"
                control.request(sock, "uplink", state="on")
            assert a.proc is not None and a.proc.poll() is None
        finally:
            a.close()


def test_nothing_gathered_while_off_is_sent_later(agent: AgentProcess, noc: NocListener) -> None:
    """Records refused while the switch is off never reach the NOC after it is turned on."""
    agent.start()
    wait_for(lambda: noc.envelopes("health"), timeout=15, what="a first envelope")
    agent.ctl("uplink", "off")
    off_at = time.time()
    wait_for(lambda: agent.status()["collectors"]["health"]["refused"] >= 2, what="refusals")
    on_at = time.time()
    agent.ctl("uplink", "on")
    wait_for(
        lambda: any(e["ts"] > _iso(on_at) for e in noc.envelopes("health")),
        timeout=15,
        what="an envelope after on",
    )
    assert not [e for e in noc.envelopes() if _iso(off_at) < e["ts"] < _iso(on_at)]


def _iso(t: float) -> str:
    from agent.policy.gate import iso_now

    return iso_now(t)


def test_refuses_broker_with_wrong_host_name(tmp_path: Path, pki: PKI, broker: Mosquitto) -> None:
    """Reaching the broker under a name its certificate lacks fails the host name check."""
    a = AgentProcess(tmp_path, uplink_config(tmp_path, pki, "127.0.0.2", broker.port))
    try:
        a.start()
        st = wait_for(
            lambda: (s := a.status()["uplink"])["last_error"] and s,
            timeout=15,
            what="an uplink error",
        )
        assert st["state"] != "connected"
        assert "host" in st["last_error"].lower() or "127.0.0.2" in st["last_error"]
    finally:
        a.close()


def test_refuses_loose_key(tmp_path: Path, pki: PKI, broker: Mosquitto) -> None:
    """A key file readable by others stops the uplink with a message naming the file."""
    creds = pki.device(DEVICE)
    key = tmp_path / "device.key"
    key.write_bytes(creds.key.read_bytes())
    key.chmod(0o644)
    cfg = uplink_config(tmp_path, pki, "localhost", broker.port, key_file=str(key))
    a = AgentProcess(tmp_path, cfg)
    try:
        a.start()
        st = wait_for(
            lambda: (s := a.status()["uplink"])["last_error"] and s,
            timeout=15,
            what="an uplink error",
        )
        assert str(key) in st["last_error"]
        assert "chmod 600" in st["last_error"]
    finally:
        a.close()


def test_commands(agent: AgentProcess, noc: NocListener) -> None:
    """Allowed commands answer; hostile ones get an error reply and a ledger entry."""
    agent.start()
    wait_for(lambda: "online" in noc.statuses(DEVICE), timeout=15, what="online")
    now = time.time()
    noc.send(DEVICE, {"v": 1, "id": "c1", "ts": now, "cmd": "ping", "args": {}})
    noc.send(DEVICE, {"v": 1, "id": "c1", "ts": now, "cmd": "ping", "args": {}})  # replay
    noc.send(DEVICE, {"v": 1, "id": "c2", "ts": now - 3600, "cmd": "ping"})  # too old
    noc.send(DEVICE, {"v": 1, "id": "c3", "ts": now, "cmd": "uplink_on"})
    noc.send(DEVICE, b"\xff\xfenot json")
    noc.send(DEVICE, {"v": 1, "id": "c4", "ts": now, "cmd": "narrow", "args": {"class": "health"}})
    noc.send(DEVICE, {"v": 1, "id": "c5", "ts": now, "cmd": "policy"})
    # What a broker could forward on its own: unsigned, and signed for another box.
    unsigned = {"v": 1, "id": "c6", "ts": now, "cmd": "narrow", "args": {"class": "config"}}
    noc.send(DEVICE, json.dumps(unsigned).encode())
    noc.send(DEVICE, signing.signed_bytes({**unsigned, "id": "c7"}, "pbx-test-2"))
    wait_for(lambda: len(noc.replies(DEVICE)) >= 9, timeout=15, what="nine replies")
    replies = noc.replies(DEVICE)
    by_id: dict[Any, list[dict[str, Any]]] = {}
    for r in replies:
        by_id.setdefault(r["id"], []).append(r)
    assert by_id["c1"][0]["ok"] is True
    assert by_id["c1"][1]["ok"] is False and "replay" in by_id["c1"][1]["error"]
    assert "too old" in by_id["c2"][0]["error"]
    assert "not allowed" in by_id["c3"][0]["error"]
    assert by_id[None][0]["ok"] is False
    assert by_id["c4"][0]["result"]["effective"] == ["callstats", "config"]
    assert by_id["c5"][0]["result"]["narrowed"] == ["health"]
    assert "not signed" in by_id["c6"][0]["error"]
    assert "not for this box" in by_id["c7"][0]["error"]
    status = agent.status()
    assert status["policy"]["effective"] == ["callstats", "config"]
    assert status["switch"]["state"] == "on"
    assert status["uplink"]["commands"]["signing"]["command_key"]["kid"] == "test-ck"
    audit = agent.ctl("audit", "--kind", "command", "--json")
    assert len(audit.stdout.splitlines()) == 9
    human = agent.ctl("status").stdout
    assert "NOC commands: signed by a key of root SHA256:" in human, human


def test_off_right_after_connect_never_hangs(tmp_path: Path, pki: PKI, broker: Mosquitto) -> None:
    """`uplink off` the instant the link comes up still closes it promptly, every time."""
    with Relay(broker.host, broker.port) as relay:
        a = AgentProcess(tmp_path, uplink_config(tmp_path, pki, "localhost", relay.port))
        try:
            a.start()
            sock = a.socket_path
            for i in range(20):
                relay.wait_connections(1, timeout=10)
                t0 = time.monotonic()
                control.request(sock, "uplink", state="off", timeout=5)
                assert time.monotonic() - t0 < 3, f"flip {i}: off took too long"
                assert relay.wait_closed(0.25), f"flip {i}: connection still open"
                control.request(sock, "uplink", state="on")
        finally:
            a.close()
