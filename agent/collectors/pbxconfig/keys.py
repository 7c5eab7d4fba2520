"""The fingerprint key of redaction markers: 32 random bytes made on the box, never sent.

A marker ``<redacted:RULE:FINGERPRINT>`` carries an HMAC of the secret under this
key, so the NOC can see that a secret changed without learning it. The key
lives in its own file (mode 0600) in the state directory, is created on first
use, and is never logged.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from agent.collectors.pbxconfig import filters
from agent.errors import StateError
from agent.policy.local_rules import NO_LOCAL_RULES, LocalRules

KEY_FILE = "config-fingerprint.key"


# -- the fingerprint key -----------------------------------------------------------


def load_key(state_dir: Path, *, create: bool) -> tuple[bytes, bool]:
    """The fingerprint key and whether it is a throwaway one.

    With ``create`` a missing key is made (0600, written atomically, never
    replacing one another process made first). Without it (the read-only
    CLI) a missing key gives a throwaway key: fingerprints are then provisional.
    """
    path = state_dir / KEY_FILE
    try:
        key = path.read_bytes()
        if len(key) == 32:
            return key, False
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StateError(f"{path}: cannot read the fingerprint key: {exc.strerror}") from exc
    if not create:
        return secrets.token_bytes(32), True
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_dir / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, secrets.token_bytes(32))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process made the key first: keep theirs
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        key = path.read_bytes()
    except OSError as exc:
        raise StateError(f"{path}: cannot create the fingerprint key: {exc.strerror}") from exc
    if len(key) != 32:
        raise StateError(f"{path}: the fingerprint key is not 32 bytes; remove it to make anew")
    return key, False


def key_id(key: bytes, local: LocalRules = NO_LOCAL_RULES) -> str:
    """What a cached result was made with: the key (a digest of it; stays on the box),
    the redaction code (:data:`filters.REDACTION_VERSION`) and the local rules.

    A cached result made otherwise is not used: the file is read and redacted
    again, and sent only if its redacted content differs.
    """
    digest = hashlib.sha256(b"pbx-config-snapshot key id" + key).hexdigest()[:16]
    return f"{digest}/r{filters.redaction_id(local)}"
