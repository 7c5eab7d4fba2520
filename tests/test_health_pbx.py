"""PBX health end to end: the real daemon, a real mTLS mosquitto, a NOC listener, and AMI.

Asterisk is not packaged in Debian 12 and cannot run here, so the daemon's AMI
client talks to tests/support/ami_server.py, a stand-in that speaks AMI as
Asterisk's manager.c writes it (see tests/test_ami_client.py for its
transcripts). Everything else is real: ``agentctl run`` as a subprocess, the
broker with client certificates, the NOC's subscriber, ``agentctl`` itself.
"""

from __future__ import annotations

import base64
import binascii
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.collectors.health.ages import ages
from tests.support.ami_server import AmiServer, Channel, Contact, Endpoint, PbxModel, Registration
from tests.support.daemon import REPO, AgentProcess, base_config, wait_for
from tests.support.mosquitto import Mosquitto
from tests.support.noc import NocListener
from tests.support.pki import PKI

pytestmark = pytest.mark.integration

DEVICE = "pbx-test-1"
AMI_SECRET = "S3cret-AMI-login-5d21"
CANARIES = {
    "caller number": "+15550199887766",
    "caller name": "Bartholomew Canarycaller",
    "connected number": "+15550111223344",
    "connected name": "Wilhelmina Canaryconnected",
    "dialled number": "0049301234567",
    "registration user": "+4930123456",
    "trunk password": "S3cret-AMI-trunkpw-9f2e",
    "phone name": "canaryphone",
    "phone address": "198.51.100.77",
    "user agent": "CanaryPhone UA 9.9",
    "call id": "canary-callid-7731",
    "uniqueid": "1764400000.424242",
    "system name": "canary-host-7",
    "ami secret": AMI_SECRET,
}


def canary_model() -> PbxModel:
    """The sample box, with every field Asterisk would fill with a person filled with a canary."""
    m = PbxModel.sample()
    m.system_name = CANARIES["system name"]
    m.endpoints.append(
        Endpoint(
            CANARIES["phone name"],
            auths=CANARIES["phone name"],
            contacts=[
                Contact(
                    CANARIES["phone name"],
                    f"sip:{CANARIES['phone name']}@{CANARIES['phone address']}:5062",
                    endpoint=CANARIES["phone name"],
                    user_agent=CANARIES["user agent"],
                    via_addr=CANARIES["phone address"],
                    via_port=5062,
                    call_id=CANARIES["call id"],
                    expiration=1764600000,
                )
            ],
        )
    )
    m.registrations.append(
        Registration(
            "canary-telco",
            client_uri=f"sip:{CANARIES['registration user']}@sip.canary-telco.example",
            server_uri="sip:sip.canary-telco.example",
            endpoint="canary-telco",
            auth_username=CANARIES["registration user"],
            auth_password=CANARIES["trunk password"],
            contact_user=CANARIES["registration user"],
        )
    )
    m.channels.append(
        Channel(
            f"PJSIP/{CANARIES['phone name']}-0000a1b2",
            6,
            CANARIES["caller number"],
            CANARIES["caller name"],
            CANARIES["connected number"],
            CANARIES["connected name"],
            "from-internal",
            CANARIES["dialled number"],
            CANARIES["uniqueid"],
            CANARIES["uniqueid"],
            app_data=f"PJSIP/{CANARIES['dialled number']}@canary-telco,300",
        )
    )
    return m


def forbidden() -> dict[str, bytes]:
    """Each canary in plain text, base64 and hex."""
    out: dict[str, bytes] = {}
    for what, text in CANARIES.items():
        raw = text.encode()
        out[what] = raw
        out[f"{what} (base64)"] = base64.b64encode(raw)
        out[f"{what} (hex)"] = binascii.hexlify(raw)
    return out


@pytest.fixture
def ami() -> Iterator[AmiServer]:
    """The stand-in Asterisk, full of canaries, answering with events interleaved."""
    with AmiServer(canary_model(), secret=AMI_SECRET) as server:
        server.interleave = True
        server.auth_fail_delay = 0.1
        yield server


