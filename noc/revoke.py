"""Revocation that takes effect without restarting the broker: a CRL for new connections, and
mosquitto's dynamic-security plugin to drop the live one.

    noc device revoke ID     every certificate issued to ID is marked revoked; the CRL is
                             written again and the broker reloads it (SIGHUP); the live
                             session is dropped (dynamic security ``disableClient``)
    noc crl                  write the CRL again (run daily: see "nextUpdate" below)

What Debian's mosquitto 2.0.11 does, measured (``tests/test_revocation.py``):

* With ``use_identity_as_username`` the broker never asks an authentication
  plugin about a certificate client, so ``disableClient`` alone kicks the live
  session (at once, reason "administrative action") but the box reconnects at
  once and has its old rights. Dynamic security cannot refuse a certificate.
* ``crlfile`` is read again on SIGHUP: a revoked certificate's next TLS
  handshake fails ("certificate verify failed") while every other session stays
  up. A CRL only applies at the handshake, so the live session needs the kick.
* A CRL whose ``nextUpdate`` has passed makes OpenSSL refuse *every* client
  certificate. So the CRL is written with ``revocation.crl_validity`` (7 days) of
  validity, and ``noc crl`` must run well within that (a daily timer).

Certificates are found in ``device_certificates`` (those issued by enrollment
and renewal); a hand-made certificate is revoked by serial with ``--serial``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import signal
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from noc import mqtt
from noc.ca import CA, CAError, write_public
from noc.config import NocConfig
from noc.errors import BrokerError, UsageError
from noc.store import DEVICE_ID

log = structlog.get_logger(__name__)

DYNSEC_TOPIC = "$CONTROL/dynamic-security/v1"


def mark_revoked(conn: Any, device: str, serials: list[str]) -> list[str]:
    """Mark every live certificate of ``device`` (and ``serials``) revoked; the serials."""
    rows = conn.execute(
        "UPDATE device_certificates SET revoked_at = now()"
        " WHERE device_id = %s AND revoked_at IS NULL RETURNING serial",
        (device,),
    ).fetchall()
    out = [str(r[0]) for r in rows]
    for serial in serials:
        conn.execute(
            "INSERT INTO device_certificates (serial, device_id, not_before, not_after, how,"
            " revoked_at) VALUES (%s, %s, now(), now() + interval '10 years', 'enroll', now())"
            " ON CONFLICT (serial) DO UPDATE SET revoked_at = COALESCE("
            " device_certificates.revoked_at, now())",
            (serial, device),
        )
        out.append(serial)
    return out


def write_crl(conn: Any, ca: CA, path: Path, *, seconds: float) -> int:
    """The CRL of every revoked certificate not yet expired, signed by the CA; how many."""
    rows = conn.execute(
        "SELECT serial, revoked_at FROM device_certificates"
        " WHERE revoked_at IS NOT NULL AND not_after > now() ORDER BY serial"
    ).fetchall()
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - dt.timedelta(minutes=5))  # a broker whose clock lags a little
        .next_update(now + dt.timedelta(seconds=seconds))
    )
    for serial, revoked_at in rows:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(int(serial))
            .revocation_date(revoked_at)
            .build()
        )
    crl = builder.sign(ca.key, hashes.SHA256())
    write_public(path, crl.public_bytes(serialization.Encoding.PEM))
    return len(rows)


def reload_broker(pid_file: Path) -> int:
    """SIGHUP the broker: mosquitto reads its CRL again. The pid signalled."""
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        raise BrokerError(
            f"revocation.broker_pid_file {pid_file}: cannot signal the broker to reload its "
            f"CRL ({exc})"
        ) from exc
    return pid


def kick(config: NocConfig, device: str, *, timeout: float = 5.0) -> dict[str, Any]:
    """Drop ``device``'s live session through dynamic security (createClient, disableClient)."""
    corr = secrets.token_hex(8)

    def pick(body: Any) -> dict[str, Any] | None:
        for r in body.get("responses", []) if isinstance(body, dict) else []:
            # mosquitto 2.0.11 does not echo correlationData; newer versions do.
            if r.get("command") == "disableClient" and r.get("correlationData", corr) == corr:
                return dict(r)
        return None

    with mqtt.listening(
        config.broker,
        client_id=f"noc-revoke-{secrets.token_hex(4)}",
        topic=f"{DYNSEC_TOPIC}/response",
        pick=pick,
        confirm=timeout,
        unconfirmed="the broker did not confirm the dynamic-security subscription",
    ) as (c, answered):
        commands = [
            # Fails harmlessly when the client exists already (revoked before).
            {"command": "createClient", "username": device},
            {"command": "disableClient", "username": device, "correlationData": corr},
            # Then gone again, so that a certificate enrolled later for this id is judged by
            # the ACL file as before; the CRL keeps the revoked one out.
            {"command": "deleteClient", "username": device},
        ]
        c.publish(DYNSEC_TOPIC, json.dumps({"commands": commands}), qos=1)
        answer = answered.wait(timeout)
        if answer is None:
            raise BrokerError(
                "the broker did not answer the dynamic-security disableClient within "
                f"{timeout:g} s: is mosquitto_dynamic_security.so loaded, and may the NOC's "
                "client use $CONTROL/dynamic-security (etc/mosquitto-example.conf)?"
            )
    if answer.get("error"):
        raise BrokerError(f"dynamic security refused disableClient: {answer['error']}")
    return answer


def revoke(
    config: NocConfig, pool: Any, device: str, serials: list[str] | None = None
) -> dict[str, Any]:
    """The whole revocation: database, CRL, broker reload, live session dropped."""
    if not DEVICE_ID.match(device):
        raise UsageError(f"device {device!r}: not a device id")
    r = config.revocation
    try:
        ca = CA.load(config.enroll.ca_dir)
    except CAError as exc:
        raise UsageError(f"enroll.ca_dir: {exc}") from exc
    with pool.connection() as conn, conn.transaction():
        revoked = mark_revoked(conn, device, serials or [])
        listed = write_crl(conn, ca, r.crl_file, seconds=r.crl_validity)
    pid = reload_broker(r.broker_pid_file)
    kicked = kick(config, device)
    log.warning("device_revoked", device=device, serials=revoked, crl_entries=listed)
    return {"serials": revoked, "crl_entries": listed, "broker_pid": pid, "kicked": bool(kicked)}


def refresh(config: NocConfig, pool: Any) -> int:
    """Write the CRL again and reload the broker (before its nextUpdate passes)."""
    try:
        ca = CA.load(config.enroll.ca_dir)
    except CAError as exc:
        raise UsageError(f"enroll.ca_dir: {exc}") from exc
    with pool.connection() as conn:
        listed = write_crl(
            conn, ca, config.revocation.crl_file, seconds=config.revocation.crl_validity
        )
    reload_broker(config.revocation.broker_pid_file)
    return listed
