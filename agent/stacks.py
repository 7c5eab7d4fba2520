"""What a stuck agent is doing: every thread's stack and every task's chain of awaits.

``kill -USR1`` logs both from the event loop (see :mod:`agent.daemon`). Unlike
faulthandler's dump of running threads from inside a signal handler, reading
them here is safe while they run; it needs a loop that still turns, and for one
that does not, the watchdog's SIGABRT makes faulthandler dump as the process dies.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import traceback
from typing import Any


def thread_stacks() -> list[dict[str, Any]]:
    """Every thread with its current stack, innermost frame last (safe to call any time)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    return [
        {
            "thread": names.get(ident, str(ident)),
            "frames": [
                f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_stack(frame)[-30:]
            ],
        }
        for ident, frame in sys._current_frames().items()
    ]


def task_stacks() -> list[dict[str, Any]]:
    """Every task of the running loop with the chain of awaits it is suspended in.

    ``Task.get_stack()`` shows only a suspended task's outermost frame; following
    ``cr_await`` shows where it actually waits, which is what a hang needs.
    """
    out: list[dict[str, Any]] = []
    for task in asyncio.all_tasks():
        frames: list[str] = []
        obj: Any = task.get_coro()
        while obj is not None and len(frames) < 30:
            frame = getattr(obj, "cr_frame", None) or getattr(obj, "gi_frame", None)
            if frame is not None:
                frames.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
            obj = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None)
        out.append({"task": task.get_name(), "cancelling": task.cancelling(), "awaits": frames})
    return out