def ami_config(root: Path, port: int, **extra: Any) -> dict[str, Any]:
    """``collectors.health.pbx.ami`` for the stand-in, the secret in a mode-0600 file."""
    secret = root / "ami.secret"
    secret.write_text(AMI_SECRET + "\n")
    secret.chmod(0o600)
    return {
        "port": port,
        "username": "pbx-agent",
        "secret_file": str(secret),
        "timeout": "1s",
        "reconnect_max": "2s",
        **extra,
    }


def make_agent(
    root: Path, ami: AmiServer, pki: PKI | None, broker: Mosquitto | None
) -> AgentProcess:
    """A daemon collecting health every second, with AMI, to the broker when one is given."""
    cfg = base_config(root)
    cfg["collectors"] = {
        "health": {"interval": "1s", "pbx": {"ami": ami_config(root, ami.port)}},
        "config": {"enabled": False},
        "callstats": {"enabled": False},
    }
    if broker is not None and pki is not None:
        creds = pki.device(DEVICE)
        cfg["uplink"] = {
            "broker": f"mqtts://localhost:{broker.port}",
            "ca_file": str(pki.ca_file),
            "cert_file": str(creds.cert),
            "key_file": str(creds.key),
        }
    return AgentProcess(root, cfg)


@pytest.fixture
def agent(tmp_path: Path, ami: AmiServer, pki: PKI, broker: Mosquitto) -> Iterator[AgentProcess]:
    """A daemon with AMI and the uplink, not started."""
    a = make_agent(tmp_path, ami, pki, broker)
    yield a
    a.close()


def pbx_sections(noc: NocListener) -> list[dict[str, Any]]:
    """The ``pbx`` part of every health envelope received so far, in order."""
    return [e["body"]["pbx"] for e in noc.envelopes("health")]


def wait_pbx(noc: NocListener, pred: Any, what: str, timeout: float = 20) -> dict[str, Any]:
    """Wait for a new health envelope whose ``pbx`` satisfies ``pred``; return that ``pbx``."""
    seen = len(pbx_sections(noc))

    def found() -> dict[str, Any] | None:
        return next((p for p in pbx_sections(noc)[seen:] if pred(p)), None)

    result: dict[str, Any] = wait_for(found, timeout=timeout, what=what)
    return result


def test_pbx_health_reaches_the_noc_and_names_no_one(
    agent: AgentProcess, ami: AmiServer, broker: Mosquitto
) -> None:
    """Health with Asterisk's figures reaches the NOC; no caller, phone or secret in any byte."""
    with NocListener(broker, f"pbx/{DEVICE}/#") as noc:
        agent.start()
        wait_for(
            lambda: len([p for p in pbx_sections(noc) if p["state"] == "ok"]) >= 3,
            timeout=30,
            what="three health records with PBX figures",
        )
        wait_for(lambda: agent.status()["outbox"]["queued"] == 0, what="an empty outbox")
        received = noc.snapshot()
    pbx = pbx_sections(noc)[-1]
    assert pbx["asterisk"]["version"] == "20.11.0"
    assert set(pbx["trunks"]) == {"telco-a", "telco-b", "canary-telco"}
    assert pbx["endpoints"]["total"] == 4
    assert pbx["calls"]["channels"] == 3
    assert ami.events_sent > 0  # the replies came with events interleaved
    assert ami.connections == 1  # one long-lived connection for every record
    texts = b"\n".join(m.payload for m in received)
    for what, needle in forbidden().items():
        assert needle not in texts, f"{what} reached the NOC"
    db = (agent.state_dir / "agent.db").read_bytes()
    log = agent.log().encode()
    for what, needle in forbidden().items():
        assert needle not in db, f"{what} is in the agent's database"
        assert needle not in log, f"{what} is in the daemon's log"


