"""Being told when a file changes instead of asking every second: inotify, or a poll.

Why it exists: an idle daemon that polls a file once a second wakes the box 60
times a minute to learn nothing (issue 17). On Linux, inotify (through
``ctypes``: no library to install, nothing resident but libc) tells the event
loop when a name in a watched folder is created, written, renamed or removed;
:class:`FolderWatch` turns that into a callback on the loop's thread. Where
inotify is missing or refused (another OS, ``fs.inotify.max_user_instances``
exhausted, a filesystem that does not report), :attr:`FolderWatch.active` is
False and the caller keeps polling at its old interval: the fallback is the
behaviour that was there before, never less.

A folder is watched rather than the file itself: files here are replaced by a
rename (``atomic_write``) or rotated, which ends a watch on the old inode.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

# <sys/inotify.h>
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

#: A name appears, is replaced, written or removed; or the folder itself goes.
CHANGES = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)
#: A name replaced (renamed into place), created, removed, or written and closed: how
#: files written by ``atomic_write`` change, without every write of a database beside them.
REPLACED = CHANGES & ~(IN_MODIFY | IN_ATTRIB)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name

#: ``PBX_AGENT_INOTIFY=0`` in the environment: poll, as where inotify does not work
#: (a network filesystem that does not report changes made by other machines).
DISABLE = "PBX_AGENT_INOTIFY"

_libc: ctypes.CDLL | None = None


def _inotify() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        if name is None:
            return None
        try:
            libc = ctypes.CDLL(name, use_errno=True)
            libc.inotify_init1.argtypes = [ctypes.c_int]
            libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        except (OSError, AttributeError):
            return None
        _libc = libc
    return _libc


class FolderWatch:
    """Call ``on_change(name)`` on the loop's thread when a watched name in a folder changes.

    ``names`` limits the callback to those file names (None: any name; ``""`` is passed
    for a change of the folder itself, or when events were lost). :attr:`active` is
    False when inotify could not be set up: poll instead. Close it with :meth:`close`.
    """

    def __init__(
        self,
        folders: Iterable[Path],
        on_change: Callable[[str], None],
        *,
        names: Iterable[str] | None = None,
        mask: int = CHANGES,
    ) -> None:
        self._on_change = on_change
        self._names = None if names is None else frozenset(os.fsencode(n) for n in names)
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: str | None = None
        libc = _inotify()
        if os.environ.get(DISABLE) == "0":
            self.error = f"{DISABLE}=0"
            return
        if libc is None:
            self.error = "inotify is not available"
            return
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            self.error = f"inotify_init1: {os.strerror(ctypes.get_errno())}"
            return
        for folder in folders:
            wd = libc.inotify_add_watch(fd, os.fsencode(folder), mask | IN_ONLYDIR)
            if wd < 0:
                self.error = f"{folder}: cannot watch: {os.strerror(ctypes.get_errno())}"
                os.close(fd)
                return
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)

    @property
    def active(self) -> bool:
        """Whether changes are reported (else the caller must poll)."""
        return self._fd is not None

    def _readable(self) -> None:
        fd = self._fd
        if fd is None:
            return
        try:
            data = os.read(fd, 64 * 1024)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(f"inotify read: {exc.strerror}")
            return
        seen: set[str] = set()
        i = 0
        while i + _EVENT.size <= len(data):
            _wd, mask, _cookie, length = _EVENT.unpack_from(data, i)
            raw = data[i + _EVENT.size : i + _EVENT.size + length].rstrip(b"\0")
            i += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                seen.add("")  # events were lost: something may have changed
            elif mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
                seen.add("")
                if mask & IN_IGNORED:
                    # The folder is gone: no more events will come. Say so, and let the
                    # caller poll (it sees active False).
                    self._fail("the watched folder was removed")
            elif self._names is None or raw in self._names:
                seen.add(os.fsdecode(raw))
        for name in seen:
            self._on_change(name)

    def _fail(self, why: str) -> None:
        log.warning("file_watch_stopped", error=why, note="polling instead")
        self.error = why
        self.close()

    def close(self) -> None:
        """Stop watching (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(fd)
        os.close(fd)
