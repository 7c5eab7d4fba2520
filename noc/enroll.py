"""Enrollment: a box trades a one-time token for its first certificate, over HTTPS shaped like EST.

    noc device add ID                  prints a token: 128 random bits, valid enroll.token_ttl
                                       (24 h), bound to ID, kept only as its SHA-256, single use
    noc enroll                         the HTTPS endpoint (enroll.host:enroll.port, TLS with
                                       enroll.cert_file, a server certificate of the vendor CA)

The endpoint follows RFC 7030 (EST) where it can, so that its shape is known
and any EST client can be pointed at it:

    POST /.well-known/est/simpleenroll
        Authorization: Bearer TOKEN
        Content-Type: application/pkcs10          body: base64 of the DER PKCS#10 request
    200 Content-Type: application/pkcs7-mime; smime-type=certs-only
        body: base64 of a DER PKCS#7 certs-only bag: the device certificate, then the CA
    GET  /.well-known/est/cacerts                 the CA certificate, the same way

The server is authenticated by TLS (the box pins the vendor CA); the box is
authenticated by the token (EST's HTTP-based client authentication, with a
bearer token instead of a password). The request must be signed by its key
(proof of possession) and name CN = the token's device id; only that CN and the
public key are taken from it. A token is spent atomically (one UPDATE … WHERE
used_at IS NULL AND expires_at > now() AND device_id = CN): a token used twice,
expired, unknown or for another id gets 401 and the same terse answer, while the
log says which it was. Every certificate issued is recorded in
``device_certificates`` and its expiry in ``devices.cert_not_after``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import secrets
from typing import Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from psycopg_pool import ConnectionPool
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from noc.ca import CA, CAError
from noc.config import NocConfig
from noc.errors import NocError, UsageError
from noc.store import DEVICE_ID

log = structlog.get_logger(__name__)

EST_PREFIX = "/.well-known/est"
MAX_REQUEST = 16 * 1024  # a P-256 CSR is about 400 bytes in base64
TOKEN_BYTES = 16  # 128 bits


def token_hash(token: str) -> bytes:
    """What is stored for a token: 128 random bits need no slow hash, SHA-256 is enough."""
    return hashlib.sha256(token.encode()).digest()


def new_token(conn: Any, device_id: str, *, ttl: float, created_by: str | None = None) -> str:
    """A fresh one-time token for ``device_id`` (shown once; only its hash is kept)."""
    if not DEVICE_ID.match(device_id):
        raise UsageError(f"device {device_id!r}: not a device id")
    token = secrets.token_urlsafe(TOKEN_BYTES)
    conn.execute(
        "INSERT INTO enrollment_tokens (token_hash, device_id, expires_at, created_by)"
        " VALUES (%s, %s, now() + make_interval(secs => %s), %s)",
        (token_hash(token), device_id, ttl, created_by),
    )
    return token


def redeem(conn: Any, token: str, device_id: str, address: str) -> bool:
    """Spend ``token`` for ``device_id``; False (and the reason logged) when it cannot be."""
    row = conn.execute(
        "UPDATE enrollment_tokens SET used_at = now(), used_from = %s"
        " WHERE token_hash = %s AND device_id = %s AND used_at IS NULL AND expires_at > now()"
        " RETURNING device_id",
        (address, token_hash(token), device_id),
    ).fetchone()
    if row is not None:
        return True
    found = conn.execute(
        "SELECT device_id, used_at, expires_at < now() FROM enrollment_tokens"
        " WHERE token_hash = %s",
        (token_hash(token),),
    ).fetchone()
    if found is None:
        why = "unknown token"
    elif found[0] != device_id:
        why = f"token for {found[0]}"
    elif found[1] is not None:
        why = "token already used"
    else:
        why = "token expired"
    log.warning("enroll_refused", device=device_id, reason=why, address=address)
    return False


def record_certificate(conn: Any, cert: x509.Certificate, device_id: str, how: str) -> None:
    """Keep the issued certificate's serial and validity; the device's expiry follows it."""
    conn.execute(
        "INSERT INTO device_certificates (serial, device_id, not_before, not_after, how)"
        " VALUES (%s, %s, %s, %s, %s)",
        (
            str(cert.serial_number),
            device_id,
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
            how,
        ),
    )
    conn.execute(
        "INSERT INTO devices (device_id, cert_not_after) VALUES (%s, %s)"
        " ON CONFLICT (device_id) DO UPDATE SET cert_not_after = EXCLUDED.cert_not_after",
        (device_id, cert.not_valid_after_utc),
    )


def certs_only(certs: list[x509.Certificate]) -> bytes:
    """An EST response body: base64 of a DER PKCS#7 certs-only bag."""
    der = pkcs7.serialize_certificates(certs, serialization.Encoding.DER)
    return base64.encodebytes(der)