def test_wrong_secret_then_fixed(agent: AgentProcess, ami: AmiServer, broker: Mosquitto) -> None:
    """A wrong secret is reported in every record, retried with backoff, and healed once fixed."""
    ami.secret = "not-the-one-configured"
    with NocListener(broker, f"pbx/{DEVICE}/#") as noc:
        agent.start()
        wait_for(
            lambda: len([p for p in pbx_sections(noc) if p.get("reason") == "auth_failed"]) >= 6,
            timeout=30,
            what="six records saying auth_failed",
        )
        failed = [p for p in pbx_sections(noc) if p.get("reason") == "auth_failed"]
        # Backoff: not a login per record (1 s apart) but fewer and fewer (0.5-1 s, 1-2 s, 2 s).
        assert ami.logins_failed < len(failed)
        assert (
            failed[-1]["state"] == "unreachable" and failed[-1]["asterisk"]["running"] is not True
        )
        ami.secret = AMI_SECRET
        wait_pbx(noc, lambda p: p["state"] == "ok", "a record with figures after the fix")
    assert agent.proc is not None and agent.proc.poll() is None
    status = agent.status()["collectors"]["health"]
    assert status["last_error"] is None
    assert status["pbx"]["ami"]["state"] == "connected"


def test_asterisk_restarting_during_a_list(
    agent: AgentProcess, ami: AmiServer, broker: Mosquitto
) -> None:
    """A connection cut mid-list, then nothing listening: health still flows, saying why."""
    with NocListener(broker, f"pbx/{DEVICE}/#") as noc:
        agent.start()
        wait_pbx(noc, lambda p: p["state"] == "ok", "a record with figures")
        ami.drop_in_list["PJSIPShowEndpoints"] = 1
        wait_pbx(noc, lambda p: p.get("reason") == "closed", "a record saying closed")
        ami.stop()  # Asterisk restarting
        wait_pbx(noc, lambda p: p.get("reason") == "refused", "a record saying refused")
        ami.drop_in_list.clear()
        ami.start()
        wait_pbx(noc, lambda p: p["state"] == "ok", "figures once Asterisk is back")
        seqs = [e["seq"] for e in noc.envelopes("health")]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    assert agent.proc is not None and agent.proc.poll() is None
    assert ami.logins_ok >= 2


def test_list_that_never_completes(agent: AgentProcess, ami: AmiServer, broker: Mosquitto) -> None:
    """A list whose Complete never comes costs one timeout per attempt, never a stuck record."""
    ami.never_complete.add("QueueSummary")
    with NocListener(broker, f"pbx/{DEVICE}/#") as noc:
        agent.start()
        pbx = wait_pbx(noc, lambda p: p.get("reason") == "timeout", "a record saying timeout")
        assert "QueueSummary" in pbx["detail"]
        n = len(noc.envelopes("health"))
        wait_for(lambda: len(noc.envelopes("health")) >= n + 3, what="three more health records")
        ami.never_complete.clear()
        wait_pbx(noc, lambda p: p["state"] == "ok", "figures once the list completes")
    status = agent.status()["collectors"]["health"]
    assert status["last_error"] is None
    assert status["pbx"]["ami"]["connects"] >= 2


def test_status_shows_the_pbx(tmp_path: Path, ami: AmiServer) -> None:
    """``agentctl status`` has a PBX section: state, version, trunks down by name, phones."""
    agent = make_agent(tmp_path, ami, None, None)
    try:
        agent.start()
        wait_for(
            lambda: agent.status()["collectors"]["health"]["pbx"].get("state") == "ok",
            what="a health run with figures",
        )
        out = agent.ctl("status")
    finally:
        agent.close()
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "pbx: ok" in text
    assert "Asterisk 20.11.0, up " in text
    assert "trunks: 2 up, 1 down (telco-b)" in text
    assert "endpoints: 2 registered, 1 unregistered, 1 unavailable" in text


def test_collect_show_prints_the_envelope(tmp_path: Path, ami: AmiServer) -> None:
    """``collect health --show`` works without the daemon and prints the gate's envelope."""
    agent = make_agent(tmp_path, ami, None, None)
    out = agent.ctl("collect", "health", "--show")
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    env = json.loads(line)
    assert (env["v"], env["class"]) == (1, "health")
    assert env["body"]["pbx"]["state"] == "ok"
    assert "telco-a" in env["body"]["pbx"]["trunks"]
    assert not agent.socket_path.exists()
    for what, needle in forbidden().items():
        assert needle.decode() not in line, f"{what} is in the shown record"
    # Switch off: nothing would be sent; the body is still shown, the exit says why.
    assert agent.ctl("uplink", "off").returncode == 0
    off = agent.ctl("collect", "health", "--show")
    assert off.returncode == 65
    assert "switch-off" in off.stderr
    assert json.loads(off.stdout)["pbx"]["state"] == "ok"
    assert agent.ctl("collect", "nosuch", "--show").returncode == 64


