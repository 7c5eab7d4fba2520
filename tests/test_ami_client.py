"""The AMI client and the PBX figures, against a stand-in Asterisk (tests/support/ami_server.py).

Asterisk is not packaged in Debian 12 and cannot run here, so these tests talk
to a server that speaks AMI as Asterisk's manager.c writes it, over a real
loopback TCP connection; its replies are checked against transcripts kept in
tests/fixtures/ami/, each naming the Asterisk source it follows.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from structlog.testing import capture_logs

from agent.collectors.callstats.settings import CallstatsSettings
from agent.collectors.health.ami import (
    ALLOWED_ACTIONS,
    AmiClient,
    AmiError,
    AmiFault,
    backoff_delay,
    parse_message,
)
from agent.collectors.health.pbx import PbxProbe
from agent.collectors.health.settings import AmiSettings
from agent.errors import CollectorError
from tests.support.ami_server import (
    FIXTURES,
    AmiServer,
    PbxModel,
    SipRegistry,
    fixture_text,
    transcript,
)
from tests.support.mosquitto import free_port

T = TypeVar("T")
SECRET = "s3cret-ami-pass"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine on a fresh loop (the client lives and dies inside it)."""
    return asyncio.run(coro)


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    """The AMI secret in a mode-0600 file, as the service user would keep it."""
    p = tmp_path / "ami.secret"
    p.write_text(SECRET + "\n")
    p.chmod(0o600)
    return p


@pytest.fixture
def server() -> Iterator[AmiServer]:
    """A listening stand-in Asterisk with the sample PBX."""
    with AmiServer() as s:
        yield s


def settings(port: int, secret_file: Path, **kw: Any) -> AmiSettings:
    """AMI settings for the stand-in on ``port``."""
    base: dict[str, Any] = {"timeout": 2.0, "reconnect_max": 8.0}
    base.update(kw)
    return AmiSettings(port=port, username="pbx-agent", secret_file=secret_file, **base)


def probe_once(s: AmiSettings, rules: CallstatsSettings | None = None) -> dict[str, Any]:
    """One gather through a fresh probe, closed afterwards."""

    async def go() -> dict[str, Any]:
        p = PbxProbe(s, rules or CallstatsSettings())
        try:
            return await p.gather(now=_NOW)
        finally:
            await p.aclose()

    return run(go())


# 2026-11-28 15:02:40 local: five hours after the sample's reload, 5h47m38s after its start.
_NOW = PbxModel().reload.timestamp() + 3600


@pytest.mark.parametrize(
    ("action", "fixture"),
    [
        ("CoreStatus", "corestatus.txt"),
        ("CoreSettings", "coresettings.txt"),
        ("CoreShowChannels", "coreshowchannels.txt"),
        ("PJSIPShowRegistrationsOutbound", "pjsipshowregistrationsoutbound.txt"),
        ("PJSIPShowEndpoints", "pjsipshowendpoints.txt"),
        ("PJSIPShowContacts", "pjsipshowcontacts.txt"),
        ("QueueSummary", "queuesummary.txt"),
    ],
)
def test_stand_in_speaks_as_the_transcripts(action: str, fixture: str) -> None:
    """The stand-in's reply to each action is the transcript written from Asterisk's source."""
    assert transcript(PbxModel.sample(), action) == fixture_text(fixture)
    assert "Source: Asterisk" in (FIXTURES / fixture).read_text()


def test_chan_sip_transcript() -> None:
    """SIPshowregistry renders as chan_sip's manager_show_registry does."""
    m = PbxModel.sample()
    m.sip_registry = [SipRegistry("sip.oldtelco.example", "+4930555999")]
    assert transcript(m, "SIPshowregistry") == fixture_text("sipshowregistry.txt")


