"""Command-signing keys for tests: one root and command key per test session, made with the
NOC's own code (:mod:`noc.signing`), and a helper that signs a command as the NOC does.

Each is made once, in a folder of its own, the first time it is asked for: an Ed25519 key
costs microseconds, but every daemon a test starts pins the same root
(:func:`root_pub`) so that commands signed by :func:`sign` verify everywhere.
"""

from __future__ import annotations

import atexit
import json
import math
import shutil
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any

from noc import signing

#: How long a test command stays valid (the NOC's default signing.lifetime).
LIFETIME = 300.0


@cache
def _folder() -> Path:
    path = Path(tempfile.mkdtemp(prefix="pbx-signing-"))
    path.chmod(0o755)  # the daemon may run as another user in some tests
    atexit.register(shutil.rmtree, path, True)
    return path


@cache
def root() -> tuple[Path, Path]:
    """The root's private key file and public key file."""
    key, pub, _ = signing.init_root(_folder() / "root")
    (_folder() / "root").chmod(0o755)
    return key, pub


def root_pub() -> Path:
    """The public key every test box pins (``uplink.command_root``)."""
    return root()[1]


@cache
def command_key_file() -> Path:
    """The NOC's command key file (``signing.key_file``), valid for a day."""
    out = _folder() / "command-key.json"
    signing.issue_command_key(signing.load_root(root()[0]), out, days=1, kid="test-ck")
    return out


@cache
def signer() -> signing.CommandSigner:
    """The command key as the NOC loads it."""
    return signing.CommandSigner.load(command_key_file())


@cache
def signer_at(start: float, days: float = 1.0, kid: str = "test-ck") -> signing.CommandSigner:
    """A command key certified from ``start`` for ``days`` (for tests on an injected clock)."""
    out = _folder() / f"command-key-{kid}-{int(start)}-{days}.json"
    signing.issue_command_key(signing.load_root(root()[0]), out, days=days, kid=kid, now=start)
    return signing.CommandSigner.load(out)


def sign(
    msg: dict[str, Any],
    device: str,
    *,
    now: float | None = None,
    key: signing.CommandSigner | None = None,
) -> dict[str, Any]:
    """``msg`` bound to ``device`` and signed, valid LIFETIME seconds from ``now``."""
    at = time.time() if now is None else now
    return (key or key_for(at)).sign(msg, device, lifetime=LIFETIME, now=at)


def key_for(now: float) -> signing.CommandSigner:
    """A command key valid at ``now``: the session's own, or one made for an injected clock."""
    if abs(now - time.time()) < 3600:
        return signer()
    return signer_at(math.floor(now / 86400) * 86400 - 86400, days=7)


def signed_bytes(msg: dict[str, Any], device: str, *, now: float | None = None) -> bytes:
    """``msg`` signed and encoded; as it is (unsigned) when it cannot be signed (NaN, ∞)."""
    try:
        return json.dumps(sign(msg, device, now=now)).encode()
    except ValueError:
        return json.dumps(msg).encode()
