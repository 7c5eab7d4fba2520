"""One daemon per state directory: an exclusive ``flock`` on ``agent.lock`` in it.

Two daemons on one state directory would both write the outbox (duplicate
sequence numbers), both bind the control socket (the second deletes the first's,
leaving it unreachable) and both read the switch. The lock is the first thing a
daemon takes, before the database or the socket is touched; the second daemon
leaves with exit 75 (EX_TEMPFAIL), naming the lock file and the holder's pid.

``flock`` rather than a pid file alone: the kernel releases the lock when its
holder dies, kill -9 included, so a stale file never blocks a restart. The pid
written into the file is only there to be named in the message; where the file
cannot be written (a full disk), ``/proc/locks`` still tells who holds it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from agent.errors import StateError, StateLocked

LOCK_FILE = "agent.lock"


def lock_path(state_dir: Path) -> Path:
    """Where the lock file lives."""
    return state_dir / LOCK_FILE


class StateLock:
    """The held lock; released by :meth:`release` or when the process ends."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        """Give the lock up (closing the descriptor releases the flock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def acquire(state_dir: Path) -> StateLock:
    """Take the state directory's lock or raise :class:`StateLocked` naming its holder."""
    path = lock_path(state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
    except OSError as exc:
        raise StateError(f"cannot open the lock file {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd, path)
        os.close(fd)
        who = f"pid {holder}" if holder else "a process whose pid is unknown"
        raise StateLocked(
            f"another pbx-agent daemon ({who}) is running on the state directory "
            f"{state_dir}: it holds the lock {path}. Stop it first, or give this one "
            "another paths.state_dir"
        ) from None
    except OSError as exc:
        os.close(fd)
        raise StateError(f"cannot lock {path}: {exc.strerror}") from exc
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # a full disk: the lock holds all the same, and /proc/locks names us
    return StateLock(path, fd)


def _holder(fd: int, path: Path) -> int | None:
    """The pid of the lock's holder: from the file, else from /proc/locks."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return int(text)
    except OSError:
        pass
    st = os.fstat(fd)
    # "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF": pid, then major:minor:inode.
    want = f":{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].endswith(want):
            try:
                return int(fields[4])
            except ValueError:
                return None
    return None
