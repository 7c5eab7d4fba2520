"""Signed NOC commands: only the vendor's root, through a command key it certified, commands.

The broker's TLS says who is connected, not who wrote a command: a broker that
is compromised or misconfigured can publish anything on ``pbx/<device>/cmd``.
So each command carries its own proof, checked against a vendor root public key
pinned on this box (``uplink.command_root``, ``/etc/pbx-agent/vendor-root.pub``
by default), independent of the broker's CA:

    {"v":1, "id", "ts", "exp", "device", "cmd", "args",
     "key": {"v":1, "use":"pbx-command", "kid", "pub", "nbf", "exp", "sig"},
     "sig": BASE64(Ed25519 over the canonical form of the command)}

* The command's canonical form is every field but ``sig`` and ``key``, as JSON
  with sorted keys, no whitespace, UTF-8 (RFC 8785 for the values commands
  carry: strings, integers, objects; a float is written as Python writes it,
  so a signer in another language should stay with integers and ISO times).
  Parsing and writing it again is what is checked, so two spellings of one
  value mean the same command.
* ``key`` is the command key's certificate: its public key (``pub``, 32 bytes
  in base64) and validity (``nbf``/``exp``, seconds since the epoch), signed by
  the root over the canonical form of everything in it but ``sig``. The root
  stays offline; rotating the command key needs nothing on the boxes.
* ``device`` must be this box's id, ``exp`` must not have passed, and the
  command key must be valid now. The handler's own checks (age, future skew,
  replay) still apply.

With no root key (file absent or unreadable) every command is refused, and
status says why: a box that cannot check a command does not run one.

``cryptography`` is imported only when a key is loaded or a command checked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import CommandRefused
from agent.strictjson import printable

KEY_USE = "pbx-command"
#: Fields that carry the proof and are not themselves signed.
PROOF_FIELDS = frozenset({"sig", "key"})
ED25519_PUBLIC_LEN = 32
ED25519_SIGNATURE_LEN = 64
_CACHE_SIZE = 8  # command keys whose root signature was checked (one or two in use at a time)


def canonical(obj: Any) -> bytes:
    """The bytes a signature covers: sorted keys, no whitespace, UTF-8; ValueError for NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def signed_part(msg: dict[str, Any]) -> dict[str, Any]:
    """The command without its proof: what the command key signs."""
    return {k: v for k, v in msg.items() if k not in PROOF_FIELDS}


def fingerprint(raw_public: bytes) -> str:
    """A short name for a public key: ``SHA256:`` and the first 16 hex digits of its hash."""
    return "SHA256:" + hashlib.sha256(raw_public).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class CommandKey:
    """A command key the pinned root certified."""

    kid: str
    public: bytes
    not_before: float
    expires: float
    #: The loaded key (cryptography's object), made once per key rather than per command.
    loaded: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class RootKey:
    """The vendor's root public key as pinned on this box."""

    path: Path
    public: bytes

    @property
    def fingerprint(self) -> str:
        """Its short name, as ``noc keys init-root`` prints it."""
        return fingerprint(self.public)


#: The DER of an Ed25519 SubjectPublicKeyInfo before its 32 key bytes (RFC 8410): the
#: root key is read with the standard library, so an idle daemon does not keep
#: ``cryptography`` resident for it; that is imported when a command is checked.
ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PEM_PUBLIC = re.compile(rb"-----BEGIN PUBLIC KEY-----(.+?)-----END PUBLIC KEY-----", re.S)


