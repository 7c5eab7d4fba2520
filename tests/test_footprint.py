"""The idle daemon, started as a user starts it with the shipped defaults, pays only for what runs.

One daemon for the module (``etc/agent.yaml`` as shipped, an uplink to the test
broker through a byte-counting relay, a copy of the sample PBX tree as its
roots and CDR file), shared by the tests below: it is the expensive part.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import control, switch
from tests.support.daemon import AgentProcess, base_config, shipped_config, wait_for
from tests.support.mosquitto import Mosquitto
from tests.support.pki import PKI
from tests.support.relay import Relay

#: Libraries an idle daemon with the shipped configuration must not hold: validation-only
#: (cryptography and what it drags in), optional sources and tunnels (PyMySQL, paramiko),
#: the vendor's side (the NOC, its database and web libraries, aiomqtt).
HEAVY = (
    "cryptography",
    "pymysql",
    "paramiko",
    "bcrypt",
    "nacl",
    "cffi",
    "noc",
    "psycopg",
    "psycopg_pool",
    "aiomqtt",
    "selenium",
)


class Idle:
    """The shared daemon and its relay."""

    def __init__(self, agent: AgentProcess, relay: Relay) -> None:
        self.agent = agent
        self.relay = relay

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """One control request, answered."""
        return dict(control.request(self.agent.socket_path, cmd, **args))

    def connected(self) -> bool:
        """The uplink says it is connected."""
        return bool(self.request("uplink-status")["uplink"]["state"] == "connected")


@pytest.fixture(scope="module")
def idle(pki: PKI, broker: Mosquitto) -> Iterator[Idle]:
    """The shipped configuration, started with ``agentctl run``, connected and settled."""
    root = Path(tempfile.mkdtemp(prefix="pbx-footprint-"))
    creds = pki.device("pbx-test-1")
    with Relay(broker.host, broker.port) as relay:
        cfg = shipped_config(
            root, broker_port=relay.port, ca=pki.ca_file, cert=creds.cert, key=creds.key
        )
        agent = AgentProcess(root, cfg)
        try:
            agent.start()
            it = Idle(agent, relay)
            wait_for(it.connected, timeout=15, what="uplink connected")

            def every_collector_ran() -> bool:
                runs = it.request("status")["collectors"]
                return all(r["last_ok"] is not None for r in runs.values())

            wait_for(every_collector_ran, timeout=15, what="every collector's first run")
            yield it
        finally:
            agent.close()
            shutil.rmtree(root, ignore_errors=True)


def test_idle_daemon_holds_no_heavy_library(idle: Idle) -> None:
    """After start-up, a first run of every collector and a connected uplink, the daemon
    has imported none of the validation-only, optional or vendor-side libraries."""
    status = idle.request("status")
    loaded = status["daemon"]["loaded"]
    assert set(status["collectors"]) == {"health", "config", "callstats"}
    assert status["uplink"]["connects"] >= 1
    assert "paho" in loaded["libraries"]  # the list is real: the MQTT library is there
    assert [h for h in HEAVY if h in loaded["libraries"]] == []
    # The AMI client (no pbx.ami), the MariaDB source (a CSV source), the tunnel: absent.
    assert loaded["optional"] == []


def _flip_file(state_dir: Path, on: bool) -> None:
    """Change the switch as ``agentctl`` does when it cannot reach the daemon: the file."""
    switch.write_switch(state_dir, on, uid=os.getuid(), via="agentctl")


def test_switch_file_flip_is_seen_through_inotify(idle: Idle) -> None:
    """The daemon learns of a switch file written behind its back from inotify (no poll),
    severs the uplink on `off` and reconnects on `on`."""
    assert idle.request("status")["daemon"]["switch_watch"] == "inotify"
    state = idle.agent.state_dir
    _flip_file(state, False)
    wait_for(
        lambda: idle.request("uplink-status")["uplink"]["state"] == "severed",
        timeout=5,
        what="severed after the file said off",
    )
    assert idle.relay.wait_closed(5)
    _flip_file(state, True)
    wait_for(idle.connected, timeout=15, what="connected again after the file said on")


def test_switch_file_flip_is_seen_by_the_poll_without_inotify() -> None:
    """Where inotify is not available (here: switched off), the file is polled as before."""
    root = Path(tempfile.mkdtemp(prefix="pbx-poll-"))  # short: the socket path has a limit
    agent = AgentProcess(root, base_config(root))
    try:
        agent.start(env={"PBX_AGENT_INOTIFY": "0"})
        watch = agent.status()["daemon"]["switch_watch"]
        assert watch.startswith("poll"), watch
        _flip_file(agent.state_dir, False)

        def off() -> bool:
            reply = control.request(agent.socket_path, "uplink-status")
            return bool(reply["switch"]["state"] == "off")

        wait_for(off, timeout=5, what="the daemon to read off from the polled file")
    finally:
        agent.close()
        shutil.rmtree(root, ignore_errors=True)


def test_process_names_are_psutils_names(tmp_path: Path) -> None:
    """The health collector's own /proc scan names processes as psutil does, a name the
    kernel cut at 15 characters included (completed from the command line)."""
    import subprocess

    import psutil

    from agent.collectors.health.machine import process_names

    long_name = tmp_path / "pbx-a-rather-long-process-name"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", long_name)
    proc = subprocess.Popen([str(long_name), "30"])
    try:
        wait_for(lambda: psutil.Process(proc.pid).name() == long_name.name, what="started")
        assert long_name.name in process_names()
        mine = psutil.Process().name()
        assert mine in process_names()
    finally:
        proc.kill()
        proc.wait()
