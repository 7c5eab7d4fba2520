"""Vendor logins as sshd reports them: followed in sshd's log, matched by key fingerprint.

sshd logs every accepted public-key login with the key's fingerprint::

    Accepted publickey for pbx-support from 127.0.0.1 port 51234 ssh2: ED25519 SHA256:Kq…

While a support session holds a one-time vendor key, the agent follows the
log file named by ``support.sshd_log`` (``/var/log/auth.log``, or a file given
to sshd with ``-E``) from its end, and ledgers each login with that key's
fingerprint. A rotated or truncated file is read again from its start.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MAX_READ = 1024 * 1024  # per poll: a flood in the log cannot take the daemon's memory
ACCEPTED = re.compile(
    r"Accepted publickey for (?P<user>\S+) from (?P<addr>\S+) port (?P<port>\d+) ssh2: "
    r"(?P<family>[A-Z0-9-]+) (?P<fingerprint>SHA256:[A-Za-z0-9+/]{43})"
)


@dataclass(frozen=True, slots=True)
class Login:
    """One accepted public-key login."""

    user: str
    addr: str
    port: int
    family: str
    fingerprint: str
    seen_at: float

    def to_json(self) -> dict[str, Any]:
        """For the ledger and status."""
        return asdict(self)


def parse_login(line: str, now: float | None = None) -> Login | None:
    """The login an sshd log line reports, or None."""
    m = ACCEPTED.search(line)
    if m is None:
        return None
    return Login(
        user=m["user"],
        addr=m["addr"],
        port=int(m["port"]),
        family=m["family"],
        fingerprint=m["fingerprint"],
        seen_at=time.time() if now is None else now,
    )


class LogFollower:
    """Reads the lines appended to a log file since the last call, like ``tail -F``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.error: str | None = None
        self._inode: int | None = None
        self._offset = 0
        self._partial = b""
        try:
            st = path.stat()
        except OSError as exc:
            self.error = f"{path}: {exc.strerror}"
            return
        # Only what sshd logs from now on concerns this session.
        self._inode, self._offset = st.st_ino, st.st_size

    def lines(self) -> list[str]:
        """Complete lines written since the last call (a rotated file is read from its start)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            self.error = f"{self.path}: {exc.strerror}"
            return []
        try:
            st = os.fstat(fd)
            if st.st_ino != self._inode or st.st_size < self._offset:
                self._inode, self._offset, self._partial = st.st_ino, 0, b""
            if st.st_size == self._offset:
                return []
            os.lseek(fd, self._offset, os.SEEK_SET)
            data = os.read(fd, MAX_READ)
        finally:
            os.close(fd)
        self.error = None
        self._offset += len(data)
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        if len(self._partial) > MAX_READ:
            self._partial = b""  # a line that never ends is not sshd's
        return [line.decode("utf-8", "replace") for line in complete]

    def logins(self) -> list[Login]:
        """Logins accepted since the last call."""
        found = []
        for line in self.lines():
            login = parse_login(line)
            if login is not None:
                found.append(login)
        return found