def load_root(path: Path) -> RootKey:
    """Read a PEM Ed25519 public key; ValueError naming the file and what is wrong."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the vendor root key: {exc.strerror}") from None
    found = _PEM_PUBLIC.search(data)
    if found is None:
        raise ValueError(f"{path}: not a PEM public key (no '-----BEGIN PUBLIC KEY-----')")
    try:
        der = base64.b64decode(b"".join(found.group(1).split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{path}: not a PEM public key ({exc})") from None
    if len(der) != len(ED25519_SPKI_PREFIX) + 32 or not der.startswith(ED25519_SPKI_PREFIX):
        raise ValueError(f"{path}: the vendor root key must be Ed25519")
    return RootKey(path=path, public=der[len(ED25519_SPKI_PREFIX) :])


def _b64(value: object, what: str, length: int) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * length + 8:
        raise CommandRefused(f"{what} must be base64 text")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise CommandRefused(f"{what} is not valid base64") from None
    if len(raw) != length:
        raise CommandRefused(f"{what} must be {length} bytes, not {len(raw)}")
    if base64.b64encode(raw).decode() != value:
        # The last character's unused bits: another text for the same bytes. One spelling
        # only, so that an altered command is never accepted as it stands.
        raise CommandRefused(f"{what} is not in canonical base64")
    return raw


def _seconds(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CommandRefused(f"{what} must be seconds since the epoch")
    out = float(value)
    if not math.isfinite(out):
        raise CommandRefused(f"{what} must be a finite time")
    return out


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _load_public(raw: bytes) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(raw)


def _verify(public: Any, signature: bytes, data: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        public.verify(signature, data)
    except InvalidSignature:
        return False
    return True


class CommandVerifier:
    """Checks each command's proof against the pinned root; says in status what it knows.

    :meth:`check` raises :class:`CommandRefused` naming what failed; it never
    runs anything itself. The root key is read when the verifier is made and,
    while it is missing, again at each command (so installing it needs no restart).
    """

    def __init__(self, root_path: Path | None, device_id: str) -> None:
        self.root_path = root_path
        self.device_id = device_id
        self.root: RootKey | None = None
        self.problem: str | None = None
        self.last_key: CommandKey | None = None
        self._certified: OrderedDict[bytes, CommandKey] = OrderedDict()
        self._load()

    def _load(self) -> None:
        if self.root_path is None:
            self.problem = "no vendor root key is configured (uplink.command_root)"
            return
        try:
            self.root = load_root(self.root_path)
            self.problem = None
        except ValueError as exc:
            self.problem = str(exc)

    def status(self) -> dict[str, Any]:
        """For ``agentctl status``: whether commands can be checked, and the last key seen."""
        out: dict[str, Any] = {
            "root": str(self.root_path) if self.root_path else None,
            "root_fingerprint": self.root.fingerprint if self.root else None,
            "accepting": self.root is not None,
            "problem": self.problem,
        }
        if self.last_key is not None:
            out["command_key"] = {
                "kid": self.last_key.kid,
                "expires": self.last_key.expires,
                "expires_utc": _utc(self.last_key.expires),
            }
        return out

    def check(self, msg: dict[str, Any], now: float) -> CommandKey:
        """The command key that signed ``msg``; CommandRefused if anything does not hold."""
        if self.root is None:
            self._load()
        if self.root is None:
            raise CommandRefused(f"commands are refused on this box: {self.problem}")
        if "sig" not in msg:
            raise CommandRefused('command is not signed (no "sig"); this box runs signed only')
        signature = _b64(msg.get("sig"), '"sig"', ED25519_SIGNATURE_LEN)
        key = self._command_key(msg.get("key"), self.root, now)
        try:
            data = canonical(signed_part(msg))
        except (TypeError, ValueError):
            raise CommandRefused("command cannot be put in canonical form") from None
        if not _verify(key.loaded, signature, data):
            raise CommandRefused(f"command signature does not verify with command key {key.kid!r}")
        device = msg.get("device")
        if device != self.device_id:
            shown = repr(printable(device)) if isinstance(device, str) else "no device"
            raise CommandRefused(f"command is for {shown}, not for this box ({self.device_id!r})")
        if "exp" not in msg:
            raise CommandRefused('signed command has no expiry ("exp")')
        expires = _seconds(msg.get("exp"), '"exp"')
        if now > expires:
            raise CommandRefused(f"command expired at {_utc(expires)} ({now - expires:.0f} s ago)")
        self.last_key = key
        return key

    def _command_key(self, cert: object, root: RootKey, now: float) -> CommandKey:
        if not isinstance(cert, dict):
            raise CommandRefused('command carries no command key certificate ("key")')
        try:
            whole = canonical(cert)
        except (TypeError, ValueError):
            raise CommandRefused(
                "the command key certificate cannot be put in canonical form"
            ) from None
        key = self._certified.get(whole)
        if key is None:
            key = self._certify(cert, root)
            self._certified[whole] = key
            while len(self._certified) > _CACHE_SIZE:
                self._certified.popitem(last=False)
        if now < key.not_before:
            raise CommandRefused(
                f"command key {key.kid!r} is not valid before {_utc(key.not_before)}"
            )
        if now > key.expires:
            raise CommandRefused(f"command key {key.kid!r} expired at {_utc(key.expires)}")
        return key

    def _certify(self, cert: dict[str, Any], root: RootKey) -> CommandKey:
        root_sig = _b64(cert.get("sig"), "the command key's root signature", ED25519_SIGNATURE_LEN)
        if cert.get("v") != 1 or type(cert.get("v")) is not int or cert.get("use") != KEY_USE:
            raise CommandRefused(f'the command key certificate is not a v1 "{KEY_USE}" key')
        kid = cert.get("kid")
        if not isinstance(kid, str) or not 0 < len(kid) <= 64 or not kid.isprintable():
            raise CommandRefused('the command key certificate has no usable "kid"')
        public = _b64(cert.get("pub"), "the command key", ED25519_PUBLIC_LEN)
        not_before = _seconds(cert.get("nbf"), "the command key's nbf")
        expires = _seconds(cert.get("exp"), "the command key's exp")
        # canonical() of the whole certificate succeeded already, so it does of a part.
        if not _verify(_load_public(root.public), root_sig, canonical(signed_part(cert))):
            raise CommandRefused(
                f"command key {printable(kid)!r} is not signed by the pinned vendor root "
                f"({root.fingerprint})"
            )
        return CommandKey(
            kid=kid,
            public=public,
            not_before=not_before,
            expires=expires,
            loaded=_load_public(public),
        )
