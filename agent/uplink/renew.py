"""Certificate rotation without a person: at two thirds of its life, over the vendor's endpoint.

The daemon runs a :class:`Renewer` beside the uplink when the box was enrolled
(``enroll`` configured, the uplink's certificate under ``STATE_DIR/tls``):

1. It sleeps until two thirds of the certificate's lifetime, less a random
   jitter of up to 5 % of it (90-day certificates: day 60, spread over 4.5 days,
   so a fleet enrolled on one day does not renew in the same minute).
2. While the customer's switch is off it renews nothing (disconnecting stops
   administration). A certificate that expired meanwhile cannot renew: the
   box needs a new enrollment token (status says so).
3. ``key``/``request``: a new key and request with the same CN, made here.
4. ``connect``/``token``/``response``/``check``: ``POST …/simplereenroll``
   (EST-shaped) with the current certificate and a signature by the current
   key over the request as proof of possession; the reply is checked as at
   enrollment.
5. ``install``: a new folder, and ``tls/current`` swapped to it; the old folder
   is kept.
6. ``reconnect``: the uplink sends DISCONNECT and connects again at once with
   the new files. Envelopes not yet acknowledged stay in the outbox and go on
   the new connection: none lost, duplicates only within the in-flight window.
   Once connected, the old folder is deleted. If the new certificate does not
   connect within a minute, ``current`` goes back to the old one.

Every attempt is one ``renew`` ledger entry. The clock and the sleep are
injectable, so tests run certificates of seconds.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import http.client
import random
import shutil
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from agent.errors import EnrollmentError
from agent.uplink import enroll as enrolling

if TYPE_CHECKING:
    from agent.ledger import Ledger
    from agent.sections import EnrollConfig, UplinkConfig

log = structlog.get_logger(__name__)

RENEW_AT = 2 / 3  # of the lifetime
JITTER = 0.05  # of the lifetime, taken off at random
WARN_DAYS = 14.0
CONNECT_DEADLINE = 60.0  # for the new certificate's first connection
RETRY_MIN, RETRY_MAX = 30.0, 3600.0  # after a failed attempt (and a tenth of the time left)
SWITCH_POLL = 5.0


@dataclass(frozen=True)
class CertInfo:
    """What status shows of the uplink's certificate."""

    subject: str
    issuer: str
    serial: str
    not_before: float
    not_after: float

    def status(self, now: float) -> dict[str, Any]:
        """Subject, issuer, expiry, days left, and a warning under 14 days."""
        days = (self.not_after - now) / 86400
        out: dict[str, Any] = {
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": self.serial,
            "not_after": self.not_after,
            "days_left": round(days, 1),
        }
        if days < 0:
            out["warning"] = "expired: the box needs a new enrollment token (agentctl enroll)"
        elif days < WARN_DAYS:
            out["warning"] = f"expires in {days:.1f} days"
        return out


_read: dict[Path, tuple[tuple[int, int, int], CertInfo]] = {}


def read_cert(path: Path) -> CertInfo:
    """The certificate at ``path``; EnrollmentError (step ``check``) when unreadable.

    Status and every health record ask: the file is parsed again only when it changed.
    """
    # The standard-library reader: status and health must not keep cryptography
    # resident in the idle daemon (issue 17).
    from agent.uplink import x509

    try:
        st = path.stat()
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        known = _read.get(path)
        if known is not None and known[0] == stamp:
            return known[1]
        cert = x509.load_pem_certificates(path.read_bytes())[0]
    except (OSError, ValueError) as exc:
        raise EnrollmentError("check", f"{path}: cannot read the certificate: {exc}") from exc
    info = CertInfo(
        subject=cert.subject,
        issuer=cert.issuer,
        serial=f"{cert.serial:x}",
        not_before=cert.not_before.timestamp(),
        not_after=cert.not_after.timestamp(),
    )
    _read[path] = (stamp, info)
    return info


def due(info: CertInfo, rng: random.Random) -> float:
    """When to renew: two thirds of the lifetime, less up to 5 % of it at random."""
    life = info.not_after - info.not_before
    return info.not_before + life * RENEW_AT - life * JITTER * rng.random()