def test_parser_reads_every_transcript() -> None:
    """Every message of every transcript parses to its fields, repeated keys kept."""
    for path in sorted(FIXTURES.glob("*.txt")):
        for block in fixture_text(path.name).split("\r\n\r\n"):
            if not block or block.startswith("Asterisk Call Manager/"):
                continue
            msg = parse_message(block)
            assert "Response" in msg or "Event" in msg, (path.name, block)
    two = parse_message("Event: EndpointList\r\nContacts: a/sip:x,\r\nContacts: b/sip:y,")
    assert two["Contacts"] == "a/sip:x,\nb/sip:y,"
    assert parse_message("Message: a: b")["Message"] == "a: b"


def test_sample_pbx_figures(server: AmiServer, secret_file: Path) -> None:
    """The sample box gives exactly its counts: trunks by name, phones only counted."""
    pbx = probe_once(settings(server.port, secret_file))
    assert pbx["state"] == "ok", pbx
    assert pbx["asterisk"] == {
        "running": True,
        "version": "20.11.0",
        "uptime": int(_NOW - PbxModel().startup.timestamp()),
        "since_reload": 3600,
        "started_at": int(PbxModel().startup.timestamp()),
    }
    assert pbx["calls"] == {
        "processed": 1843,
        "calls": 1,
        "calls_up": 1,
        "channels": 2,
        "channels_up": 2,
    }
    assert pbx["trunks"] == {
        "telco-a": {
            "state": "up",
            "registrations": {"registered": 1},
            "contacts": {"reachable": 1},
            "rtt_ms": 23.5,
            "channels": 1,
        },
        "telco-b": {
            "state": "down",
            "registrations": {},
            "contacts": {"unreachable": 1},
            "rtt_ms": None,
            "channels": 0,
        },
    }
    assert pbx["endpoints"] == {"total": 3, "registered": 1, "unregistered": 1, "unavailable": 1}
    queue = {"logged_in": 3, "available": 2, "callers": 1, "longest_wait": 35}
    assert pbx["queues"] == {"400": queue}
    assert pbx["sections"] == {"SIPshowregistry": "not_loaded"}
    text = json.dumps(pbx)
    for private in ("+4930555123", "Tr4nkP4ss", "Front Desk", "+4930777000", "192.0.2.21", "1001"):
        assert private not in text


def test_trunk_names_follow_the_callstats_rules(server: AmiServer, secret_file: Path) -> None:
    """With an explicit trunk list, unlisted trunks are summed under ``other``, never named."""
    pbx = probe_once(settings(server.port, secret_file), CallstatsSettings(trunks=("telco-a",)))
    assert set(pbx["trunks"]) == {"telco-a", "other"}
    assert pbx["trunks"]["other"]["contacts"] == {"unreachable": 1}


def test_chan_sip_registrations(server: AmiServer, secret_file: Path) -> None:
    """chan_sip registrations count by state under their provider host; the user is not sent."""
    server.model.sip_registry = [
        SipRegistry("sip.oldtelco.example", "+4930555999"),
        SipRegistry("192.0.2.99", "+4930555998", state="Auth. Sent"),
    ]
    pbx = probe_once(settings(server.port, secret_file))
    assert pbx["trunks"]["sip.oldtelco.example"]["registrations"] == {"registered": 1}
    assert pbx["trunks"]["other"]["registrations"] == {"auth_sent": 1}
    assert pbx["trunks"]["other"]["state"] == "down"
    assert "+4930555999" not in json.dumps(pbx)
    assert "SIPshowregistry" not in pbx["sections"]


def test_interleaved_events_do_not_confuse_replies(server: AmiServer, secret_file: Path) -> None:
    """Asynchronous events between every reply are counted and dropped; figures are unchanged."""
    quiet = probe_once(settings(server.port, secret_file))
    server.interleave = True

    async def go() -> tuple[dict[str, Any], int]:
        p = PbxProbe(settings(server.port, secret_file), CallstatsSettings())
        try:
            return await p.gather(now=_NOW), p.client.events_ignored
        finally:
            await p.aclose()

    noisy, ignored = run(go())
    assert noisy == quiet
    assert ignored == server.events_sent > 20


