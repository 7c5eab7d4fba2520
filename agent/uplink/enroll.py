"""Enrollment: the box trades a one-time token for its certificate; its key never leaves it.

``agentctl enroll --token TOKEN`` asks the daemon (control request ``enroll``,
admin only), which runs as the service user, so the key it makes is that
user's, mode 0600, in ``STATE_DIR/tls``:

1. ``switch``: refused while the customer's switch is off (enrollment talks to
   the vendor, and disconnecting stops administration).
2. ``key``: a new EC P-256 key, made here.
3. ``request``: a PKCS#10 request for CN = ``device_id``, signed by that key.
4. ``connect``: HTTPS to ``enroll.url`` with the vendor CA in ``enroll.ca_file``
   the only trust anchor and the host name checked (the standard library's
   ``http.client`` and ``ssl``: no new dependency), ``POST …/simpleenroll``
   shaped like RFC 7030 (EST), the token as ``Authorization: Bearer``.
5. ``token``: the vendor refused the token (unknown, used, expired, or for
   another device).
6. ``response``/``check``: a PKCS#7 certs-only reply holding a certificate for
   this key, with CN = ``device_id``, issued by the pinned CA, valid now.
7. ``install``: key, certificate and the pinned CA written to a new folder
   ``tls/cert-<serial>/``, checked as the uplink checks them, then the
   ``tls/current`` link is swapped to it atomically (``rename``): the uplink
   sees the old files or the new ones, never a mix.

Every attempt is one ``enroll`` ledger entry (``ok``, and on failure the step
and why). ``cryptography`` and ``http.client`` are imported only when enrolling.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog

from agent.errors import EnrollmentError, RequestRefused, TLSMaterialError

if TYPE_CHECKING:
    from agent import control
    from agent.ledger import Ledger
    from agent.sections import EnrollConfig

log = structlog.get_logger(__name__)

TLS_DIR = "tls"
CURRENT = "current"
KEY_NAME = "device.key"
CERT_NAME = "device.crt"
CA_NAME = "ca.pem"
MAX_RESPONSE = 64 * 1024
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_.~+/=-]{16,128}")


def tls_root(state_dir: Path) -> Path:
    """Where enrolled material lives: one folder per certificate, and the ``current`` link."""
    return state_dir / TLS_DIR


def current_files(state_dir: Path) -> tuple[Path, Path, Path]:
    """The paths the uplink section names after enrollment: (ca_file, cert_file, key_file)."""
    cur = tls_root(state_dir) / CURRENT
    return cur / CA_NAME, cur / CERT_NAME, cur / KEY_NAME


@dataclass(frozen=True)
class Installed:
    """What enrollment installed."""

    folder: Path
    ca_file: Path
    cert_file: Path
    key_file: Path
    subject: str
    issuer: str
    serial: str
    not_after: float

    def to_json(self) -> dict[str, Any]:
        """For the control reply."""
        return {
            "folder": str(self.folder),
            "ca_file": str(self.ca_file),
            "cert_file": str(self.cert_file),
            "key_file": str(self.key_file),
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": self.serial,
            "not_after": self.not_after,
        }


def with_url(cfg: EnrollConfig | None, url: str | None, ca_file: Path | None) -> EnrollConfig:
    """The configured endpoint, or another URL given on the command line."""
    from agent.sections import EnrollConfig

    if url is None:
        if cfg is None:
            raise EnrollmentError(
                "request", "no enroll section in the configuration and no --url given"
            )
        return cfg
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise EnrollmentError("request", f"--url {url!r}: expected https://HOST[:PORT][/PATH]")
    pinned = ca_file or (cfg.ca_file if cfg else None)
    if pinned is None:
        raise EnrollmentError("request", "no enroll.ca_file: the vendor CA must be pinned")
    base = cfg or EnrollConfig(url=url, host=parts.hostname, ca_file=pinned)
    return replace(
        base,
        url=url,
        host=parts.hostname,
        port=parts.port or 443,
        path=parts.path.rstrip("/") or "/.well-known/est",
        ca_file=pinned,
    )


def _step(step: str, exc: BaseException | str) -> EnrollmentError:
    return EnrollmentError(step, str(exc))


def _post(cfg: EnrollConfig, token: str, body: bytes) -> bytes:
    # Imported here: the daemon builds the enroll service at every start, and http.client
    # (with the email package under it) is only needed on the day the box enrolls.
    import http.client
    import ssl

    try:
        ctx = ssl.create_default_context(cafile=str(cfg.ca_file))  # only the pinned CA
    except (OSError, ssl.SSLError) as exc:
        raise _step("connect", f"{cfg.ca_file}: cannot load the pinned vendor CA: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    conn = http.client.HTTPSConnection(cfg.host, cfg.port, context=ctx, timeout=cfg.timeout)
    try:
        conn.request(
            "POST",
            f"{cfg.path}/simpleenroll",
            body=body,
            headers={
                "Content-Type": "application/pkcs10",
                "Content-Transfer-Encoding": "base64",
                "Authorization": f"Bearer {token}",
            },
        )
        resp = conn.getresponse()
        data = resp.read(MAX_RESPONSE + 1)
    except ssl.SSLCertVerificationError as exc:
        raise _step(
            "connect",
            f"{cfg.url}: the server is not who the pinned CA {cfg.ca_file} vouches for "
            f"({exc.verify_message})",
        ) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise _step("connect", f"{cfg.url}: {exc or type(exc).__name__}") from exc
    finally:
        conn.close()
    if resp.status == 401:
        raise _step(
            "token",
            "the vendor refused the token (unknown, already used, expired, or for another "
            "device); ask the vendor for a new one",
        )
    if resp.status != 200:
        text = data[:300].decode("utf-8", "replace").strip()
        raise _step("response", f"{cfg.url}: HTTP {resp.status}: {text}")
    if len(data) > MAX_RESPONSE:
        raise _step("response", f"the reply is larger than {MAX_RESPONSE} bytes")
    return data


def _pinned(ca_file: Path) -> tuple[bytes, list[Any]]:
    from cryptography import x509

    try:
        pem = ca_file.read_bytes()
        return pem, x509.load_pem_x509_certificates(pem)
    except (OSError, ValueError) as exc:
        raise _step("check", f"{ca_file}: cannot read the pinned vendor CA: {exc}") from exc


def _check(body: bytes, key: Any, device_id: str, pinned: list[Any], now: dt.datetime) -> Any:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs7

    try:
        certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(b"".join(body.split())))
    except (binascii.Error, ValueError) as exc:
        raise _step("response", f"not a base64 PKCS#7 certs-only reply ({exc})") from exc
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ours = key.public_key().public_bytes(*spki)
    leaf = next((c for c in certs if c.public_key().public_bytes(*spki) == ours), None)
    if leaf is None:
        raise _step("check", "the reply holds no certificate for this box's key")
    cns = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else None
    if cn != device_id:
        raise _step("check", f"the certificate is for CN {cn!r}, not for {device_id!r}")
    issuer = None
    for ca in pinned:
        try:
            leaf.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        issuer = ca
        break
    if issuer is None:
        raise _step("check", "the certificate is not issued by the pinned vendor CA")
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise _step(
            "check",
            f"the certificate is valid {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now",
        )
    return leaf


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install(state_dir: Path, device_id: str, key_pem: bytes, cert: Any, ca_pem: bytes) -> Installed:
    """Write a new folder, check it as the uplink will, then point ``current`` at it."""
    from cryptography.hazmat.primitives import serialization

    from agent.uplink.material import check_material

    root = tls_root(state_dir)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = f"cert-{cert.serial_number:x}"
    staging = root / f".{name}.new"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    _write(staging / KEY_NAME, key_pem, 0o600)
    _write(staging / CERT_NAME, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(staging / CA_NAME, ca_pem, 0o644)
    try:
        check_material(
            staging / CA_NAME, staging / CERT_NAME, staging / KEY_NAME, device_id=device_id
        )
    except TLSMaterialError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise _step("install", exc) from exc
    folder = root / name
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(staging, folder)
    link = root / f".{CURRENT}.new"
    link.unlink(missing_ok=True)
    os.symlink(name, link)  # relative: the state directory may move
    os.replace(link, root / CURRENT)
    _fsync_dir(root)
    return Installed(
        folder=folder,
        ca_file=root / CURRENT / CA_NAME,
        cert_file=root / CURRENT / CERT_NAME,
        key_file=root / CURRENT / KEY_NAME,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=f"{cert.serial_number:x}",
        not_after=cert.not_valid_after_utc.timestamp(),
    )


def prune(state_dir: Path, keep: Path) -> list[Path]:
    """Remove every certificate folder but ``keep`` (and half-written ones); the removed."""
    root = tls_root(state_dir)
    gone = []
    for p in root.iterdir() if root.is_dir() else ():
        if p.is_dir() and not p.is_symlink() and p.resolve() != keep.resolve():
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def make_key_and_request(device_id: str) -> tuple[Any, bytes, bytes]:
    """A new P-256 key (its PKCS#8 PEM) and a base64 DER request for CN = ``device_id``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    except ValueError as exc:
        raise _step("key", exc) from exc
    try:
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, device_id)]))
            .sign(key, hashes.SHA256())
        )
    except ValueError as exc:
        raise _step("request", exc) from exc
    return key, key_pem, base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))


