"""The vendor's reference certificate authority for the MQTT uplink.

Why it exists: the broker authenticates every box by its client certificate
and every box pins the vendor CA, so the vendor needs a small, auditable way to
make that CA, the broker's certificate and one certificate per device. The same
functions build throwaway PKIs for the tests and for ``make demo``.

A box makes its own key and a certificate signing request
(:func:`make_key_and_csr`); only the CSR travels to the vendor, who signs it
(:meth:`CA.sign_csr`). :meth:`CA.issue_device` makes key and certificate
together, for tests and demos only.

Command line::

    python -m noc.ca init DIR
    python -m noc.ca broker DIR --name noc.vendor.example [--name ...] [--out OUT]
    python -m noc.ca device DIR --id pbx-0001 [--csr FILE] [--out OUT]
    python -m noc.ca request OUT --id pbx-0001          # on the box: key + CSR
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
DEFAULT_CA_DAYS = 3650
DEFAULT_LEAF_DAYS = 825  # the longest validity browsers accept; plenty for a box
# Tolerate clocks a little behind: a certificate made a second ago is valid now.
BACKDATE = dt.timedelta(minutes=5)

PrivateKey = ec.EllipticCurvePrivateKey


class CAError(Exception):
    """The CA directory or a request cannot be used; the message names the file."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_key() -> PrivateKey:
    """Make an EC P-256 private key: small, fast, and accepted by every TLS stack we meet."""
    return ec.generate_private_key(ec.SECP256R1())


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by the owner only, replacing any file atomically.

    The file is created with mode 0600 from the start (never chmod-ed after the
    fact), so there is no moment when another user could open it.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_public(path: Path, data: bytes) -> None:
    """Write a certificate or CSR (public material) with mode 0644, atomically."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


@dataclass(frozen=True)
class CA:
    """A certificate authority held in a directory as ``ca.crt`` and ``ca.key``."""

    dir: Path
    cert: x509.Certificate
    key: PrivateKey

    @property
    def cert_path(self) -> Path:
        """The CA certificate: what the broker and every box pin."""
        return self.dir / CA_CERT

    @property
    def key_path(self) -> Path:
        """The CA private key (mode 0600)."""
        return self.dir / CA_KEY

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> CA:
        """Load the CA kept in ``directory`` by :func:`make_ca`."""
        d = Path(directory)
        try:
            cert = x509.load_pem_x509_certificate((d / CA_CERT).read_bytes())
        except (OSError, ValueError) as exc:
            raise CAError(f"{d / CA_CERT}: cannot read the CA certificate: {exc}") from exc
        try:
            key = serialization.load_pem_private_key((d / CA_KEY).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise CAError(f"{d / CA_KEY}: cannot read the CA key: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{d / CA_KEY}: expected an EC key, found {type(key).__name__}")
        return cls(dir=d, cert=cert, key=key)

    def _sign(
        self,
        *,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        eku: x509.ObjectIdentifier,
        san: Sequence[str],
        not_before: dt.datetime | None,
        not_after: dt.datetime | None,
    ) -> x509.Certificate:
        start = not_before if not_before is not None else _now() - BACKDATE
        end = not_after if not_after is not None else _now() + dt.timedelta(DEFAULT_LEAF_DAYS)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if san:
            builder = builder.add_extension(_san(san), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue_server(
        self,
        names: Sequence[str],
        out_dir: str | os.PathLike[str],
        *,
        stem: str = "broker",
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        loopback: bool = True,
    ) -> tuple[Path, Path]:
        """Issue a broker certificate for ``localhost``, ``127.0.0.1`` and ``names``.

        ``loopback=False`` leaves out localhost and 127.0.0.1 (tests of a broker
        that names another host). Returns ``(cert_path, key_path)``:
        ``<stem>.crt`` and ``<stem>.key`` in ``out_dir``.
        """
        local = ["localhost", "127.0.0.1"] if loopback else []
        all_names = list(dict.fromkeys([*local, *names]))
        cn = names[0] if names else "localhost"
        key = new_key()
        cert = self._sign(
            subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]),
            public_key=key.public_key(),
            eku=ExtendedKeyUsageOID.SERVER_AUTH,
            san=all_names,
            not_before=not_before,
            not_after=not_after,
        )
        return self._store(cert, key, Path(out_dir), stem)

    def issue_device(
        self,
        device_id: str,
        out_dir: str | os.PathLike[str],
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        key: PrivateKey | None = None,
    ) -> tuple[Path, Path]:
        """Issue key and client certificate whose common name is ``device_id``.

        For tests, demos and the NOC's own client (CN ``noc``): a real box makes
        its key itself (:func:`make_key_and_csr`). ``not_before``/``not_after``
        may lie in the past or future so that tests can make unusable certificates.
        ``key`` reuses an existing key (e.g. to make a second certificate for it).
        Returns ``(cert_path, key_path)``: ``<device_id>.crt`` and ``<device_id>.key``.
        """
        key = key if key is not None else new_key()
        cert = self._sign(
            subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]),
            public_key=key.public_key(),
            eku=ExtendedKeyUsageOID.CLIENT_AUTH,
            san=[],
            not_before=not_before,
            not_after=not_after,
        )
        return self._store(cert, key, Path(out_dir), device_id)

    def sign_csr(
        self,
        csr_pem: bytes,
        out_path: str | os.PathLike[str],
        *,
        device_id: str | None = None,
        days: int = DEFAULT_LEAF_DAYS,
    ) -> Path:
        """Sign a device's CSR; the certificate's CN is the CSR's (or ``device_id``).

        Only the subject's CN and the public key are taken from the request; every
        extension is the CA's choice, so a request cannot ask for more than a
        client certificate. The CSR's signature is checked (proof the box holds
        the key). Returns the path of the written certificate.
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CAError(f"not a PEM certificate signing request: {exc}") from exc
        cert = self.certify_request(csr, device_id=device_id, not_after=_now() + dt.timedelta(days))
        out = Path(out_path)
        write_public(out, _cert_pem(cert))
        return out

    def certify_request(
        self,
        csr: x509.CertificateSigningRequest,
        *,
        device_id: str | None,
        not_after: dt.datetime,
        not_before: dt.datetime | None = None,
    ) -> x509.Certificate:
        """A client certificate for a checked request (see :meth:`sign_csr`), not written."""
        if not csr.is_signature_valid:
            raise CAError("the request's signature does not verify: not made with its key")
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(cns[0].value) if cns else None
        if device_id is not None and cn not in (None, device_id):
            raise CAError(f"the request is for CN {cn!r}, not for device {device_id!r}")
        cn = device_id or cn
        if not cn:
            raise CAError("the request has no common name and no --id was given")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise CAError(f"expected an EC public key, found {type(public_key).__name__}")
        return self._sign(
            subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]),
            public_key=public_key,
            eku=ExtendedKeyUsageOID.CLIENT_AUTH,
            san=[],
            not_before=not_before,
            not_after=not_after,
        )

    def _store(
        self, cert: x509.Certificate, key: PrivateKey, out_dir: Path, stem: str
    ) -> tuple[Path, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = out_dir / f"{stem}.crt", out_dir / f"{stem}.key"
        write_private(key_path, _key_pem(key))
        write_public(cert_path, _cert_pem(cert))
        return cert_path, key_path


def make_ca(
    directory: str | os.PathLike[str],
    *,
    name: str = "pbx-agent vendor CA",
    days: int = DEFAULT_CA_DAYS,
) -> CA:
    """Create a new CA in ``directory`` (``ca.crt`` 0644, ``ca.key`` 0600) and return it.

    Refuses to overwrite an existing CA: losing it would orphan every device.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if (d / CA_KEY).exists():
        raise CAError(f"{d / CA_KEY}: a CA already exists here; refusing to replace it")
    key = new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(d / CA_KEY, _key_pem(key))
    write_public(d / CA_CERT, _cert_pem(cert))
    return CA(dir=d, cert=cert, key=key)


def make_key_and_csr(device_id: str, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """On the box: make ``<device_id>.key`` (0600) and ``<device_id>.csr`` in ``out_dir``.

    The key never leaves the box; the CSR is what goes to the vendor to be signed.
    An existing key is kept and a CSR made for it, so re-enrolling does not
    silently replace the box's identity.
    """
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    key_path, csr_path = d / f"{device_id}.key", d / f"{device_id}.csr"
    if key_path.exists():
        loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise CAError(f"{key_path}: expected an EC key, found {type(loaded).__name__}")
        key = loaded
    else:
        key = new_key()
        write_private(key_path, _key_pem(key))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    write_public(csr_path, csr.public_bytes(serialization.Encoding.PEM))
    return key_path, csr_path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m noc.ca", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("init", help="create a CA in DIR")
    s.add_argument("dir", type=Path)
    s.add_argument("--cn", default="pbx-agent vendor CA", help="the CA's common name")
    s = sub.add_parser("broker", help="issue the broker's certificate")
    s.add_argument("dir", type=Path, help="the CA directory")
    s.add_argument("--name", action="append", default=[], help="DNS name or IP (repeatable)")
    s.add_argument("--out", type=Path, help="where to write broker.crt/key (default: DIR)")
    s = sub.add_parser("device", help="issue a device certificate (or sign its CSR)")
    s.add_argument("dir", type=Path, help="the CA directory")
    s.add_argument("--id", required=True, dest="device_id", help="device id: the CN")
    s.add_argument("--csr", type=Path, help="sign this CSR made on the box instead of making a key")
    s.add_argument("--out", type=Path, help="output directory (default: DIR)")
    s = sub.add_parser("request", help="on the box: make a private key and a CSR")
    s.add_argument("out", type=Path, help="directory for <id>.key and <id>.csr")
    s.add_argument("--id", required=True, dest="device_id")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "init":
            ca = make_ca(args.dir, name=args.cn)
            print(f"CA created: {ca.cert_path} (key {ca.key_path}, mode 0600)")
        elif args.cmd == "broker":
            ca = CA.load(args.dir)
            cert, key = ca.issue_server(args.name, args.out or args.dir)
            print(f"broker certificate: {cert}\nbroker key: {key}")
        elif args.cmd == "device":
            ca = CA.load(args.dir)
            out = args.out or args.dir
            if args.csr is not None:
                try:
                    csr_pem = args.csr.read_bytes()
                except OSError as exc:
                    raise CAError(f"{args.csr}: cannot read: {exc.strerror}") from exc
                Path(out).mkdir(parents=True, exist_ok=True)
                cert = ca.sign_csr(
                    csr_pem, Path(out) / f"{args.device_id}.crt", device_id=args.device_id
                )
                print(f"device certificate: {cert}")
            else:
                cert, key = ca.issue_device(args.device_id, out)
                print(f"device certificate: {cert}\ndevice key: {key} (mode 0600)")
        else:
            key, csr = make_key_and_csr(args.device_id, args.out)
            print(f"private key (stays here): {key}\nrequest to send to the vendor: {csr}")
    except CAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