def test_one_connection_for_many_records(server: AmiServer, secret_file: Path) -> None:
    """Records reuse one logged-in connection; the client sends only read-only actions."""

    async def go() -> AmiClient:
        p = PbxProbe(settings(server.port, secret_file), CallstatsSettings())
        for _ in range(5):
            assert (await p.gather())["state"] == "ok"
        await p.aclose()
        return p.client

    client = run(go())
    assert (server.connections, server.logins_ok, client.connects) == (1, 1, 1)
    assert set(server.actions) <= ALLOWED_ACTIONS
    assert server.actions[-1] == "Logoff"
    logins = [a for a in server.received if a.get("Action") == "Login"]
    assert logins[0]["Events"] == "off"


def test_refuses_actions_outside_the_allow_list(server: AmiServer, secret_file: Path) -> None:
    """An action that changes Asterisk (Originate, Reload) is refused before a byte is sent."""

    async def go() -> None:
        c = AmiClient(settings(server.port, secret_file))
        try:
            for name in ("Originate", "Reload", "Command", "MixMonitor"):
                with pytest.raises(CollectorError, match="not one this agent may send"):
                    await c.action(name)
        finally:
            await c.aclose()

    run(go())
    assert server.connections == 0


def test_wrong_secret_is_a_state(server: AmiServer, secret_file: Path) -> None:
    """A wrong secret gives ``unreachable``/``auth_failed``, never an exception or the secret."""
    server.secret = "another-secret"
    server.auth_fail_delay = 0.2
    with capture_logs() as logs:
        pbx = probe_once(settings(server.port, secret_file))
    assert (pbx["state"], pbx["reason"]) == ("unreachable", "auth_failed")
    assert server.logins_failed == 1
    assert SECRET not in json.dumps(pbx) + repr(logs)


def test_refused_is_a_state(secret_file: Path) -> None:
    """Nothing listening gives ``unreachable``/``refused`` at once."""
    t0 = time.monotonic()
    pbx = probe_once(settings(free_port(), secret_file))
    assert (pbx["state"], pbx["reason"]) == ("unreachable", "refused")
    assert time.monotonic() - t0 < 1


def test_not_ami_is_a_state(server: AmiServer, secret_file: Path) -> None:
    """A service that is not AMI on the port gives ``protocol``."""
    server.banner = b"SSH-2.0-OpenSSH_9.2\r\n"
    pbx = probe_once(settings(server.port, secret_file))
    assert (pbx["state"], pbx["reason"]) == ("unreachable", "protocol")


def test_loose_secret_file_is_a_state(server: AmiServer, secret_file: Path) -> None:
    """A secret file others can read is not used: ``secret_file``, and no login is tried."""
    secret_file.chmod(0o644)
    pbx = probe_once(settings(server.port, secret_file))
    assert (pbx["state"], pbx["reason"]) == ("unreachable", "secret_file")
    assert "chmod 600" in pbx["detail"]
    assert server.connections == 0


def test_denied_actions_make_a_partial_record(secret_file: Path) -> None:
    """An account with ``write = reporting`` only: contacts and endpoints are ``denied``."""
    with AmiServer(write=frozenset({"reporting"})) as server:
        pbx = probe_once(settings(server.port, secret_file))
    assert pbx["state"] == "partial"
    assert pbx["sections"] == {
        "PJSIPShowContacts": "denied",
        "PJSIPShowEndpoints": "denied",
        "SIPshowregistry": "not_loaded",
    }
    assert pbx["endpoints"] is None
    assert pbx["trunks"]["telco-a"]["registrations"] == {"registered": 1}
    assert pbx["calls"]["channels"] == 2


def test_slow_reply_within_the_timeout(server: AmiServer, secret_file: Path) -> None:
    """A reply slower than usual but inside the timeout is waited for."""
    server.slow["PJSIPShowEndpoints"] = 0.6
    pbx = probe_once(settings(server.port, secret_file, timeout=2.0))
    assert pbx["state"] == "ok"


