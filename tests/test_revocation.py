"""Revocation without restarting the broker: `noc device revoke` drops the box's live session
within 2 s and its certificate is refused on reconnect, while the other boxes stay connected.

Real parts: Debian's mosquitto 2.0 with the dynamic-security plugin (the kick) and a CRL read
again on SIGHUP (the refusal), boxes running the agent's real uplink session, PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import yaml
from cryptography import x509

from noc import enroll as noc_enroll
from noc import revoke
from noc.ca import CA
from noc.config import parse
from tests.support.agents import SimFleet
from tests.support.mosquitto import Mosquitto
from tests.support.nocservice import REPO, noc_settings
from tests.support.pki import PKI
from tests.support.postgres import Postgres

pytestmark = pytest.mark.integration
DYNSEC_PLUGIN = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")

# The shipped example: the NOC's client may use the dynamic-security API; boxes are not in
# it (the plugin defers to the ACL file for them), so the NOC's own rights are given there.
DYNSEC = json.loads((REPO / "etc" / "mosquitto-dynsec.example.json").read_text())


@pytest.fixture
def revocable(tmp_path: Path, pki: PKI, postgres: Postgres) -> Iterator[tuple[Mosquitto, Path]]:
    """A broker with the dynamic-security plugin and a CRL, and the NOC's configuration."""
    if not DYNSEC_PLUGIN.exists():
        pytest.skip(f"{DYNSEC_PLUGIN} is missing (Debian's mosquitto ships it)")
    # The broker drops to the mosquitto user: pytest's folders (0700) are closed to it.
    work = Path(tempfile.mkdtemp(prefix="pbx-revoke-"))
    work.chmod(0o755)
    dynsec = work / "dynsec.json"
    dynsec.write_text(json.dumps(DYNSEC))
    os.chmod(dynsec, 0o666)  # the broker (user mosquitto) rewrites it on every change
    crl = work / "crl.pem"
    dsn = postgres.create_database("t_revocation")
    from noc import db

    db.migrate(dsn)
    with psycopg.connect(dsn) as conn:
        revoke.write_crl(conn, CA.load(pki.ca.dir), crl, seconds=86400)  # empty: must exist
    extra = f"plugin {DYNSEC_PLUGIN}\nplugin_opt_config_file {dynsec}\ncrlfile {crl}\n"
    broker = Mosquitto(pki, workdir=work, extra_config=extra)
    broker.start()
    try:
        pid_file = work / "mosquitto.pid"
        pid_file.write_text(str(broker.pid))
        data = noc_settings(pki, broker, dsn)
        data["enroll"] = {"ca_dir": str(pki.ca.dir)}
        data["revocation"] = {"crl_file": str(crl), "broker_pid_file": str(pid_file)}
        config = tmp_path / "noc.yaml"
        config.write_text(yaml.safe_dump(data))
        yield broker, config
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


def test_revoked_device_is_dropped_at_once_and_refused_on_reconnect(
    revocable: tuple[Mosquitto, Path], pki: PKI
) -> None:
    """Revoke one of three connected boxes: its session ends within 2 s, its reconnects fail
    the TLS handshake, the others keep their first connection; `noc crl` keeps it out."""
    broker, config_path = revocable
    config = parse(yaml.safe_load(config_path.read_text()))
    ids = ["pbx-rev-1", "pbx-rev-2", "pbx-rev-3"]

    async def scenario() -> float:
        fleet = SimFleet.make(pki.issue, pki.ca_file, broker.port, ids, reconnect_max=1)
        try:
            with psycopg.connect(config.database) as conn:
                for a in fleet.agents:
                    cert = x509.load_pem_x509_certificate(a.creds.cert.read_bytes())
                    noc_enroll.record_certificate(conn, cert, a.device_id, "enroll")
            fleet.start()
            await fleet.wait(fleet.all_connected, 15, "three boxes connected")
            victim, others = fleet.agents[0], fleet.agents[1:]
            from noc import db

            pool = db.pool(config.database, max_size=1)
            try:
                t0 = time.monotonic()
                done = await asyncio.to_thread(revoke.revoke, config, pool, victim.device_id)
                await fleet.wait(lambda: not victim.connected, 2, "the revoked box dropped")
                dropped = time.monotonic() - t0
            finally:
                pool.close()
            assert done["serials"] and done["kicked"]
            # Its reconnects (every second at most) fail; the others never lost their session.
            await asyncio.sleep(2.5)
            assert not victim.connected
            assert broker.log_text().count("certificate verify failed") >= 2
            assert all(a.connected for a in others)
            assert all(a.session is not None and a.session.connects == 1 for a in others)
            out = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "noc", "-c", str(config_path), "crl"],
                capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
            )  # fmt: skip
            assert out.returncode == 0 and "1 revoked" in out.stdout, out.stderr
            await asyncio.sleep(1.0)
            assert not victim.connected and all(a.connected for a in others)
            return dropped
        finally:
            await fleet.close()

    dropped = asyncio.run(scenario())
    assert dropped < 2.0
