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


#: The agent's own modules that load only when their part is configured: the AMI client
#: (``collectors.health.pbx.ami``) and the MariaDB source (PyMySQL). paramiko, behind
#: ``uplink/sshlink.py``, loads only when a tunnel comes up: it shows in ``libraries``.
#: ``agentctl status --json`` lists those loaded (``daemon.loaded``).
OPTIONAL_MODULES = (
    "agent.collectors.health.ami",
    "agent.collectors.callstats.mariadb_source",
)


def loaded_modules() -> dict[str, Any]:
    """What this process has imported: a count, the libraries outside the standard
    library (top-level names), and the agent's optional modules present.

    What stays resident is what the box pays for (issue 17): this lets a person, and
    a test, see that an idle daemon holds no library its configuration does not use.
    """
    modules = list(sys.modules)
    stdlib = sys.stdlib_module_names
    libraries = {
        name.partition(".")[0]
        for name in modules
        if not name.startswith("_") and name.partition(".")[0] not in stdlib
    }
    libraries.discard("agent")
    return {
        "modules": len(modules),
        "libraries": sorted(libraries),
        "optional": [m for m in OPTIONAL_MODULES if m in sys.modules],
    }
