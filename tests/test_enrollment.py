"""Enrollment: a box goes from nothing to delivering data with a one-time token, and a token
used twice, expired, or for another device is refused; so is any enrollment while the switch is
off or with an endpoint the pinned CA does not vouch for. Each attempt is ledgered.

Real parts throughout: the ``noc enroll`` HTTPS endpoint as a subprocess on PostgreSQL, the
daemon started as a user starts it, ``agentctl enroll``, and the session's mosquitto.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from noc import enroll as noc_enroll
from noc.wire import decode_body
from tests.support.daemon import AgentProcess, base_config, wait_for
from tests.support.mosquitto import Mosquitto, free_port, wait_port
from tests.support.noc import NocListener
from tests.support.nocservice import REPO, NocProcess, noc_settings
from tests.support.pki import PKI
from tests.support.postgres import Postgres

pytestmark = pytest.mark.integration
DEVICE = "pbx-enroll-1"


class Endpoint:
    """The NOC's enrollment endpoint and its database."""

    def __init__(self, proc: NocProcess, url: str, dsn: str, config: Path) -> None:
        self.proc, self.url, self.dsn, self.config = proc, url, dsn, config

    def token(self, device: str, ttl: float = 86400) -> str:
        """A fresh token for ``device``."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return noc_enroll.new_token(conn, device, ttl=ttl)

    def used(self, token: str) -> bool:
        """Whether the token has been spent."""
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute(
                "SELECT used_at FROM enrollment_tokens WHERE token_hash = %s",
                (noc_enroll.token_hash(token),),
            ).fetchone()
        assert row is not None
        return row[0] is not None


@pytest.fixture(scope="module")
def crl_broker(pki: PKI) -> Iterator[Mosquitto]:
    """A broker of this module's own that reads a CRL (renewal revokes the old certificate)."""
    work = Path(tempfile.mkdtemp(prefix="pbx-enroll-"))
    work.chmod(0o755)  # the broker runs as the mosquitto user
    crl = work / "crl.pem"
    # An empty CRL, valid a day: the NOC writes it again on each renewal.
    now = dt.datetime.now(dt.UTC)
    empty_crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.ca.cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=1))
        .sign(pki.ca.key, hashes.SHA256())
    )
    crl.write_bytes(empty_crl.public_bytes(serialization.Encoding.PEM))
    crl.chmod(0o644)
    b = Mosquitto(pki, workdir=work, extra_config=f"crlfile {crl}\n")
    b.start()
    (work / "mosquitto.pid").write_text(str(b.pid))
    try:
        yield b
    finally:
        b.stop()
        shutil.rmtree(work, ignore_errors=True)


def start_endpoint(root: Path, pki: PKI, broker: Mosquitto, dsn: str, lifetime: str) -> Endpoint:
    """``noc enroll`` over TLS with a server certificate of the vendor CA."""
    port = free_port()
    data = noc_settings(pki, broker, dsn)
    data["enroll"] = {
        "host": "127.0.0.1",
        "port": port,
        "cert_file": str(pki.broker_cert),
        "key_file": str(pki.broker_key),
        "ca_dir": str(pki.ca.dir),
        "lifetime": lifetime,
    }
    data["revocation"] = {
        "crl_file": str(broker.workdir / "crl.pem"),
        "broker_pid_file": str(broker.workdir / "mosquitto.pid"),
    }
    proc = NocProcess(root, data, "enroll", name="enroll")
    proc.start()
    if not wait_port("127.0.0.1", port, time.monotonic() + 20, proc.proc):
        proc.stop()
        raise AssertionError(f"noc enroll did not listen: {proc.log()}")
    return Endpoint(proc, f"https://localhost:{port}", dsn, proc.config_path)


@pytest.fixture(scope="module")
def database(postgres: Postgres) -> str:
    """The NOC's database for this module."""
    from noc import db

    dsn = postgres.create_database("t_enrollment")
    db.migrate(dsn)
    return dsn


@pytest.fixture(scope="module")
def endpoint(
    tmp_path_factory: pytest.TempPathFactory, pki: PKI, crl_broker: Mosquitto, database: str
) -> Iterator[Endpoint]:
    """The endpoint issuing 90-day certificates."""
    e = start_endpoint(tmp_path_factory.mktemp("enroll"), pki, crl_broker, database, "90d")
    yield e
    e.proc.kill()


