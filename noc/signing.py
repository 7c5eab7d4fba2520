"""The vendor's command-signing keys: an offline root, and short-lived command keys it certifies.

    noc keys init-root --out DIR [--passphrase-env VAR]
        DIR/vendor-root.key (Ed25519, PKCS#8, mode 0600; encrypted when the
        environment variable names a passphrase) and DIR/vendor-root.pub (the
        public key every box pins as /etc/pbx-agent/vendor-root.pub).
    noc keys issue-command-key --root DIR/vendor-root.key --out FILE [--days 30] [--kid ID]
        a new command key and its certificate signed by the root, in one JSON
        file (mode 0600) that the NOC's ``signing.key_file`` names. Writing it
        again over the same path is the rotation: nothing changes on the boxes.
    noc keys show FILE
        what a command key file holds (its id, fingerprint, validity).

The wire format and the canonical form are the agent's
(:mod:`agent.uplink.signing`): the root signs the canonical JSON of the key's
certificate without ``sig``; the command key signs the canonical JSON of the
command without ``sig`` and ``key``. The root never has to be online: keep it
on removable media and bring it out only to issue the next command key.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from noc.ca import write_private, write_public
from noc.errors import CommandError, NocError, UsageError

KEY_USE = "pbx-command"
ROOT_KEY_NAME = "vendor-root.key"
ROOT_PUB_NAME = "vendor-root.pub"
DEFAULT_DAYS = 30.0


def canonical(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the agent's canonical form, byte for byte."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(raw_public: bytes) -> str:
    """``SHA256:`` and 16 hex digits, as the agent's status shows the root it pins."""
    return "SHA256:" + hashlib.sha256(raw_public).hexdigest()[:16]