def _refuse(status: int, text: str) -> Response:
    return PlainTextResponse(text + "\n", status_code=status)


class Enrollment:
    """The EST endpoints over a CA and the NOC's database."""

    def __init__(self, config: NocConfig, pool: ConnectionPool, ca: CA) -> None:
        self.config = config
        self.pool = pool
        self.ca = ca

    def app(self) -> Starlette:
        """The Starlette application."""
        return Starlette(
            routes=[
                Route(f"{EST_PREFIX}/simpleenroll", self.simpleenroll, methods=["POST"]),
                Route(f"{EST_PREFIX}/simplereenroll", self.simplereenroll, methods=["POST"]),
                Route(f"{EST_PREFIX}/cacerts", self.cacerts, methods=["GET"]),
            ]
        )

    def _certify(
        self, csr: x509.CertificateSigningRequest, cn: str, lifetime: dt.timedelta
    ) -> x509.Certificate:
        now = dt.datetime.now(dt.UTC)
        return self.ca.certify_request(
            csr, device_id=cn, not_after=now + lifetime, not_before=now - _backdate(lifetime)
        )

    async def cacerts(self, request: Request) -> Response:
        """The CA certificate (RFC 7030 4.1)."""
        return Response(
            certs_only([self.ca.cert]),
            media_type="application/pkcs7-mime",
            headers={"Content-Transfer-Encoding": "base64"},
        )

    async def simpleenroll(self, request: Request) -> Response:
        """A certificate for a request authorized by a one-time token (RFC 7030 4.2)."""
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _refuse(401, "an enrollment token is required (Authorization: Bearer TOKEN)")
        body = await request.body()
        if len(body) > MAX_REQUEST:
            return _refuse(413, f"request too large (limit {MAX_REQUEST} bytes)")
        try:
            der = base64.b64decode(b"".join(body.split()), validate=True)
            csr = x509.load_der_x509_csr(der)
        except (binascii.Error, ValueError):
            return _refuse(400, "the body must be a base64 DER PKCS#10 request")
        cns = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        cn = str(cns[0].value) if len(cns) == 1 else ""
        if not DEVICE_ID.match(cn):
            return _refuse(400, "the request's subject must be CN=<device id>")
        address = request.client.host if request.client else "?"
        return await run_in_threadpool(self._issue, csr, cn, token.strip(), address)

    async def simplereenroll(self, request: Request) -> Response:
        """A new certificate for a box that proves it holds its current one (RFC 7030 4.2.2).

        EST authenticates re-enrollment by the TLS client certificate; uvicorn does not
        hand the peer certificate to the application, so the box sends its current
        certificate (``X-PBX-Certificate``, base64 DER) and a signature by its current
        key over the request (``X-PBX-Proof``, ECDSA-SHA256 over the DER PKCS#10): the
        same proof of possession, at the application layer. A certificate revoked (or
        superseded by a renewal) cannot renew, so a replayed request gets nothing.
        """
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        csr = _request(await request.body())
        if csr is None:
            return _refuse(400, "the body must be a base64 DER PKCS#10 request")
        try:
            current = x509.load_der_x509_certificate(
                base64.b64decode(request.headers.get("x-pbx-certificate", ""), validate=True)
            )
            proof = base64.b64decode(request.headers.get("x-pbx-proof", ""), validate=True)
        except (binascii.Error, ValueError):
            return _refuse(401, "re-enrollment needs X-PBX-Certificate and X-PBX-Proof")
        try:
            current.verify_directly_issued_by(self.ca.cert)
            key = current.public_key()
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise TypeError("not an EC key")
            key.verify(
                proof, csr.public_bytes(serialization.Encoding.DER), ec.ECDSA(hashes.SHA256())
            )
        except (ValueError, TypeError, InvalidSignature):
            return _refuse(401, "the current certificate or the proof does not verify")
        now = dt.datetime.now(dt.UTC)
        if not current.not_valid_before_utc <= now <= current.not_valid_after_utc:
            return _refuse(401, "the current certificate has expired: enroll again with a token")
        cns = current.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        cn = str(cns[0].value) if len(cns) == 1 else ""
        req_cns = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if not DEVICE_ID.match(cn) or [str(c.value) for c in req_cns] != [cn]:
            return _refuse(400, "the request must be for the current certificate's CN")
        address = request.client.host if request.client else "?"
        return await run_in_threadpool(self._renew, csr, current, cn, address)

    def _renew(
        self,
        csr: x509.CertificateSigningRequest,
        current: x509.Certificate,
        cn: str,
        address: str,
    ) -> Response:
        from noc import revoke

        lifetime = dt.timedelta(seconds=self.config.enroll.lifetime)
        old = str(current.serial_number)
        if not csr.is_signature_valid:
            return _refuse(400, "the request's signature does not verify")
        r = self.config.revocation
        with self.pool.connection() as conn, conn.transaction():
            row = conn.execute(
                "SELECT revoked_at FROM device_certificates WHERE serial = %s", (old,)
            ).fetchone()
            if row is not None and row[0] is not None:
                log.warning("renew_refused", device=cn, serial=old, reason="revoked")
                return _refuse(401, "the current certificate is revoked or already renewed")
            cert = self._certify(csr, cn, lifetime)
            record_certificate(conn, cert, cn, "renew")
            # The old certificate (and any other of this box) is superseded: the broker
            # refuses it from the next handshake on. The live session is not touched.
            revoke.mark_revoked(conn, cn, [] if row is not None else [old])
            conn.execute(
                "UPDATE device_certificates SET revoked_at = NULL WHERE serial = %s",
                (str(cert.serial_number),),
            )
            crl = r.crl_file.parent.is_dir()
            if crl:
                revoke.write_crl(conn, self.ca, r.crl_file, seconds=r.crl_validity)
        if crl:
            try:
                revoke.reload_broker(r.broker_pid_file)
            except NocError as exc:
                log.warning("renew_crl_not_reloaded", error=str(exc))
        log.info("renewed", device=cn, serial=str(cert.serial_number), old=old, address=address)
        return Response(
            certs_only([cert, self.ca.cert]),
            media_type="application/pkcs7-mime; smime-type=certs-only",
            headers={"Content-Transfer-Encoding": "base64"},
        )

    def _issue(
        self, csr: x509.CertificateSigningRequest, cn: str, token: str, address: str
    ) -> Response:
        lifetime = dt.timedelta(seconds=self.config.enroll.lifetime)
        try:
            # Checked before the token is spent: a bad request does not cost the customer it.
            if not csr.is_signature_valid:
                return _refuse(400, "the request's signature does not verify")
            with self.pool.connection() as conn, conn.transaction():
                if not redeem(conn, token, cn, address):
                    return _refuse(
                        401, "token refused: unknown, already used, expired, or for another device"
                    )
                cert = self._certify(csr, cn, lifetime)
                record_certificate(conn, cert, cn, "enroll")
        except CAError as exc:
            return _refuse(400, str(exc))
        log.info("enrolled", device=cn, serial=str(cert.serial_number), address=address)
        return Response(
            certs_only([cert, self.ca.cert]),
            media_type="application/pkcs7-mime; smime-type=certs-only",
            headers={"Content-Transfer-Encoding": "base64"},
        )


