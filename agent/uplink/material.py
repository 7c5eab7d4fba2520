"""The device's TLS files, checked before use: what ``config check`` and the uplink both refuse.

A box must not talk to the vendor with material that is unsafe (a private key
others can read) or that cannot work (a file missing or unreadable, an expired
certificate, a key from another certificate, a certificate for another
device), and must say so naming the file.

This module needs only the standard library: ``ssl`` (OpenSSL itself matches
the key to the certificate, :meth:`ssl.SSLContext.load_cert_chain`),
``hashlib`` for the fingerprint, and :mod:`agent.uplink.x509`, a reader of the
few certificate fields looked at here. So neither the daemon nor ``agentctl
config check`` loads ``cryptography`` for checks that run once (issue 17: it
kept about 6 MiB resident in the idle daemon). :mod:`agent.uplink.tls`
re-exports :func:`check_material` for the session.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.errors import TLSMaterialError
from agent.uplink import x509

PathLike = str | os.PathLike[str]

_PRIVATE_KEY = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )?PRIVATE KEY-----")
# PKCS#8 "ENCRYPTED PRIVATE KEY", or the traditional PEM header of an encrypted key.
_ENCRYPTED = re.compile(rb"-----BEGIN ENCRYPTED PRIVATE KEY-----|Proc-Type:\s*4,\s*ENCRYPTED")


@dataclass(frozen=True, kw_only=True)
class MaterialInfo:
    """What the checks learnt about the device certificate (for status and logs)."""

    cn: str
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint: str  # SHA-256 of the DER certificate, hex with colons, as openssl prints it
    ca_count: int  # certificates in the pinned CA file


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise TLSMaterialError(f"{path}: {what} not found (uplink.{what.split()[0]}_file)") from exc
    except PermissionError as exc:
        raise TLSMaterialError(
            f"{path}: {what} is not readable by this user (uid {os.geteuid()}): permission denied"
        ) from exc
    except IsADirectoryError as exc:
        raise TLSMaterialError(f"{path}: {what} is a directory, expected a PEM file") from exc
    except OSError as exc:
        raise TLSMaterialError(f"{path}: cannot read the {what}: {exc.strerror}") from exc


def check_key_mode(path: Path) -> None:
    """Refuse a key file that group or others may read or write, as ssh does."""
    try:
        st = path.stat()
    except OSError as exc:
        raise TLSMaterialError(f"{path}: cannot stat the key file: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise TLSMaterialError(f"{path}: the key file is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise TLSMaterialError(
            f"{path}: permissions {mode:04o} are too open: the private key must not be "
            f"accessible by group or others. Fix: chmod 600 {path}"
        )


def _fmt(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise TLSMaterialError("encrypted")


def _check_key_matches(cert_path: Path, key_path: Path) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_cert_chain(os.fspath(cert_path), os.fspath(key_path), password=_no_password)
    except TLSMaterialError as exc:
        raise TLSMaterialError(
            f"{key_path}: the private key is encrypted; the agent needs an unencrypted key "
            f"(protected by its file mode 0600)"
        ) from exc
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise TLSMaterialError(
                f"{key_path}: this private key does not match the certificate {cert_path} "
                f"(the certificate was issued for another key)"
            ) from exc
        raise TLSMaterialError(f"{key_path}: not a PEM private key ({exc.reason})") from exc
    except OSError as exc:
        raise TLSMaterialError(f"{key_path}: cannot read the key file: {exc.strerror}") from exc


def check_material(
    ca_file: PathLike,
    cert_file: PathLike,
    key_file: PathLike,
    *,
    device_id: str | None = None,
    now: dt.datetime | None = None,
) -> MaterialInfo:
    """Check the CA, certificate and key files; raise TLSMaterialError naming the file.

    Refused: a file missing or unreadable; a key file readable or writable by
    group or others; a CA file without a certificate; a certificate expired or
    not yet valid (at ``now``, default the current time); a key that does not
    belong to the certificate; a certificate whose common name is not
    ``device_id`` (when given). Returns what was learnt about the certificate.
    """
    ca_path, cert_path, key_path = Path(ca_file), Path(cert_file), Path(key_file)
    when = now if now is not None else dt.datetime.now(dt.UTC)

    ca_pem = _read(ca_path, "ca file")
    try:
        ca_certs = x509.load_pem_certificates(ca_pem)
    except ValueError as exc:
        raise TLSMaterialError(
            f"{ca_path}: the CA file holds no PEM certificate (expected the vendor CA "
            f"certificate, '-----BEGIN CERTIFICATE-----'): {exc}"
        ) from exc
    for ca in ca_certs:
        if ca.not_after < when:
            raise TLSMaterialError(
                f"{ca_path}: the pinned CA certificate {ca.subject} expired on "
                f"{_fmt(ca.not_after)}; ask the vendor for the current CA file"
            )

    cert_pem = _read(cert_path, "cert file")
    try:
        cert = x509.load_pem_certificates(cert_pem)[0]
    except ValueError as exc:
        raise TLSMaterialError(
            f"{cert_path}: no PEM certificate in the certificate file: {exc}"
        ) from exc
    if when < cert.not_before:
        raise TLSMaterialError(
            f"{cert_path}: the certificate is not valid yet: valid from "
            f"{_fmt(cert.not_before)}, it is now {_fmt(when)} (is the clock right?)"
        )
    if when > cert.not_after:
        raise TLSMaterialError(
            f"{cert_path}: the certificate expired on {_fmt(cert.not_after)} "
            f"(valid from {_fmt(cert.not_before)}); it is now {_fmt(when)}. "
            f"Renew it with the vendor"
        )

    check_key_mode(key_path)
    key_pem = _read(key_path, "key file")
    if _ENCRYPTED.search(key_pem):
        raise TLSMaterialError(
            f"{key_path}: the private key is encrypted; the agent needs an unencrypted key "
            f"(protected by its file mode 0600)"
        )
    if not _PRIVATE_KEY.search(key_pem):
        raise TLSMaterialError(f"{key_path}: not a PEM private key")
    _check_key_matches(cert_path, key_path)

    if device_id is not None and cert.cn != device_id:
        raise TLSMaterialError(
            f"{cert_path}: the certificate is for {cert.cn!r}, but device_id is {device_id!r}; "
            f"the broker knows a box by its certificate's common name"
        )
    digest = hashlib.sha256(cert.der).hexdigest().upper()
    return MaterialInfo(
        cn=cert.cn,
        not_before=cert.not_before,
        not_after=cert.not_after,
        fingerprint=":".join(digest[i : i + 2] for i in range(0, len(digest), 2)),
        ca_count=len(ca_certs),
    )