def init_root(out: Path, passphrase: bytes | None = None) -> tuple[Path, Path, str]:
    """Make the root key pair in ``out``; refuses to replace an existing root."""
    key_path, pub_path = out / ROOT_KEY_NAME, out / ROOT_PUB_NAME
    for p in (key_path, pub_path):
        if p.exists():
            raise UsageError(f"{p}: already exists; a new root means re-pinning every box")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        ),
    )
    public = key.public_key()
    write_public(
        pub_path,
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    return key_path, pub_path, fingerprint(_raw_public(public))


def load_root(path: Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """The root's private key; UsageError naming the file when it cannot be used."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the root key: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=passphrase or None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{path}: not a usable root key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path}: the root key must be Ed25519")
    return key


def certify(
    root: Ed25519PrivateKey,
    public: Ed25519PublicKey,
    *,
    kid: str,
    not_before: float,
    expires: float,
) -> dict[str, Any]:
    """A command key's certificate: its public key and validity, signed by the root."""
    cert: dict[str, Any] = {
        "v": 1,
        "use": KEY_USE,
        "kid": kid,
        "pub": base64.b64encode(_raw_public(public)).decode(),
        "nbf": int(not_before),
        "exp": int(expires),
    }
    cert["sig"] = base64.b64encode(root.sign(canonical(cert))).decode()
    return cert


def issue_command_key(
    root: Ed25519PrivateKey,
    out: Path,
    *,
    days: float = DEFAULT_DAYS,
    kid: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """A new command key certified for ``days``, written to ``out`` (0600, atomically)."""
    if not 0 < days <= 366:
        raise UsageError("--days must be more than 0 and at most 366")
    start = time.time() if now is None else now
    key = Ed25519PrivateKey.generate()
    kid = kid or dt.datetime.fromtimestamp(start, dt.UTC).strftime("ck-%Y%m%dT%H%M%SZ")
    if not 0 < len(kid) <= 64 or not kid.isprintable():
        raise UsageError("--kid must be 1 to 64 printable characters")
    # A minute of slack before: a box whose clock is a little behind still accepts it.
    cert = certify(
        root, key.public_key(), kid=kid, not_before=start - 60, expires=start + days * 86400
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(out, json.dumps({"cert": cert, "key": pem.decode()}, indent=2).encode())
    return cert


@dataclass(frozen=True)
class CommandSigner:
    """A command key and its certificate, as loaded from ``signing.key_file``."""

    key: Ed25519PrivateKey
    cert: dict[str, Any]
    path: Path

    @classmethod
    def load(cls, path: Path) -> CommandSigner:
        """Read a command key file; CommandError naming the file when it cannot be used."""
        try:
            doc = json.loads(path.read_text())
            key = serialization.load_pem_private_key(doc["key"].encode(), password=None)
            cert = doc["cert"]
        except OSError as exc:
            raise CommandError(
                f"cannot sign commands: {path}: {exc.strerror} "
                "(issue one with `noc keys issue-command-key`)"
            ) from exc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CommandError(f"cannot sign commands: {path}: not a command key file") from exc
        if not isinstance(key, Ed25519PrivateKey) or not isinstance(cert, dict):
            raise CommandError(f"cannot sign commands: {path}: not an Ed25519 command key")
        return cls(key=key, cert=cert, path=path)

    @property
    def expires(self) -> float:
        """When the boxes stop accepting this key."""
        return float(self.cert.get("exp", 0))

    def sign(
        self, command: dict[str, Any], device: str, *, lifetime: float, now: float | None = None
    ) -> dict[str, Any]:
        """``command`` bound to ``device``, valid ``lifetime`` seconds, with its proof."""
        at = time.time() if now is None else now
        if at > self.expires:
            raise CommandError(
                f"cannot sign commands: the command key in {self.path} expired at "
                f"{dt.datetime.fromtimestamp(self.expires, dt.UTC):%Y-%m-%d %H:%M}Z; issue a "
                "new one with `noc keys issue-command-key`"
            )
        body = {k: v for k, v in command.items() if k not in ("sig", "key")}
        body["device"] = device
        body["exp"] = int(at + lifetime)
        signature = self.key.sign(canonical(body))
        return {**body, "key": self.cert, "sig": base64.b64encode(signature).decode()}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="noc keys", description="The command-signing keys.")
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("init-root", help="make the offline root key pair")
    s.add_argument("--out", type=Path, required=True, help="folder (removable media)")
    s.add_argument(
        "--passphrase-env", metavar="VAR", help="encrypt the root with the passphrase in $VAR"
    )
    s = sub.add_parser("issue-command-key", help="a command key certified by the root")
    s.add_argument("--root", type=Path, required=True, help="the root's private key")
    s.add_argument("--out", type=Path, required=True, help="the command key file to write")
    s.add_argument("--days", type=float, default=DEFAULT_DAYS, help="validity (default 30)")
    s.add_argument("--kid", help="the key's id (default: ck- and the time)")
    s.add_argument("--passphrase-env", metavar="VAR", help="the root's passphrase is in $VAR")
    s = sub.add_parser("show", help="what a command key file holds")
    s.add_argument("file", type=Path)
    return p


def _passphrase(var: str | None) -> bytes | None:
    if var is None:
        return None
    value = os.environ.get(var)
    if not value:
        raise UsageError(f"--passphrase-env {var}: the variable is not set")
    return value.encode()


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def main(argv: Sequence[str] | None = None) -> int:
    """``noc keys ...``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.action == "init-root":
            key, pub, fp = init_root(args.out, _passphrase(args.passphrase_env))
            print(f"root key {key} (keep it offline)\npublic key {pub} ({fp})")
            print("install the public key on every box as /etc/pbx-agent/vendor-root.pub")
            return 0
        if args.action == "issue-command-key":
            root = load_root(args.root, _passphrase(args.passphrase_env))
            cert = issue_command_key(root, args.out, days=args.days, kid=args.kid)
            print(f"command key {cert['kid']} in {args.out}, valid until {_when(cert['exp'])}")
            return 0
        signer = CommandSigner.load(args.file)
        raw = base64.b64decode(signer.cert.get("pub", ""))
        print(
            f"command key {signer.cert.get('kid')} {fingerprint(raw)} "
            f"valid {_when(signer.cert.get('nbf', 0))} to {_when(signer.expires)}"
        )
        return 0
    except NocError as exc:
        print(f"noc keys: {exc}", file=sys.stderr)
        return exc.exit_code
