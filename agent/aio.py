"""Small asyncio helpers shared by the daemon's components: backoff and a stop that ends.

Why a module of its own: the supervisor, the uplink session and the control
server all need them, and none of them should import another for it.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0


def backoff(attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)].

    Full jitter spreads a fleet's retries over the whole window after a shared
    outage (a broker restart) instead of bunching them at its end.
    """
    return random.uniform(0, min(cap, base * 2 ** min(attempt, 30)))  # noqa: S311 -- not crypto


async def cancel_and_wait(task: asyncio.Task[Any], budget: float | None = None) -> bool:
    """Cancel ``task`` until it has ended or ``budget`` seconds (None: no bound) have
    passed; True if it ended.

    One ``cancel()`` is not always enough: Python 3.11's ``asyncio.wait_for``
    returns instead of raising when a cancellation lands just as what it awaits
    completes, and a library that awaits through it swallows the request.
    Awaiting such a task through ``gather`` or ``wait`` without a bound would then
    wait for ever; this cancels again until the task is done.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (budget if budget is not None else float("inf"))
    while not task.done():
        left = deadline - loop.time()
        if left <= 0:
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=min(0.1, left))
    return True
