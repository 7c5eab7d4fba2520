"""The promise, end to end: nothing the NOC receives holds a recording, a voicemail, a secret
or a caller, whatever the PBX's files contain and however they point at one another.

A real daemon runs every collector on a copy of the sample FreePBX tree into
which canaries were planted: bytes in voicemail and recording files, links,
``#include`` lines and globs that point at them, distinctive passwords in
every form Asterisk keeps them, and CDRs full of distinctive numbers, names
and ids. Every byte the broker delivers to a NOC subscriber is searched (with
the configuration content decompressed, and each canary also in base64 and
hex), as are the ledger and the daemon's log.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import shutil
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import control
from noc.wire import decode_body
from tests.fixtures.cdr.cdrgen import csv_bytes, make_calls
from tests.support.daemon import AgentProcess, base_config, wait_for
from tests.support.mosquitto import Mosquitto
from tests.support.noc import NocListener
from tests.support.pki import PKI

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
DEVICE = "pbx-test-1"
VOICEMAIL = "CANARY-VM-AUDIO-5e1d"
RECORDING = "CANARY-REC-AUDIO-93ab"
SECRETS = {
    "pjsip password": "S3cret-E2E-pjsip-41c2",
    "register line": "S3cret-E2E-reg-77aa",
    "iax dial string": "S3cret-E2E-iax-0c9d",
    "voicemail pin": "739164",
    "voicemail name": "Wilhelmina Canaryperson",
    "voicemail email": "w.canary@example.org",
    "manager secret": "S3cret-E2E-ami-5b3f",
    "url password": "S3cret-E2E-url-8e02",
}
CALLER_NUMBER = "+15550199887766"
CALLER_NAME = "Bartholomew Canarycaller"
UNIQUEID = "1764300000.987654"


def plant(root: Path) -> Path:
    """Copy the sample tree and plant every canary; returns the copy's root."""
    pbx = root / "pbx"
    shutil.copytree(REPO / "tests" / "fixtures" / "pbx", pbx, symlinks=True)
    spool = pbx / "var" / "spool" / "asterisk"
    vm = spool / "voicemail" / "default" / "1000" / "INBOX"
    vm.mkdir(parents=True, exist_ok=True)
    (vm / "msg0001.wav").write_bytes(b"RIFF\0\0\0\0WAVE" + VOICEMAIL.encode() * 50)
    (vm / "msg0001.txt").write_text(f"[message]\ncallerid={VOICEMAIL}\n")
    mon = spool / "monitor" / "2026" / "11" / "28"
    mon.mkdir(parents=True)
    (mon / "in-5550100-1001-20261128.wav").write_bytes(RECORDING.encode() * 50)
    (mon / "notes.conf").write_text(f"secret={RECORDING}\n")
    etc = pbx / "etc" / "asterisk"
    # Ways to reach the spools from the configuration tree: a link, includes, a glob.
    (etc / "linked_voicemail.conf").symlink_to(vm / "msg0001.txt")
    (etc / "linked_spool").symlink_to(spool)
    with (etc / "extensions_custom.conf").open("a") as f:
        f.write(f'\n#include "{vm / "msg0001.txt"}"\n')
        f.write(f"#include {mon}/*.conf\n")
        f.write("#include linked_spool/monitor/2026/11/28/notes.conf\n")
        f.write(f"#tryinclude <{spool}/voicemail/default/1000/INBOX/*.txt>\n")
    (etc / "pjsip_custom.conf").write_text(
        "[trunk-e2e-auth]\ntype=auth\nauth_type=userpass\nusername=e2e\n"
        f"password={SECRETS['pjsip password']}\n\n"
        "[trunk-e2e-reg]\ntype=registration\n"
        f"server_uri=sip:e2e:{SECRETS['url password']}@sip.example.com\n"
    )
    (etc / "sip_custom.conf").write_text(
        f"register => e2euser:{SECRETS['register line']}@sip.example.com/1000\n"
    )
    (etc / "extensions_override.conf").write_text(
        "[from-internal-custom]\n"
        f"exten => _9X.,1,Dial(IAX2/e2e:{SECRETS['iax dial string']}@iax.example.com/${{EXTEN}})\n"
    )
    (etc / "voicemail_custom.conf").write_text(
        "[default]\n"
        f"4242 => {SECRETS['voicemail pin']},{SECRETS['voicemail name']},"
        f"{SECRETS['voicemail email']},,attach=yes\n"
    )
    (etc / "manager_custom.conf").write_text(
        f"[e2e-admin]\nsecret = {SECRETS['manager secret']}\nread = all\n"
    )
    # CDRs from the last hour, with a distinctive caller in a third of them.
    now = int(time.time())
    calls = make_calls(60, start=now - 3600, span=3000, seed=7)
    calls = [
        dataclasses.replace(
            c,
            number=CALLER_NUMBER,
            name=CALLER_NAME,
            uniqueid=UNIQUEID,
            account="ACCT-CANARY",
            userfield="UF-CANARY",
        )
        if i % 3 == 0
        else c
        for i, c in enumerate(calls)
    ]
    cdr = pbx / "var" / "log" / "asterisk" / "cdr-csv" / "Master.csv"
    cdr.write_bytes(csv_bytes(calls))
    return pbx


