"""A throwaway PKI for tests: the vendor CA, an unrelated rogue CA, broker and device certificates.

Why it exists: the uplink's promises (mutual TLS, pinned CA, host name check,
per-device ACL) can only be proven against real certificates. Files are laid
out so that a mosquitto started as root, which drops to the ``mosquitto`` user,
can read its own certificate and key and nothing else needs to be loosened.
"""

from __future__ import annotations

import datetime as dt
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from noc.ca import CA, make_ca

DEVICE_IDS = ("pbx-test-1", "pbx-test-2")
NOC_ID = "noc"
BROKER_USER = "mosquitto"


@dataclass(frozen=True)
class Creds:
    """A client identity: the certificate's CN and where its certificate and key are."""

    cn: str
    cert: Path
    key: Path


@dataclass
class PKI:
    """Everything a test needs to run a broker and clients with mutual TLS."""

    root: Path
    ca: CA
    rogue: CA
    broker_cert: Path
    broker_key: Path
    clients: dict[str, Creds] = field(default_factory=dict)
    rogue_clients: dict[str, Creds] = field(default_factory=dict)

    @property
    def ca_file(self) -> Path:
        """The vendor CA certificate: what boxes pin and the broker trusts."""
        return self.ca.cert_path

    @property
    def rogue_ca_file(self) -> Path:
        """A CA that has nothing to do with the vendor."""
        return self.rogue.cert_path

    def device(self, device_id: str) -> Creds:
        """The vendor-issued credentials of ``device_id`` (or ``noc``)."""
        return self.clients[device_id]

    def issue(
        self,
        cn: str,
        *,
        ca: CA | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        subdir: str = "extra",
    ) -> Creds:
        """Issue one more client certificate (e.g. expired, or from the rogue CA)."""
        out = self.root / subdir
        out.mkdir(exist_ok=True)
        cert, key = (ca or self.ca).issue_device(
            cn, out, not_before=not_before, not_after=not_after
        )
        return Creds(cn, cert, key)

    def issue_broker(
        self, names: list[str], *, stem: str, loopback: bool = True
    ) -> tuple[Path, Path]:
        """Issue another broker certificate (e.g. naming another host), readable by mosquitto."""
        cert, key = self.ca.issue_server(names, self.root / "broker", stem=stem, loopback=loopback)
        _give_to_broker(cert, key)
        return cert, key


def _give_to_broker(*paths: Path) -> None:
    """Let the mosquitto user read its files; only possible (and needed) as root."""
    if os.geteuid() != 0:
        return
    try:
        pw = pwd.getpwnam(BROKER_USER)
    except KeyError:
        return
    for p in paths:
        os.chown(p, pw.pw_uid, pw.pw_gid)


def make_pki(root: Path, *, broker_names: tuple[str, ...] = ()) -> PKI:
    """Build the PKI under ``root``; every folder is traversable so mosquitto can reach its files.

    Layout: ``ca/`` (vendor CA), ``rogue/`` (unrelated CA), ``broker/`` (owned by
    the mosquitto user when run as root), ``clients/`` (pbx-test-1, pbx-test-2,
    noc), ``rogue-clients/`` (pbx-test-1 again, signed by the rogue CA).
    """
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)  # the broker user must traverse it; keys stay 0600
    ca = make_ca(root / "ca", name="pbx-agent test vendor CA")
    rogue = make_ca(root / "rogue", name="rogue CA")
    broker_dir = root / "broker"
    broker_cert, broker_key = ca.issue_server(list(broker_names), broker_dir)
    _give_to_broker(broker_dir, broker_cert, broker_key)
    for d in (root / "ca", root / "rogue", broker_dir):
        os.chmod(d, 0o755)  # directories only; private keys remain 0600
    pki = PKI(root=root, ca=ca, rogue=rogue, broker_cert=broker_cert, broker_key=broker_key)
    for cn in (*DEVICE_IDS, NOC_ID):
        pki.clients[cn] = pki.issue(cn, subdir="clients")
    pki.rogue_clients[DEVICE_IDS[0]] = pki.issue(DEVICE_IDS[0], ca=rogue, subdir="rogue-clients")
    return pki


@contextmanager
def temporary_pki(*, broker_names: tuple[str, ...] = ()) -> Iterator[PKI]:
    """A PKI in a fresh folder under the system temp dir, removed afterwards.

    Not under pytest's ``tmp_path``: pytest makes its base folder 0700, which
    the mosquitto user could not traverse.
    """
    root = Path(tempfile.mkdtemp(prefix="pbx-pki-"))
    try:
        yield make_pki(root, broker_names=broker_names)
    finally:
        shutil.rmtree(root, ignore_errors=True)