def test_config_check_refuses_a_loose_secret_file(tmp_path: Path, ami: AmiServer) -> None:
    """``config check`` names the secret file's key and line when it is loose or gone."""
    agent = make_agent(tmp_path, ami, None, None)
    ok = agent.ctl("config", "check")
    assert ok.returncode == 0, ok.stderr
    assert AMI_SECRET not in ok.stdout + ok.stderr
    secret = tmp_path / "ami.secret"
    secret.chmod(0o640)
    loose = agent.ctl("config", "check")
    assert loose.returncode == 78
    assert "collectors.health.pbx.ami.secret_file" in loose.stderr
    assert "chmod 600" in loose.stderr and f"{agent.config_path}:" in loose.stderr
    secret.unlink()
    gone = agent.ctl("config", "check")
    assert gone.returncode == 78 and "does not exist" in gone.stderr


def test_no_ami_no_client_loaded(tmp_path: Path) -> None:
    """Without ``pbx.ami`` the daemon's collectors never import the AMI client."""
    code = (
        "import sys, yaml\n"
        "from pathlib import Path\n"
        "from agent.config import loads\n"
        "from agent.collectors import registry\n"
        "cfg = loads(Path(sys.argv[1]).read_text())\n"
        "registry.build(cfg.collectors, cfg.paths.state_dir, dict)\n"
        "print(sorted(m for m in sys.modules if m.startswith('agent.collectors.health')))\n"
    )
    path = tmp_path / "agent.yaml"
    import yaml

    path.write_text(yaml.safe_dump(base_config(tmp_path)))
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    loaded = out.stdout.strip()
    assert "agent.collectors.health.collector" in loaded
    assert "agent.collectors.health.ami" not in loaded
    assert "agent.collectors.health.pbx" not in loaded


def test_agent_side_ages(tmp_path: Path) -> None:
    """The CDR and configuration ages come from the collectors' state files, or say None."""
    from agent.collectors.callstats.store import STATE_FILE, CallstatsStore
    from agent.collectors.pbxconfig.snapshot import STATE_DB, Store

    assert ages(tmp_path, 1000.0) == {
        "cdr": {"last_row_age": None},
        "config": {"last_change_age": None},
    }
    cs = CallstatsStore(tmp_path / STATE_FILE)
    with cs.transaction() as db:
        CallstatsStore.put_meta(db, "watermark", 400)
    cs.close()
    snap = Store(tmp_path / STATE_DB)
    assert snap._db is not None
    snap._db.execute("INSERT INTO meta VALUES ('changed_at', '900.5')")
    snap.close()
    assert ages(tmp_path, 1000.0) == {
        "cdr": {"last_row_age": 600},
        "config": {"last_change_age": 99},
    }


def test_config_change_is_dated_by_the_snapshot(tmp_path: Path) -> None:
    """A snapshot that differs from the last one sent dates the change; an unchanged one not."""
    import asyncio
    import shutil

    from agent.collectors.health.ages import config_last_change
    from agent.collectors.pbxconfig.collector import SnapshotCollector
    from agent.collectors.pbxconfig.settings import SnapshotSettings
    from agent.policy.classes import Record

    etc = tmp_path / "asterisk"
    shutil.copytree(REPO / "tests" / "fixtures" / "pbx" / "etc" / "asterisk", etc)
    state = tmp_path / "state"
    settings = SnapshotSettings(roots=(etc,), exclude=())

    def run_once(reason: str = "schedule") -> float | None:
        def emit(record: Record) -> bool:
            return True

        c = SnapshotCollector(settings, state)
        asyncio.run(c.collect(emit, reason=reason))
        asyncio.run(c.aclose())
        return config_last_change(state)

    first = run_once()
    assert first is not None
    assert run_once() == first  # nothing changed
    assert run_once("command") == first  # a full snapshot of the same files is no change
    with (etc / "extensions_custom.conf").open("a") as f:
        f.write("\n[from-internal-custom]\nexten => 555,1,Hangup()\n")
    later = run_once()
    assert later is not None and later > first
