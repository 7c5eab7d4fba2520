"""SSH public keys as text: parsed, checked, fingerprinted, pinned; the box's own key made here.

Remote support deals in three keys: the bastion's host key (pinned in the
configuration, no trust on first use), the box's Ed25519 key (made on the box,
never leaves it) and the vendor's one-time login key (carried by
``support.connect``). All arrive as OpenSSH text, and text from a command or a
configuration file is not trusted: a key is re-encoded from its decoded parts
before it is written anywhere, so that nothing but ``TYPE BASE64`` can reach an
sshd answer (an option or a second line smuggled in a comment cannot).

Parsing needs only the standard library; ``cryptography`` is imported when a
key is made or read from a private key file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from agent.errors import KeyFormatError, StateError

ED25519 = "ssh-ed25519"
ECDSA_CURVES = {
    "ecdsa-sha2-nistp256": "nistp256",
    "ecdsa-sha2-nistp384": "nistp384",
    "ecdsa-sha2-nistp521": "nistp521",
}
RSA = "ssh-rsa"
KEY_TYPES = (ED25519, *ECDSA_CURVES, RSA)
MIN_RSA_BITS = 2048
MAX_LINE = 16 * 1024


@dataclass(frozen=True, slots=True)
class PublicKey:
    """An SSH public key: its algorithm name and its wire-format blob."""

    type: str
    blob: bytes

    @property
    def base64(self) -> str:
        """The blob as OpenSSH writes it."""
        return base64.b64encode(self.blob).decode()

    @property
    def fingerprint(self) -> str:
        """``SHA256:…``, as ``ssh-keygen -l`` and sshd's log print it."""
        digest = hashlib.sha256(self.blob).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    @property
    def family(self) -> str:
        """``ED25519``, ``ECDSA`` or ``RSA``: the word sshd's log puts before the fingerprint."""
        if self.type == ED25519:
            return "ED25519"
        return "RSA" if self.type == RSA else "ECDSA"

    def line(self, comment: str = "") -> str:
        """``TYPE BASE64 [comment]``; the comment is reduced to safe characters."""
        safe = "".join(c for c in comment if c.isalnum() or c in "-_.@:")[:64]
        return f"{self.type} {self.base64}" + (f" {safe}" if safe else "")


@dataclass(frozen=True, slots=True)
class HostKeyPin:
    """The bastion's pinned host key, and the host patterns when given as a known_hosts line."""

    key: PublicKey
    hosts: tuple[str, ...] | None = None

    def matches_host(self, host: str, port: int) -> bool:
        """Whether a known_hosts host list names ``host:port`` (always true for a bare key)."""
        if self.hosts is None:
            return True
        entry = known_hosts_name(host, port)
        hit = False
        for pattern in self.hosts:
            negated = pattern.startswith("!")
            if _host_pattern_matches(pattern[1:] if negated else pattern, entry):
                if negated:
                    return False
                hit = True
        return hit

    @property
    def key_types(self) -> list[str]:
        """The host key algorithms to offer so that the server shows exactly this key."""
        if self.key.type == RSA:
            return ["rsa-sha2-512", "rsa-sha2-256"]
        return [self.key.type]


def known_hosts_name(host: str, port: int) -> str:
    """How known_hosts names a server: ``host`` on port 22, ``[host]:port`` otherwise."""
    return host if port == 22 else f"[{host}]:{port}"


def _host_pattern_matches(pattern: str, entry: str) -> bool:
    if pattern.startswith("|1|"):
        parts = pattern.split("|")
        if len(parts) != 4:
            return False
        try:
            salt = base64.b64decode(parts[2], validate=True)
            want = base64.b64decode(parts[3], validate=True)
        except (binascii.Error, ValueError):
            return False
        got = hmac.new(salt, entry.encode(), hashlib.sha1).digest()
        return hmac.compare_digest(got, want)
    # OpenSSH patterns know only * and ?; brackets are literal (``[host]:port``).
    regex = "".join(
        ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower()
    )
    return re.fullmatch(regex, entry.lower()) is not None


def _strings(blob: bytes) -> list[bytes]:
    """Split an SSH wire blob into its length-prefixed fields."""
    out, i = [], 0
    while i < len(blob):
        if i + 4 > len(blob):
            raise KeyFormatError("the key data is truncated")
        (n,) = struct.unpack(">I", blob[i : i + 4])
        i += 4
        if n > len(blob) - i:
            raise KeyFormatError("the key data is truncated")
        out.append(blob[i : i + n])
        i += n
    return out


