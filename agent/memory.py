"""Giving memory back: glibc's malloc tuned for a daemon that is idle most of its life.

Why it exists: each thread that allocates gets a malloc arena of its own, and
memory freed in an arena stays in the process. The daemon's threads (the
health readings, the CDR reader, the snapshot worker, the connect thread) each
allocate a little once a minute or once an hour, and their arenas held about
3 MiB of the idle daemon's resident memory (issue 17). Two arenas are enough
for a process whose Python code takes turns at one lock anyway, and
``malloc_trim`` after a collection returns what a burst (a snapshot) freed.
Outside glibc both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_ARENA_MAX = -8  # <malloc.h>
ARENAS = 2

_looked = False
_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL | None:
    global _looked, _libc
    if not _looked:
        _looked = True
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
        except OSError:
            libc = None
        _libc = libc if libc is not None and hasattr(libc, "malloc_trim") else None
    return _libc


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap malloc's arenas (call before threads start); whether it took effect."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_ARENA_MAX, arenas))


def trim() -> bool:
    """Return freed heap memory to the system; whether any was returned."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))