def _request(body: bytes) -> x509.CertificateSigningRequest | None:
    if len(body) > MAX_REQUEST:
        return None
    try:
        return x509.load_der_x509_csr(base64.b64decode(b"".join(body.split()), validate=True))
    except (binascii.Error, ValueError):
        return None


def _backdate(lifetime: dt.timedelta) -> dt.timedelta:
    """A little before now, for boxes whose clocks lag: 5 minutes, less for short lives."""
    return min(dt.timedelta(minutes=5), lifetime / 20)


def serve(config: NocConfig) -> int:
    """Run the enrollment endpoint with uvicorn over TLS until SIGTERM (``noc enroll``)."""
    import uvicorn

    from noc import db

    e = config.enroll
    try:
        ca = CA.load(e.ca_dir)
    except CAError as exc:
        raise UsageError(f"enroll.ca_dir: {exc}") from exc
    pool = db.pool(config.database, min_size=1, max_size=4, name="noc-enroll")
    try:
        app = Enrollment(config, pool, ca).app()
        log.info("enroll_started", url=f"https://{e.host}:{e.port}{EST_PREFIX}/")
        uvicorn.run(
            app, host=e.host, port=e.port, log_level="warning", access_log=False,
            ssl_certfile=str(e.cert_file), ssl_keyfile=str(e.key_file),
        )  # fmt: skip
    finally:
        pool.close()
    return 0
