"""``noc send``: the command goes out, the box's reply comes back matched by its id.

The box is a simulated agent running the agent's real uplink session and its
real command handler (allow-list, ages, replays); the NOC side is the real
``noc`` command line, as a subprocess, with a real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import yaml

from tests.support.agents import SimFleet
from tests.support.mosquitto import Mosquitto
from tests.support.nocservice import REPO, noc_settings
from tests.support.pki import PKI

pytestmark = pytest.mark.integration


def noc_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "noc", "-c", str(config), *args],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip


def test_send_gets_the_reply_with_its_id_and_records_it(
    pki: PKI, broker: Mosquitto, noc_dsn: str, tmp_path: Path
) -> None:
    """noc send ping: the reply with the command's id is printed and recorded with the sender;
    a command the NOC does not allow is refused before it leaves; a box that is not connected
    times out with exit 69."""
    config = tmp_path / "noc.yaml"
    config.write_text(yaml.safe_dump(noc_settings(pki, broker, noc_dsn)))

    async def scenario() -> tuple[
        subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]
    ]:
        fleet = SimFleet.make(pki.issue, pki.ca_file, broker.port, ["pbx-cmd-1"])
        try:
            fleet.start()
            await fleet.wait(fleet.all_connected, 15, "the box connected")
            ping = await asyncio.to_thread(
                noc_cli, config, "send", "pbx-cmd-1", "ping", "--as", "ops"
            )
            narrow = await asyncio.to_thread(
                noc_cli, config, "send", "pbx-cmd-1", "narrow", "class=config"
            )
            return ping, narrow
        finally:
            await fleet.close()

    ping, narrow = asyncio.run(scenario())
    assert ping.returncode == 0, ping.stderr
    reply = json.loads(ping.stdout)
    assert reply["ok"] is True and "pong" in reply["result"]
    assert narrow.returncode == 0, narrow.stderr
    assert json.loads(narrow.stdout)["result"]["narrowed"] == "config"
    with psycopg.connect(noc_dsn) as conn:
        rows = conn.execute("SELECT id, cmd, sent_by, ok FROM commands ORDER BY sent_at").fetchall()
    assert [(r[1], r[2], r[3]) for r in rows] == [
        ("ping", "cli:ops", True),
        ("narrow", rows[1][2], True),
    ]
    assert rows[0][0] == reply["id"]

    refused = noc_cli(config, "send", "pbx-cmd-1", "uplink_on")
    assert refused.returncode == 64 and "not allowed" in refused.stderr
    silent = noc_cli(config, "send", "pbx-nobody", "ping", "--timeout", "1")
    assert silent.returncode == 69 and "no reply from pbx-nobody" in silent.stderr


def test_command_arguments_are_checked_before_anything_leaves() -> None:
    """The NOC's allow-list: support.connect takes ports (NAME:PORT,…), ticket and key;
    anything else, a bad port or a missing required argument is a usage error."""
    from noc.commands import make_command, parse_args
    from noc.errors import UsageError

    words = ["ticket=T-4711", "ports=ssh:40022,https:40443", "key=ssh-ed25519 AAAA eng@noc"]
    cmd = make_command("support.connect", parse_args(words))
    assert cmd["cmd"] == "support.connect" and cmd["v"] == 1
    assert cmd["args"] == {
        "ticket": "T-4711",
        "ports": {"ssh": 40022, "https": 40443},
        "key": "ssh-ed25519 AAAA eng@noc",
    }
    assert make_command("support.disconnect")["args"] == {}
    assert make_command("collect", {"collector": "config"})["args"] == {"collector": "config"}
    for bad_cmd, args in (
        ("support.connect", {"ticket": "T-1"}),  # no ports
        ("support.connect", {"ports": "ssh:0"}),
        ("support.connect", {"ports": "ssh:x"}),
        ("support.connect", {"ports": "ssh"}),
        ("support.connect", {"ports": "ssh:22", "host": "evil.example"}),  # never an address
        ("support.disconnect", {"ticket": "T-1"}),
        ("collect", {}),
        ("uplink", {"state": "on"}),
    ):
        with pytest.raises(UsageError):
            make_command(bad_cmd, args)