def _post_reenroll(cfg: EnrollConfig, cert_der: bytes, proof: bytes, body: bytes) -> bytes:
    try:
        ctx = ssl.create_default_context(cafile=str(cfg.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise EnrollmentError(
            "connect", f"{cfg.ca_file}: cannot load the pinned CA: {exc}"
        ) from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    conn = http.client.HTTPSConnection(cfg.host, cfg.port, context=ctx, timeout=cfg.timeout)
    try:
        conn.request(
            "POST",
            f"{cfg.path}/simplereenroll",
            body=body,
            headers={
                "Content-Type": "application/pkcs10",
                "Content-Transfer-Encoding": "base64",
                "X-PBX-Certificate": base64.b64encode(cert_der).decode(),
                "X-PBX-Proof": base64.b64encode(proof).decode(),
            },
        )
        resp = conn.getresponse()
        data = resp.read(enrolling.MAX_RESPONSE + 1)
    except ssl.SSLCertVerificationError as exc:
        raise EnrollmentError(
            "connect", f"{cfg.url}: not vouched for by the pinned CA ({exc.verify_message})"
        ) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise EnrollmentError("connect", f"{cfg.url}: {exc or type(exc).__name__}") from exc
    finally:
        conn.close()
    if resp.status == 401:
        text = data[:200].decode("utf-8", "replace").strip()
        raise EnrollmentError("token", f"the vendor refused the renewal: {text}")
    if resp.status != 200:
        text = data[:300].decode("utf-8", "replace").strip()
        raise EnrollmentError("response", f"{cfg.url}: HTTP {resp.status}: {text}")
    return data


def renew_once(
    cfg: EnrollConfig, uplink: UplinkConfig, device_id: str, state_dir: Path
) -> enrolling.Installed:
    """One renewal, blocking: new key and request, proof with the current key, install."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        current = x509.load_pem_x509_certificate(uplink.cert_file.read_bytes())
        old_key = serialization.load_pem_private_key(uplink.key_file.read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise EnrollmentError("key", f"cannot read the current certificate or key: {exc}") from exc
    if not isinstance(old_key, ec.EllipticCurvePrivateKey):
        raise EnrollmentError("key", "the current key is not an EC key")
    key, key_pem, request = enrolling.make_key_and_request(device_id)
    csr_der = base64.b64decode(request)
    proof = old_key.sign(csr_der, ec.ECDSA(hashes.SHA256()))
    ca_pem, pinned = enrolling._pinned(cfg.ca_file)
    body = _post_reenroll(cfg, current.public_bytes(serialization.Encoding.DER), proof, request)
    leaf = enrolling._check(body, key, device_id, pinned, dt.datetime.now(dt.UTC))
    try:
        return enrolling.install(state_dir, device_id, key_pem, leaf, ca_pem)
    except OSError as exc:
        raise EnrollmentError("install", f"{enrolling.tls_root(state_dir)}: {exc}") from exc


class Renewer:
    """Renews the uplink's certificate at two thirds of its life; one ``renew`` entry each."""

    def __init__(
        self,
        *,
        cfg: EnrollConfig,
        uplink: UplinkConfig,
        device_id: str,
        state_dir: Path,
        switch_on: Callable[[], bool],
        ledger: Ledger,
        session: Any,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.uplink = uplink
        self.device_id = device_id
        self.state_dir = state_dir
        self.switch_on = switch_on
        self.ledger = ledger
        self.session = session
        self.clock = clock
        self.sleep = sleep
        self.rng = rng or random.Random()  # noqa: S311 -- jitter, not a secret
        self.next_at: float | None = None
        self.last_error: str | None = None
        self.renewals = 0
        self.last_pause: float | None = None  # seconds without a connection, last renewal

    def status(self) -> dict[str, Any]:
        """The certificate, the next renewal, the last failure (step and why)."""
        out: dict[str, Any] = {"renewals": self.renewals, "next_renewal": self.next_at}
        try:
            out["certificate"] = read_cert(self.uplink.cert_file).status(self.clock())
        except EnrollmentError as exc:
            out["certificate"] = {"error": str(exc)}
        if self.last_error:
            out["last_error"] = self.last_error
        if self.last_pause is not None:
            out["last_pause"] = round(self.last_pause, 3)
        return out

    async def run(self) -> None:
        """Until cancelled: wait for the due time, renew, repeat."""
        failures = 0
        while True:
            info = await asyncio.to_thread(read_cert, self.uplink.cert_file)
            self.next_at = at = due(info, self.rng) if failures == 0 else self.next_at or 0.0
            now = self.clock()
            if now < at:
                await self.sleep(min(at - now, RETRY_MAX))
                continue
            if not self.switch_on():
                await self.sleep(SWITCH_POLL)  # nothing is renewed while severed
                continue
            if now > info.not_after:
                self.last_error = "the certificate expired: a new enrollment token is needed"
                await self.sleep(RETRY_MAX)
                continue
            try:
                await self.renew()
                failures = 0
            except EnrollmentError as exc:
                failures += 1
                wait = max(RETRY_MIN, min(RETRY_MAX, (info.not_after - now) / 10))
                self.next_at = now + wait
                log.warning("renew_failed", step=exc.step, error=str(exc), retry_in=wait)

    async def renew(self) -> enrolling.Installed:
        """One renewal now: get, install, reconnect, keep the old until the new connected."""
        old_folder = (enrolling.tls_root(self.state_dir) / enrolling.CURRENT).resolve()
        entry: dict[str, Any] = {}
        try:
            installed = await asyncio.to_thread(
                renew_once, self.cfg, self.uplink, self.device_id, self.state_dir
            )
            entry.update(serial=installed.serial, not_after=installed.not_after)
            before = self.session.connects
            t0 = time.monotonic()
            await self.session.renew_connection()
            if not await self._connected_after(before):
                _point(self.state_dir, old_folder)  # back to what worked
                await self.session.renew_connection()
                raise EnrollmentError(
                    "reconnect",
                    f"the new certificate did not connect within {CONNECT_DEADLINE:g} s; "
                    "back to the old one",
                )
            self.last_pause = time.monotonic() - t0
        except EnrollmentError as exc:
            self.last_error = str(exc)
            self.ledger.record("renew", {**entry, "ok": False, "step": exc.step, "error": str(exc)})
            raise
        if old_folder != installed.folder.resolve():
            shutil.rmtree(old_folder, ignore_errors=True)
        self.renewals += 1
        self.last_error = None
        self.ledger.record("renew", {**entry, "ok": True, "pause": round(self.last_pause, 3)})
        log.info("certificate_renewed", serial=installed.serial, pause=round(self.last_pause, 3))
        return installed

    async def _connected_after(self, before: int) -> bool:
        deadline = time.monotonic() + CONNECT_DEADLINE
        while time.monotonic() < deadline:
            if self.session.connects > before and self.session.state == "connected":
                return True
            await asyncio.sleep(0.01)
        return False


def _point(state_dir: Path, folder: Path) -> None:
    """Swap ``tls/current`` to ``folder`` (atomically)."""
    import os

    root = enrolling.tls_root(state_dir)
    link = root / f".{enrolling.CURRENT}.back"
    link.unlink(missing_ok=True)
    os.symlink(folder.name, link)
    os.replace(link, root / enrolling.CURRENT)