def test_list_that_never_completes_times_out_then_reconnects(
    server: AmiServer, secret_file: Path
) -> None:
    """A list without its Complete event times out, the connection is dropped, the next is new."""
    server.never_complete.add("PJSIPShowContacts")

    async def go() -> tuple[dict[str, Any], float, dict[str, Any], dict[str, Any]]:
        p = PbxProbe(settings(server.port, secret_file, timeout=0.5), CallstatsSettings())
        try:
            t0 = time.monotonic()
            first = await p.gather()
            took = time.monotonic() - t0
            blocked = await p.gather()  # inside the backoff: no new connection
            server.never_complete.clear()
            await asyncio.sleep(blocked["retry_in"] + 0.05)
            return first, took, blocked, await p.gather()
        finally:
            await p.aclose()

    first, took, blocked, after = run(go())
    assert (first["state"], first["reason"]) == ("unreachable", "timeout")
    assert "PJSIPShowContacts" in first["detail"]
    assert took < 1.5
    assert blocked["reason"] == "timeout" and 0 < blocked["retry_in"] <= 1
    assert after["state"] == "ok"
    assert server.connections == 2


def test_restart_during_a_list(server: AmiServer, secret_file: Path) -> None:
    """Asterisk dropping the connection mid-list gives ``closed``; once back, figures again."""
    server.drop_in_list["PJSIPShowEndpoints"] = 2

    async def go() -> list[dict[str, Any]]:
        p = PbxProbe(settings(server.port, secret_file), CallstatsSettings())
        out = []
        try:
            out.append(await p.gather())
            server.stop()  # Asterisk restarting: nothing listens for a while
            await asyncio.sleep(out[0]["retry_in"] + 0.05)
            out.append(await p.gather())
            server.drop_in_list.clear()
            server.start()
            await asyncio.sleep(out[1]["retry_in"] + 0.05)
            out.append(await p.gather())
        finally:
            await p.aclose()
        return out

    during, down, back = run(go())
    assert (during["state"], during["reason"]) == ("unreachable", "closed")
    assert (down["state"], down["reason"]) == ("unreachable", "refused")
    assert back["state"] == "ok"
    assert server.logins_ok == 2


def test_backoff_is_capped_and_jittered() -> None:
    """Delays double from 1 s, never exceed the cap, and are at least half their ceiling."""
    rng = random.Random(7).uniform
    for attempt in range(1, 30):
        ceiling = min(60.0, 2.0 ** (attempt - 1))
        d = backoff_delay(attempt, 60.0, rng)
        assert ceiling / 2 <= d <= ceiling
    assert backoff_delay(50, 60.0, lambda a, b: b) == 60.0


def test_refused_reconnects_with_backoff(secret_file: Path) -> None:
    """While nothing listens, connection attempts thin out: each waits for its backoff."""
    clock = [0.0]

    async def go() -> AmiClient:
        s = settings(free_port(), secret_file, reconnect_max=60.0)
        c = AmiClient(s, clock=lambda: clock[0])
        for _ in range(60):  # one question per simulated second for a minute
            with pytest.raises(AmiError) as info:
                await c.action("CoreStatus")
            assert info.value.fault == AmiFault.REFUSED
            clock[0] += 1.0
        return c

    c = run(go())
    # Tries at 0 s, then after 0.5-1, 1-2, 2-4, 4-8, 8-16, 16-32 s: 6 or 7 in 60 s, not 60.
    assert 6 <= c.attempts <= 7, c.attempts
    assert c.status()["retry_in"] is not None


def test_never_blocks_longer_than_the_timeout(secret_file: Path) -> None:
    """A port that accepts but never speaks (a hung Asterisk) costs one timeout, no more."""

    async def go() -> tuple[dict[str, Any], float]:
        async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                await r.read()  # until the client gives up and closes
            finally:
                w.close()

        srv = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        p = PbxProbe(settings(port, secret_file, timeout=0.3), CallstatsSettings())
        try:
            t0 = time.monotonic()
            out = await p.gather()
            return out, time.monotonic() - t0
        finally:
            await p.aclose()
            srv.close()
            await srv.wait_closed()

    pbx, took = run(go())
    assert (pbx["state"], pbx["reason"]) == ("unreachable", "timeout")
    assert took < 0.8
