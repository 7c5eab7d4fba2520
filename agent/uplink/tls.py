"""The device's TLS material: checked before use, and the one SSL context built from it.

Why it exists: a box must refuse to talk to the vendor with material that is
unsafe (a private key others can read) or that cannot work (expired
certificate, key from another certificate, a certificate for another device),
and say so naming the file, before any byte leaves (:func:`check_material`,
kept in :mod:`agent.uplink.material` so that ``config check`` can run it
without loading the MQTT stack). And the context it talks with must trust the
pinned vendor CA only, never the system store, and check the broker's host name.

TLS failures reach us as :class:`ssl.SSLError`, or only as the text paho
logged; :func:`classify_tls_error` turns either into a message a person can
act on (wrong CA, wrong host name, client certificate refused ...).
"""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass
from typing import Literal

from agent.errors import BrokerRefused, TLSMaterialError, UplinkError
from agent.uplink.material import MaterialInfo as MaterialInfo
from agent.uplink.material import check_material as check_material

MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2

PathLike = str | os.PathLike[str]


def client_context(
    ca_file: PathLike,
    cert_file: PathLike,
    key_file: PathLike,
    *,
    max_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """The SSL context of the device: TLS 1.2 or later, the pinned CA only, host name checked.

    No system trust store is loaded, so only a broker certificate issued under
    ``ca_file`` is accepted. ``max_version`` exists for tests and diagnostics
    (under TLS 1.2 a refused client certificate fails inside the handshake).
    Call :func:`check_material` first: this only translates load errors.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname on
    ctx.minimum_version = MIN_TLS_VERSION
    if max_version is not None:
        ctx.maximum_version = max_version
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=os.fspath(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise TLSMaterialError(f"{ca_file}: cannot load the pinned CA file: {exc}") from exc
    try:
        ctx.load_cert_chain(certfile=os.fspath(cert_file), keyfile=os.fspath(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise TLSMaterialError(
            f"{cert_file} / {key_file}: cannot load the client certificate and key: {exc}"
        ) from exc
    return ctx


TLSFailureKind = Literal[
    "wrong_ca",
    "wrong_host",
    "server_cert_expired",
    "client_refused",
    "not_tls",
    "protocol_version",
    "unreachable",
    "other",
]

# OpenSSL alerts a server sends when it rejects the client's certificate. Under
# TLS 1.3 they arrive after the client considers the handshake done, on the
# first read; under TLS 1.2 they end the handshake itself.
_CLIENT_REFUSED = re.compile(
    r"TLSV13_ALERT_CERTIFICATE_REQUIRED|SSLV3_ALERT_BAD_CERTIFICATE|TLSV1_ALERT_UNKNOWN_CA"
    r"|SSLV3_ALERT_CERTIFICATE_UNKNOWN|SSLV3_ALERT_CERTIFICATE_EXPIRED"
    r"|SSLV3_ALERT_CERTIFICATE_REVOKED|SSLV3_ALERT_UNSUPPORTED_CERTIFICATE"
    r"|TLSV1_ALERT_ACCESS_DENIED|TLSV1_ALERT_DECRYPT_ERROR"
    # TLS 1.2: mosquitto ends the handshake this way when no certificate is presented
    # (the same alert could mean no common cipher; the OpenSSL text is kept in the message).
    r"|SSLV3_ALERT_HANDSHAKE_FAILURE"
)


@dataclass(frozen=True)
class TLSFailure:
    """A TLS failure, classified: ``kind`` for code and counters, ``message`` for people."""

    kind: TLSFailureKind
    message: str

    def error(self) -> UplinkError:
        """The agent error to raise: BrokerRefused when the broker refused us, else UplinkError."""
        return (
            BrokerRefused(self.message)
            if self.kind == "client_refused"
            else UplinkError(self.message)
        )


def classify_tls_error(
    exc: BaseException | str,
    *,
    host: str = "the broker",
    ca_file: PathLike | None = None,
    cert_file: PathLike | None = None,
) -> TLSFailure:
    """Turn an ssl error (or its text, as paho logged it) into an actionable message.

    An alert that ends the connection after the handshake (a refused client
    certificate under TLS 1.3) reaches us only as the line paho logged, so the
    classification works on the text as well.
    """
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    ca = os.fspath(ca_file) if ca_file is not None else "the pinned CA file"
    cert = os.fspath(cert_file) if cert_file is not None else "this box's client certificate"
    verify_code = getattr(exc, "verify_code", None)
    if verify_code == 62 or "Hostname mismatch" in text or "IP address mismatch" in text:
        return TLSFailure(
            "wrong_host",
            f"the broker's certificate does not name {host!r}: wrong broker address in "
            f"uplink.broker, or a broker that is not the vendor's ({text})",
        )
    if verify_code == 10 or "certificate has expired" in text:
        return TLSFailure("server_cert_expired", f"the broker's certificate has expired ({text})")
    if verify_code in (2, 18, 19, 20, 21) or "CERTIFICATE_VERIFY_FAILED" in text:
        return TLSFailure(
            "wrong_ca",
            f"the broker {host!r} presented a certificate not issued by the pinned CA in {ca}: "
            f"not the vendor's broker, or the CA file is not the vendor's current one ({text})",
        )
    if _CLIENT_REFUSED.search(text):
        return TLSFailure(
            "client_refused",
            f"the broker {host!r} refused {cert}: not issued by the CA the broker trusts, "
            f"expired, or revoked; check the device certificate with the vendor ({text})",
        )
    if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
        return TLSFailure(
            "not_tls",
            f"{host!r} does not speak TLS on that port (a plain MQTT port such as 1883?) ({text})",
        )
    if "PROTOCOL_VERSION" in text or "UNSUPPORTED_PROTOCOL" in text:
        return TLSFailure(
            "protocol_version",
            f"the broker {host!r} does not offer TLS 1.2 or later, which the agent requires "
            f"({text})",
        )
    if isinstance(exc, ConnectionRefusedError) or "Connection refused" in text:
        return TLSFailure("unreachable", f"nothing accepts connections at {host!r} ({text})")
    return TLSFailure("other", f"TLS connection to {host!r} failed: {text}")
