"""Device identity benchmarks, run by hand; they print figures beside a baseline, never assert.

Everything is real: the daemon as a subprocess, ``noc enroll`` over TLS on
PostgreSQL, a private mosquitto with mutual TLS and a CRL, a NOC listener.

1. Enrollment: from ``agentctl enroll --token`` (daemon running, no uplink yet)
   to the first envelope at the NOC: key, CSR, HTTPS, the CA, install, the
   uplink section written, reload, TLS + MQTT connect, the first health record.
2. Rotation pause: with 6-second certificates, the time without a connection
   during each renewal (DISCONNECT to the new connection's CONNACK, subscribe
   and ``online``; the ledger's ``renew`` entries carry it).

Baseline for both, in the same run: ``agentctl uplink on`` after ``off`` to
connected (a plain reconnect with a certificate already in place).

    PYTHONPATH=. python bench/bench_identity.py [--enrollments 5] [--rotate-for 30]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import psycopg

from noc import db
from noc import enroll as noc_enroll
from tests.support.daemon import AgentProcess, wait_for
from tests.support.mosquitto import Mosquitto
from tests.support.noc import NocListener
from tests.support.pki import temporary_pki
from tests.support.postgres import Postgres
from tests.test_enrollment import DEVICE, agent_config, start_endpoint


def crl_broker(pki: object, work: Path) -> Mosquitto:
    """A broker that reads a CRL, as the rotation needs."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca = pki.ca  # type: ignore[attr-defined]
    now = dt.datetime.now(dt.UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )
    (work / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    (work / "crl.pem").chmod(0o644)
    b = Mosquitto(pki, workdir=work, extra_config=f"crlfile {work / 'crl.pem'}\n")  # type: ignore[arg-type]
    b.start()
    (work / "mosquitto.pid").write_text(str(b.pid))
    return b


def token(dsn: str) -> str:
    """A fresh enrollment token for DEVICE."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return noc_enroll.new_token(conn, DEVICE, ttl=3600)


def reconnect_baseline(agent: AgentProcess) -> float:
    """`uplink on` after `off`, to connected."""
    agent.ctl("uplink", "off", check=True)
    t0 = time.monotonic()
    agent.ctl("uplink", "on", check=True)
    wait_for(lambda: agent.status()["uplink"]["state"] == "connected", timeout=20)
    return time.monotonic() - t0


def main() -> int:
    """Run both measurements and print them."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--enrollments", type=int, default=5)
    ap.add_argument("--rotate-for", type=float, default=30.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pbx-bench-identity-"))
    work.chmod(0o755)
    enrolls: list[float] = []
    baselines: list[float] = []
    pauses: list[float] = []
    try:
        with temporary_pki() as pki, Postgres() as pg:
            broker = crl_broker(pki, work)
            dsn = pg.create_database("bench_identity")
            db.migrate(dsn)
            long = start_endpoint(work / "noc-90d", pki, broker, dsn, "90d")
            short = start_endpoint(work / "noc-6s", pki, broker, dsn, "6s")
            try:
                with NocListener(broker, f"pbx/{DEVICE}/#") as noc:
                    for i in range(args.enrollments):
                        root = work / f"box-{i}"
                        agent = AgentProcess(root, agent_config(root, pki, long, broker))
                        try:
                            agent.start()
                            seen = len(noc.snapshot())
                            t0 = time.monotonic()
                            agent.ctl("enroll", "--token", token(dsn), check=True, timeout=60)
                            wait_for(
                                lambda seen=seen: any(  # type: ignore[misc]
                                    m.topic.startswith(f"pbx/{DEVICE}/up/")
                                    for m in noc.snapshot()[seen:]
                                ),
                                timeout=30,
                            )
                            enrolls.append(time.monotonic() - t0)
                            baselines.append(reconnect_baseline(agent))
                        finally:
                            agent.close()
                root = work / "box-rotate"
                agent = AgentProcess(root, agent_config(root, pki, short, broker))
                try:
                    agent.start()
                    agent.ctl("enroll", "--token", token(dsn), check=True, timeout=60)
                    time.sleep(args.rotate_for)
                    out = agent.ctl("audit", "--kind", "renew", "--json", check=True)
                    entries = [json.loads(line) for line in out.stdout.splitlines()]
                    pauses = [e["pause"] for e in entries if e.get("ok")]
                    failed = sum(1 for e in entries if not e.get("ok"))
                finally:
                    agent.close()
            finally:
                long.proc.stop()
                short.proc.stop()
                broker.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def ms(xs: list[float]) -> str:
        return (
            f"median {statistics.median(xs) * 1000:.0f} ms, min {min(xs) * 1000:.0f}, "
            f"max {max(xs) * 1000:.0f} (n={len(xs)})"
        )

    print(f"enroll -> first envelope at the NOC   {ms(enrolls)}")
    print(f"rotation pause (no connection)        {ms(pauses)}; {failed} failed renewals")
    print(f"baseline: uplink on -> connected      {ms(baselines)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
