"""The device's TLS files, checked before use: what ``config check`` and the uplink both refuse.

A box must not talk to the vendor with material that is unsafe (a private key
others can read) or that cannot work (a file missing or unreadable, an expired
certificate, a key from another certificate, a certificate for another
device), and must say so naming the file. This module needs only
``cryptography``, not the MQTT stack, so that ``agentctl config check`` can run
the same checks as the uplink without loading it (:mod:`agent.uplink.tls`
re-exports :func:`check_material` for the session).
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from agent.errors import TLSMaterialError

PathLike = str | os.PathLike[str]


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


def _common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


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
        ca_certs = x509.load_pem_x509_certificates(ca_pem)
    except ValueError as exc:
        raise TLSMaterialError(
            f"{ca_path}: the CA file holds no PEM certificate (expected the vendor CA "
            f"certificate, '-----BEGIN CERTIFICATE-----')"
        ) from exc
    for ca in ca_certs:
        if ca.not_valid_after_utc < when:
            raise TLSMaterialError(
                f"{ca_path}: the pinned CA certificate {ca.subject.rfc4514_string()} expired on "
                f"{_fmt(ca.not_valid_after_utc)}; ask the vendor for the current CA file"
            )

    cert_pem = _read(cert_path, "cert file")
    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError as exc:
        raise TLSMaterialError(f"{cert_path}: no PEM certificate in the certificate file") from exc
    if when < cert.not_valid_before_utc:
        raise TLSMaterialError(
            f"{cert_path}: the certificate is not valid yet: valid from "
            f"{_fmt(cert.not_valid_before_utc)}, it is now {_fmt(when)} (is the clock right?)"
        )
    if when > cert.not_valid_after_utc:
        raise TLSMaterialError(
            f"{cert_path}: the certificate expired on {_fmt(cert.not_valid_after_utc)} "
            f"(valid from {_fmt(cert.not_valid_before_utc)}); it is now {_fmt(when)}. "
            f"Renew it with the vendor"
        )

    check_key_mode(key_path)
    key_pem = _read(key_path, "key file")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError as exc:
        raise TLSMaterialError(
            f"{key_path}: the private key is encrypted; the agent needs an unencrypted key "
            f"(protected by its file mode 0600)"
        ) from exc
    except ValueError as exc:
        raise TLSMaterialError(f"{key_path}: not a PEM private key") from exc
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise TLSMaterialError(
            f"{key_path}: this private key does not match the certificate {cert_path} "
            f"(the certificate was issued for another key)"
        )

    cn = _common_name(cert)
    if device_id is not None and cn != device_id:
        raise TLSMaterialError(
            f"{cert_path}: the certificate is for {cn!r}, but device_id is {device_id!r}; "
            f"the broker knows a box by its certificate's common name"
        )
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    return MaterialInfo(
        cn=cn,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint=":".join(digest[i : i + 2] for i in range(0, len(digest), 2)),
        ca_count=len(ca_certs),
    )