def check_blob(key_type: str, blob: bytes) -> None:
    """Raise KeyFormatError unless ``blob`` is a well-formed key of ``key_type``."""
    fields = _strings(blob)
    if not fields or fields[0] != key_type.encode():
        named = fields[0][:40].decode("ascii", "replace") if fields else "nothing"
        raise KeyFormatError(f"the key data says {named!r}, not {key_type!r}")
    if key_type == ED25519:
        if len(fields) != 2 or len(fields[1]) != 32:
            raise KeyFormatError("an ssh-ed25519 key holds exactly one 32-byte point")
    elif key_type in ECDSA_CURVES:
        if len(fields) != 3 or fields[1] != ECDSA_CURVES[key_type].encode():
            raise KeyFormatError(f"the curve does not match {key_type}")
        if not fields[2] or fields[2][0] != 4:
            raise KeyFormatError("the ECDSA point is not an uncompressed point")
    elif key_type == RSA:
        if len(fields) != 3:
            raise KeyFormatError("an ssh-rsa key holds an exponent and a modulus")
        bits = int.from_bytes(fields[2], "big").bit_length()
        if bits < MIN_RSA_BITS:
            raise KeyFormatError(f"an RSA key of {bits} bits is too weak (at least {MIN_RSA_BITS})")
    else:
        raise KeyFormatError(
            f"unsupported key type {key_type!r} (use one of {', '.join(KEY_TYPES)})"
        )


def parse_public_key(text: str) -> PublicKey:
    """``TYPE BASE64 [comment]`` → PublicKey; no options, one line, a known type."""
    if not isinstance(text, str):
        raise KeyFormatError("expected a public key as text: TYPE BASE64 [comment]")
    if len(text) > MAX_LINE:
        raise KeyFormatError(f"longer than {MAX_LINE} characters")
    text = text.strip()  # a .pub file's final newline
    if any(c in text for c in "\r\n\0"):
        raise KeyFormatError("a public key is one line")
    parts = text.split()
    if len(parts) < 2:
        raise KeyFormatError("expected TYPE BASE64 [comment]")
    key_type, data = parts[0], parts[1]
    if key_type not in KEY_TYPES:
        shown = key_type[:40]
        raise KeyFormatError(
            f"unsupported key type {shown!r} (options before the key are not accepted; "
            f"use one of {', '.join(KEY_TYPES)})"
        )
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError("the key data is not base64") from None
    check_blob(key_type, blob)
    return PublicKey(key_type, blob)


def parse_host_key(text: str) -> HostKeyPin:
    """A pinned host key: ``TYPE BASE64`` or a known_hosts line ``HOSTS TYPE BASE64``."""
    if not isinstance(text, str) or not text.strip():
        raise KeyFormatError("expected 'TYPE BASE64' or a known_hosts line 'HOST TYPE BASE64'")
    parts = text.split()
    if parts[0].startswith("@"):
        raise KeyFormatError(f"{parts[0]} lines are not accepted: pin the bastion's own key")
    if parts[0] in KEY_TYPES:
        return HostKeyPin(parse_public_key(text))
    if len(parts) < 3:
        raise KeyFormatError("expected 'TYPE BASE64' or a known_hosts line 'HOST TYPE BASE64'")
    hosts = tuple(h for h in parts[0].split(",") if h)
    return HostKeyPin(parse_public_key(" ".join(parts[1:])), hosts)


# -- the box's own key -----------------------------------------------------------------------


def public_key_file(private: Path) -> Path:
    """Where the public half of ``private`` is kept (``….pub``)."""
    return private.with_name(private.name + ".pub")


def check_private_key_file(path: Path) -> None:
    """Refuse a private key that group or others can read, as ssh does."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise StateError(f"the support key {path} does not exist") from None
    except OSError as exc:
        raise StateError(f"cannot read the support key {path}: {exc.strerror}") from exc
    if st.st_mode & 0o077:
        raise StateError(
            f"the support key {path} is readable by group or others "
            f"(mode {st.st_mode & 0o777:04o}); chmod 600 it"
        )


def ensure_box_key(path: Path, comment: str) -> tuple[PublicKey, bool]:
    """The box's Ed25519 key pair at ``path`` (made now if absent); and whether it was made.

    The private key is written in OpenSSH format, mode 0600, and never leaves
    the box; the public key goes beside it (``.pub``), for the vendor's bastion.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from agent.fsutil import atomic_write

    made = False
    if not path.exists():
        key = ed25519.Ed25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(path, private, 0o600)
        except OSError as exc:
            raise StateError(f"cannot write the support key {path}: {exc.strerror}") from exc
        made = True
    check_private_key_file(path)
    try:
        loaded = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        raise StateError(f"the support key {path} is not a usable OpenSSH key: {exc}") from exc
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise StateError(f"the support key {path} is not an Ed25519 key")
    text = (
        loaded.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    public = parse_public_key(text)
    pub_file = public_key_file(path)
    line = public.line(comment) + "\n"
    try:
        if not pub_file.exists() or pub_file.read_text() != line:
            atomic_write(pub_file, line.encode(), 0o644)
    except OSError as exc:
        raise StateError(f"cannot write {pub_file}: {exc.strerror}") from exc
    return public, made


def read_public_key_file(path: Path) -> PublicKey | None:
    """The public half kept beside a private key, or None when there is none yet."""
    try:
        return parse_public_key(public_key_file(path).read_text().strip())
    except (OSError, KeyFormatError):
        return None


def chown_like_parent(path: Path) -> None:
    """Give a file made by root the owner of its folder (agentctl run as root for the daemon)."""
    if os.geteuid() != 0:
        return
    st = path.parent.stat()
    os.chown(path, st.st_uid, st.st_gid)