def forbidden_strings() -> dict[str, bytes]:
    """Every canary and secret, with its base64 and hex spellings."""
    plain = {
        "voicemail audio": VOICEMAIL,
        "recording audio": RECORDING,
        **SECRETS,
        "caller number": CALLER_NUMBER,
        "caller name": CALLER_NAME,
        "uniqueid": UNIQUEID,
        "account code": "ACCT-CANARY",
        "userfield": "UF-CANARY",
    }
    out: dict[str, bytes] = {}
    for what, text in plain.items():
        raw = text.encode()
        out[what] = raw
        out[f"{what} (base64)"] = base64.b64encode(raw)
        out[f"{what} (hex)"] = binascii.hexlify(raw)
    return out


def unpacked(value: Any) -> Iterator[bytes]:
    """Every string in a JSON value, plus whatever base64+zlib content decodes to."""
    if isinstance(value, dict):
        for v in value.values():
            yield from unpacked(v)
    elif isinstance(value, list):
        for v in value:
            yield from unpacked(v)
    elif isinstance(value, str):
        yield value.encode()
        if len(value) >= 16:
            try:
                yield zlib.decompress(base64.b64decode(value, validate=True))
            except (binascii.Error, zlib.error, ValueError):
                pass


@pytest.fixture
def planted_agent(tmp_path: Path, pki: PKI, broker: Mosquitto) -> Iterator[AgentProcess]:
    """A daemon over the planted tree, connected to the session broker."""
    pbx = plant(tmp_path)
    etc = pbx / "etc"
    creds = pki.device(DEVICE)
    cfg = base_config(tmp_path)
    cfg["collectors"] = {
        "health": {"interval": "1h"},
        "config": {
            "interval": "1h",
            "roots": [str(etc / "asterisk"), str(etc / "freepbx.conf"), str(etc / "amportal.conf")],
            "never_read": [str(pbx / "var" / "spool" / "asterisk")],
        },
        "callstats": {
            "interval": "1s",
            "bucket": "5m",
            "settle": "0s",
            "min_count": 3,
            "source": {"csv": str(pbx / "var/log/asterisk/cdr-csv/Master.csv")},
        },
    }
    cfg["uplink"] = {
        "broker": f"mqtts://localhost:{broker.port}",
        "ca_file": str(pki.ca_file),
        "cert_file": str(creds.cert),
        "key_file": str(creds.key),
    }
    agent = AgentProcess(tmp_path, cfg)
    yield agent
    agent.close()


def test_nothing_private_reaches_the_noc(planted_agent: AgentProcess, broker: Mosquitto) -> None:
    """No canary, secret or caller detail, in any spelling, is in anything the NOC receives."""
    with NocListener(broker, f"pbx/{DEVICE}/#") as noc:
        planted_agent.start()
        wait_for(
            lambda: noc.envelopes("config") and noc.envelopes("callstats"),
            timeout=30,
            what="config and callstats envelopes",
        )
        control.request(planted_agent.socket_path, "collect", collector="config")  # a full one
        wait_for(lambda: len(noc.envelopes("config")) >= 2, timeout=30, what="a full snapshot")
        wait_for(lambda: planted_agent.status()["outbox"]["queued"] == 0, what="an empty outbox")
        received = noc.snapshot()
    assert {m.topic.rsplit("/", 1)[-1] for m in received if "/up/" in m.topic} >= {
        "health",
        "config",
        "callstats",
    }
    haystack = [m.payload for m in received]
    for m in received:
        if "/up/" in m.topic:
            env = m.json()
            # A body compressed on the wire (README, wire protocol) is searched decoded too.
            haystack.extend(unpacked({**env, "body": decode_body(env)}))
    texts = b"\n".join(haystack)
    assert b"[trunk-e2e-auth]" in texts, "the planted configuration was not snapshotted at all"
    for what, needle in forbidden_strings().items():
        assert needle not in texts, f"{what} reached the NOC"

    status = planted_agent.status()["collectors"]["config"]
    assert status["skipped"].get("forbidden", 0) >= 1, status
    db = (planted_agent.state_dir / "agent.db").read_bytes()
    log = planted_agent.log().encode()
    for what, needle in forbidden_strings().items():
        assert needle not in db, f"{what} is in the ledger database"
        assert needle not in log, f"{what} is in the daemon's log"


def test_every_envelope_class_is_allowed(planted_agent: AgentProcess, broker: Mosquitto) -> None:
    """With callstats left out of the policy, the NOC gets health and config, never callstats."""
    cfg = yaml.safe_load(planted_agent.config_path.read_text())
    cfg["policy"] = {"send": ["health", "config"]}
    planted_agent.write_config(cfg)
    with NocListener(broker, f"pbx/{DEVICE}/#") as noc:
        planted_agent.start()
        wait_for(lambda: noc.envelopes("config"), timeout=30, what="a config envelope")
        wait_for(
            lambda: (
                planted_agent.status()["gate"]["refused"].get("callstats:not-in-policy", 0) >= 1
            ),
            timeout=30,
            what="a refused callstats bucket",
        )
        wait_for(lambda: planted_agent.status()["outbox"]["queued"] == 0, what="an empty outbox")
        classes = {e["class"] for e in noc.envelopes()}
    assert classes <= {"health", "config"}
    audit = planted_agent.ctl("audit", "--kind", "delivered", "--json")
    assert {json.loads(x)["class"] for x in audit.stdout.splitlines()} <= {"health", "config"}
