"""The few fields of an X.509 certificate the material checks need, read from its DER.

Why it exists: ``cryptography`` reads certificates fully, and importing it
costs the idle daemon about 6 MiB for checks that run once per connection
(issue 17); the standard ``ssl`` module decodes certificates only through a
private function or for CA certificates. The checks need the validity dates,
the subject (its common name) and the DER bytes for the fingerprint; status
and renewal (``agent/uplink/renew.py``) also show the issuer and serial number.
A certificate is a DER ``SEQUENCE``; its first element, ``tbsCertificate``,
holds ``[0] version`` (optional), ``serialNumber``,
``signature``, ``issuer``, ``validity`` and ``subject`` in that order (RFC
5280, 4.1). Nothing here verifies a signature: OpenSSL does that in the
handshake, and matches the key to the certificate
(:func:`agent.uplink.material.check_material`).
"""

from __future__ import annotations

import datetime as dt
import re
import ssl
from dataclasses import dataclass

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s+(.+?)\s+-----END CERTIFICATE-----", re.DOTALL)

_SEQUENCE, _SET, _OID, _UTC_TIME, _GENERALIZED_TIME, _CONTEXT_0 = 0x30, 0x31, 0x06, 0x17, 0x18, 0xA0
_INTEGER = 0x02
#: Attribute types shown in a subject (RFC 4514 short names).
_NAMES = {
    b"\x55\x04\x03": "CN",
    b"\x55\x04\x06": "C",
    b"\x55\x04\x07": "L",
    b"\x55\x04\x08": "ST",
    b"\x55\x04\x0a": "O",
    b"\x55\x04\x0b": "OU",
}
_STRINGS = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x14: "latin-1", 0x1E: "utf-16-be"}


@dataclass(frozen=True, slots=True)
class Certificate:
    """What the checks read of one certificate."""

    der: bytes
    not_before: dt.datetime
    not_after: dt.datetime
    cn: str  # the subject's common name ("" if it has none)
    subject: str  # RFC 4514-like, most significant last, e.g. "CN=pbx-0001,O=Vendor"
    issuer: str  # the same for the issuer
    serial: int


def load_pem_certificates(pem: bytes) -> list[Certificate]:
    """Every certificate in a PEM file, in order; ValueError when there is none or one is bad."""
    blocks = _PEM.findall(pem)
    if not blocks:
        raise ValueError("no '-----BEGIN CERTIFICATE-----' block")
    out = []
    for n, block in enumerate(blocks, 1):
        try:
            text = b"-----BEGIN CERTIFICATE-----\n" + block + b"\n-----END CERTIFICATE-----\n"
            out.append(parse_der(ssl.PEM_cert_to_DER_cert(text.decode("ascii"))))
        except (ValueError, UnicodeDecodeError, IndexError) as exc:
            raise ValueError(
                f"certificate {n} is not a readable X.509 certificate ({exc})"
            ) from exc
    return out


def _tlv(buf: bytes, i: int) -> tuple[int, int, int]:
    """The tag at ``i``, where its content starts and where it ends."""
    tag, first = buf[i], buf[i + 1]
    i += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if not 1 <= n <= 4:
            raise ValueError("unsupported DER length")
        length = int.from_bytes(buf[i : i + n], "big")
        i += n
    end = i + length
    if end > len(buf):
        raise ValueError("truncated DER")
    return tag, i, end


def _children(buf: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        tag, s, e = _tlv(buf, start)
        out.append((tag, s, e))
        start = e
    return out


def _time(tag: int, raw: bytes) -> dt.datetime:
    text = raw.decode("ascii")
    if tag == _UTC_TIME:  # YYMMDDHHMMSSZ; years 50-99 are 19xx (RFC 5280, 4.1.2.5.1)
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != _GENERALIZED_TIME:
        raise ValueError("validity is not a time")
    if not text.endswith("Z") or len(text) != 15:
        raise ValueError(f"unsupported time {raw!r}")
    return dt.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=dt.UTC)


def parse_der(der: bytes) -> Certificate:
    """Read a DER certificate's validity and subject."""
    tag, s, e = _tlv(der, 0)
    if tag != _SEQUENCE:
        raise ValueError("not a DER sequence")
    tag, s, e = _tlv(der, s)
    if tag != _SEQUENCE:
        raise ValueError("no tbsCertificate")
    fields = _children(der, s, e)
    if fields and fields[0][0] == _CONTEXT_0:
        fields = fields[1:]  # the explicit version
    if len(fields) < 5:
        raise ValueError("tbsCertificate too short")
    serial, _signature, issuer, validity, subject = fields[:5]
    times = _children(der, validity[1], validity[2])
    if validity[0] != _SEQUENCE or len(times) != 2:
        raise ValueError("no validity")
    not_before, not_after = (_time(t, der[a:b]) for t, a, b in times)
    subject_name, cn = _name(der, subject)
    issuer_name, _ = _name(der, issuer)
    if serial[0] != _INTEGER:
        raise ValueError("no serial number")
    return Certificate(
        der=der,
        not_before=not_before,
        not_after=not_after,
        cn=cn,
        subject=subject_name,
        issuer=issuer_name,
        serial=int.from_bytes(der[serial[1] : serial[2]], "big", signed=True),
    )


def _name(der: bytes, where: tuple[int, int, int]) -> tuple[str, str]:
    """A Name as RFC 4514-like text (most significant last) and its first common name."""
    parts: list[str] = []
    cn = ""
    for rdn_tag, rs, re_ in _children(der, where[1], where[2]):
        if rdn_tag != _SET:
            raise ValueError("malformed name")
        for _, as_, ae in _children(der, rs, re_):
            (oid_tag, os_, oe), (vtag, vs, ve) = _children(der, as_, ae)[:2]
            if oid_tag != _OID:
                raise ValueError("malformed name attribute")
            name = _NAMES.get(der[os_:oe])
            encoding = _STRINGS.get(vtag)
            if name is None or encoding is None:
                continue
            value = der[vs:ve].decode(encoding)
            parts.append(f"{name}={value}")
            if name == "CN" and not cn:
                cn = value
    return ",".join(reversed(parts)), cn