def agent_config(root: Path, pki: PKI, endpoint: Endpoint, broker: Mosquitto, **enroll: Any) -> Any:
    """A box with no uplink yet: only where to enroll and the CA it pins."""
    return base_config(
        root,
        device_id=DEVICE,
        enroll={
            "url": endpoint.url,
            "ca_file": str(pki.ca_file),
            "broker": f"mqtts://localhost:{broker.port}",
            "timeout": "30s",  # the machine may be loaded: a slow answer is not what is tested
            **enroll,
        },
    )


def enroll_entries(agent: AgentProcess) -> list[dict[str, Any]]:
    """The daemon's "enroll" ledger entries."""
    out = agent.ctl("audit", "--kind", "enroll", "--json")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_from_nothing_to_delivering_with_a_token(
    tmp_path: Path, pki: PKI, crl_broker: Mosquitto, endpoint: Endpoint
) -> None:
    """`noc device add` prints a token; `agentctl enroll` makes the key on the box (0600),
    installs the certificate, writes the uplink section and the box delivers; the same token
    a second time is refused at the token step, and both attempts are ledgered."""
    added = subprocess.run(
        [sys.executable, "-m", "noc", "-c", str(endpoint.config), "device", "add", DEVICE],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    token = added.stdout.split("agentctl enroll --token ")[1].split()[0]
    assert len(token) >= 22  # 128 bits in base64
    with NocListener(crl_broker, f"pbx/{DEVICE}/#") as noc:
        agent = AgentProcess(tmp_path, agent_config(tmp_path, pki, endpoint, crl_broker))
        try:
            agent.start()
            t0 = time.monotonic()
            out = agent.ctl("enroll", "--token", token, timeout=60)
            assert out.returncode == 0, out.stderr
            assert f"CN={DEVICE}" in out.stdout and "wrote the uplink section" in out.stdout
            wait_for(
                lambda: any(m.topic == f"pbx/{DEVICE}/up/health" for m in noc.snapshot()),
                timeout=20,
                what="the first envelope from the enrolled box",
            )
            seconds = time.monotonic() - t0
            # Health carries the certificate's expiry, as status does.
            health = wait_for(
                lambda: next(
                    (
                        b
                        for m in noc.snapshot()
                        if m.topic == f"pbx/{DEVICE}/up/health"
                        and "days_left"
                        in (b := decode_body(json.loads(m.payload))["agent"]["identity"])
                    ),
                    None,
                ),
                timeout=10,
                what="a health record with the certificate's expiry",
            )
            assert 89 < health["days_left"] <= 90
            key = tmp_path / "state" / "tls" / "current" / "device.key"
            st = key.stat()
            assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
            human = agent.ctl("status").stdout
            assert f"certificate: CN={DEVICE}, issued by" in human, human
            assert "renewal: next at" in human
            written = yaml.safe_load(agent.config_path.read_text())
            assert written["uplink"]["key_file"] == str(key)
            again = agent.ctl("enroll", "--token", token, timeout=60)
            assert again.returncode == 69 and "step 'token'" in again.stderr, again.stderr
            entries = enroll_entries(agent)
            assert [e["ok"] for e in entries] == [True, False]
            assert entries[0]["subject"] == f"CN={DEVICE}"
            assert entries[1]["step"] == "token"
        finally:
            agent.close()
    with psycopg.connect(endpoint.dsn) as conn:
        issued = conn.execute(
            "SELECT count(*) FROM device_certificates WHERE device_id = %s", (DEVICE,)
        ).fetchone()
        expiry = conn.execute(
            "SELECT cert_not_after FROM devices WHERE device_id = %s", (DEVICE,)
        ).fetchone()
    assert issued == (1,) and expiry is not None and expiry[0] is not None
    assert seconds < 20


def test_expired_foreign_and_switched_off_enrollments_are_refused(
    tmp_path: Path, pki: PKI, crl_broker: Mosquitto, endpoint: Endpoint
) -> None:
    """An expired token and one for another device are refused (the latter stays unspent);
    with the switch off nothing is sent and the token is kept; each attempt is ledgered."""
    agent = AgentProcess(tmp_path, agent_config(tmp_path, pki, endpoint, crl_broker))
    try:
        agent.start()
        expired = endpoint.token(DEVICE, ttl=-1)
        out = agent.ctl("enroll", "--token", expired, timeout=60)
        assert out.returncode == 69 and "step 'token'" in out.stderr, out
        foreign = endpoint.token("pbx-enroll-other")
        out = agent.ctl("enroll", "--token", foreign, timeout=60)
        assert out.returncode == 69 and "step 'token'" in out.stderr, out
        assert not endpoint.used(foreign)
        good = endpoint.token(DEVICE)
        off = agent.ctl("uplink", "off")
        assert off.returncode == 0, off
        out = agent.ctl("enroll", "--token", good, timeout=60)
        assert out.returncode == 69 and "step 'switch'" in out.stderr, out
        assert not endpoint.used(good)
        steps = [(e["ok"], e["step"]) for e in enroll_entries(agent)]
        assert steps == [(False, "token"), (False, "token"), (False, "switch")]
        assert not (tmp_path / "state" / "tls" / "current").exists()
    finally:
        agent.close()


def test_an_endpoint_the_pinned_ca_does_not_vouch_for_is_refused(
    tmp_path: Path, pki: PKI, crl_broker: Mosquitto, endpoint: Endpoint
) -> None:
    """Pinning another CA: the TLS handshake fails at the connect step, the token is unspent."""
    cfg = agent_config(tmp_path, pki, endpoint, crl_broker, ca_file=str(pki.rogue_ca_file))
    agent = AgentProcess(tmp_path, cfg)
    try:
        agent.start()
        token = endpoint.token(DEVICE)
        out = agent.ctl("enroll", "--token", token, timeout=60)
        assert out.returncode == 69 and "step 'connect'" in out.stderr, out.stderr
        assert "pinned CA" in out.stderr
        assert not endpoint.used(token)
    finally:
        agent.close()


def test_rotation_while_envelopes_flow(
    tmp_path: Path, pki: PKI, crl_broker: Mosquitto, database: str
) -> None:
    """With 6-second certificates the box renews at two thirds of the life over its current
    identity, reconnects with the new certificate, deletes the old folder once connected,
    loses no envelope (every seq arrives), and the broker refuses the old certificate."""
    from agent.errors import UplinkError
    from agent.uplink.mqtt import LinkSettings, MqttLink
    from agent.uplink.tls import client_context

    short = start_endpoint(tmp_path / "noc", pki, crl_broker, database, "6s")
    try:
        with NocListener(crl_broker, f"pbx/{DEVICE}/#") as noc:
            agent = AgentProcess(tmp_path, agent_config(tmp_path, pki, short, crl_broker))
            try:
                agent.start()
                out = agent.ctl("enroll", "--token", short.token(DEVICE), timeout=60)
                assert out.returncode == 0, out.stderr
                tls = tmp_path / "state" / "tls"
                old = tmp_path / "old"
                shutil.copytree((tls / "current").resolve(), old)
                ident = wait_for(
                    lambda: (i := agent.status()["identity"]).get("renewals", 0) >= 1 and i,
                    timeout=20,
                    what="a renewal",
                )
                assert ident["certificate"]["serial"] != old.name.removeprefix("cert-")
                wait_for(lambda: agent.status()["uplink"]["state"] == "connected", timeout=10)
                assert [p.name for p in tls.iterdir() if p.name.startswith("cert-")] == [
                    (tls / "current").resolve().name
                ]
                renewed = [
                    json.loads(line)
                    for line in agent.ctl("audit", "--kind", "renew", "--json").stdout.splitlines()
                ]
                assert renewed and renewed[0]["ok"] is True
                pause = renewed[0]["pause"]
                # Envelopes after the renewal, then none left behind.
                delivered = agent.status()["outbox"]["delivered"]
                wait_for(
                    lambda: agent.status()["outbox"]["delivered"] >= delivered + 2,
                    timeout=10,
                    what="envelopes on the new connection",
                )
            finally:
                agent.close()
            seqs = {
                json.loads(m.payload)["seq"]
                for m in noc.snapshot()
                if m.topic.startswith(f"pbx/{DEVICE}/up/")
            }
        assert seqs == set(range(min(seqs), max(seqs) + 1)), "an envelope was lost"
        assert min(seqs) == 1

        async def old_identity() -> None:
            link = MqttLink(
                LinkSettings(host="localhost", port=crl_broker.port, client_id="old-cert",
                             connect_timeout=5),
                client_context(pki.ca_file, old / "device.crt", old / "device.key"),
            )  # fmt: skip
            try:
                await link.connect()
            finally:
                link.close_now()

        with pytest.raises(UplinkError):
            asyncio.run(old_identity())
        assert pause < 5.0
    finally:
        short.proc.kill()  # its graceful shutdown takes seconds; nothing to keep
