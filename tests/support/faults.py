"""Real storage faults: a small tmpfs to fill with ``dd``, and damage to SQLite files.

Why it exists: "the disk is full" and "the database is corrupt" are properties
of the kernel and of SQLite, not of a mock. A test mounts a tmpfs of a few MiB
on the daemon's state directory, lets the daemon work on it, fills the rest
with ``dd`` exactly as a runaway log would, and frees it again; the mount is
always undone (lazily, if the daemon still holds files there).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import TracebackType

FILLER = ".disk-filler"


class MountUnavailable(RuntimeError):
    """Mounting a tmpfs is not permitted here (not root, or in a container without it)."""


class Tmpfs:
    """A tmpfs of ``size`` mounted on ``path`` for the life of the ``with`` block."""

    def __init__(self, path: Path, size: str = "4m") -> None:
        self.path = path
        self.size = size
        self.mounted = False

    def __enter__(self) -> Tmpfs:
        self.path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            raise MountUnavailable("mounting a tmpfs needs root")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "tmpfs", str(self.path)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise MountUnavailable(f"mount -t tmpfs failed: {done.stderr.strip()}")
        self.mounted = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.mounted:
            # Lazily: a daemon that a failed test left running may still hold files here.
            subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)
            self.mounted = False

    def fill(self) -> int:
        """Fill every free byte with ``dd``; returns the bytes written."""
        filler = self.path / FILLER
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={filler}", "bs=64k", "oflag=append", "conv=notrunc"],
            capture_output=True,
            check=False,  # it ends with "No space left on device", which is the point
        )
        # dd's last block may have left less than a block free: fill that too.
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={filler}", "bs=512", "oflag=append", "conv=notrunc"],
            capture_output=True,
            check=False,
        )
        return filler.stat().st_size if filler.exists() else 0

    def free_bytes(self) -> int:
        """What the file system says is left."""
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def free(self) -> None:
        """Remove what :meth:`fill` wrote."""
        (self.path / FILLER).unlink(missing_ok=True)


def wreck_pages(path: Path, first_page: int, count: int, *, page_size: int = 4096) -> None:
    """Overwrite ``count`` pages of an SQLite file from ``first_page`` with noise, in place."""
    noise = bytes((i * 151 + 17) % 256 for i in range(page_size))
    with open(path, "r+b") as f:
        for page in range(first_page, first_page + count):
            f.seek(page * page_size)
            f.write(noise)
        f.flush()
        os.fsync(f.fileno())