def enroll(
    cfg: EnrollConfig, device_id: str, state_dir: Path, token: str, *, prune_old: bool = True
) -> Installed:
    """The whole exchange, blocking (run it in a thread); EnrollmentError naming the step."""
    key, key_pem, request = make_key_and_request(device_id)
    ca_pem, pinned = _pinned(cfg.ca_file)
    body = _post(cfg, token, request)
    leaf = _check(body, key, device_id, pinned, dt.datetime.now(dt.UTC))
    try:
        installed = install(state_dir, device_id, key_pem, leaf, ca_pem)
    except OSError as exc:
        raise _step("install", f"{tls_root(state_dir)}: {exc}") from exc
    if prune_old:
        prune(state_dir, installed.folder)
    return installed


class EnrollService:
    """The daemon's side of ``agentctl enroll``: the switch, the exchange, the ledger."""

    def __init__(
        self,
        *,
        device_id: str,
        state_dir: Path,
        config: EnrollConfig | None,
        switch_on: Callable[[], bool],
        ledger: Ledger,
        on_enrolled: Callable[[Installed], None],
    ) -> None:
        self.device_id = device_id
        self.state_dir = state_dir
        self.config = config
        self.switch_on = switch_on
        self.ledger = ledger
        self.on_enrolled = on_enrolled
        self.last_error: str | None = None
        self._busy = asyncio.Lock()

    def register(self, server: control.ControlServer) -> None:
        """Add the ``enroll`` control request (admin only: it installs the box's identity)."""
        server.route("enroll", self._request, admin=True)

    async def _request(self, req: dict[str, Any], peer: control.Peer) -> dict[str, Any]:
        token = req.get("token")
        if not isinstance(token, str) or not TOKEN_PATTERN.fullmatch(token):
            raise RequestRefused("a token is 16 to 128 characters as the vendor gave it")
        url = req.get("url")
        if url is not None and not isinstance(url, str):
            raise RequestRefused('"url" must be a text')
        if self._busy.locked():
            raise RequestRefused("an enrollment is already running", code="busy")
        async with self._busy:
            return await self._enroll(token, url, peer.uid)

    async def _enroll(self, token: str, url: str | None, uid: int) -> dict[str, Any]:
        entry: dict[str, Any] = {"uid": uid}
        try:
            if not self.switch_on():
                raise EnrollmentError(
                    "switch",
                    "the uplink switch is off: enrollment talks to the vendor, and "
                    "disconnecting stops it (agentctl uplink on, then enroll again)",
                )
            cfg = with_url(self.config, url, None)
            entry["url"] = cfg.url
            installed = await asyncio.to_thread(enroll, cfg, self.device_id, self.state_dir, token)
        except EnrollmentError as exc:
            self.last_error = str(exc)
            self.ledger.record(
                "enroll", {**entry, "ok": False, "step": exc.step, "error": str(exc)}
            )
            log.warning("enroll_failed", step=exc.step, error=str(exc))
            raise
        self.last_error = None
        self.ledger.record(
            "enroll",
            {
                **entry,
                "ok": True,
                "subject": installed.subject,
                "serial": installed.serial,
                "not_after": installed.not_after,
            },
        )
        log.info("enrolled", subject=installed.subject, serial=installed.serial)
        self.on_enrolled(installed)
        return installed.to_json()
