"""Runs the daemon's components under one TaskGroup, restarting any that fail.

A component is a coroutine function that runs until cancelled. When one raises,
the error is logged and counted, and it is started again after a capped,
jittered backoff, while the others keep running. Cancellation (shutdown,
reload) goes straight through: it is never mistaken for a failure.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.errors import AgentError

log = structlog.get_logger(__name__)

BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0


@dataclass
class ComponentState:
    """What status shows about one component."""

    name: str
    started_at: float = field(default_factory=time.time)
    restarts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    running: bool = False

    def to_json(self) -> dict[str, Any]:
        """JSON-able view."""
        return {
            "running": self.running,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }


def backoff(attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * 2 ** min(attempt, 30)))  # noqa: S311 -- not crypto


def check_cancelled() -> None:
    """Raise CancelledError when the current task has a cancellation pending.

    Python 3.11's ``asyncio.wait_for`` (aiomqtt awaits every acknowledgement with
    it) returns the result instead of raising when a cancellation lands just as the
    awaited operation completes. The request stays counted on the task
    (``Task.cancelling()``), so a loop that calls this after such an await ends as
    it was asked to instead of running on and holding up shutdown.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(task: asyncio.Task[Any], budget: float | None = None) -> bool:
    """Cancel ``task`` until it has ended or ``budget`` seconds (None: no bound) have
    passed; True if it ended.

    One ``cancel()`` is not enough when the task swallows it (see
    :func:`check_cancelled`); awaiting it through ``gather`` or ``wait`` without a
    timeout would then wait for ever.
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


class Supervisor:
    """Starts named components in a TaskGroup and restarts the ones that fail."""

    def __init__(self) -> None:
        self.states: dict[str, ComponentState] = {}

    async def run(self, components: dict[str, Callable[[], Awaitable[None]]]) -> None:
        """Run every component until cancelled."""
        async with asyncio.TaskGroup() as tg:
            for name, factory in components.items():
                tg.create_task(self._keep(name, factory), name=name)

    async def _keep(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        state = self.states.setdefault(name, ComponentState(name))
        attempt = 0
        while True:
            state.running = True
            started = time.monotonic()
            try:
                await factory()
                state.running = False
                return  # a component that returns has finished its job
            except asyncio.CancelledError:
                state.running = False
                raise
            except Exception as exc:
                state.running = False
                state.restarts += 1
                state.last_error = str(exc) if isinstance(exc, AgentError) else repr(exc)
                state.last_error_at = time.time()
                if time.monotonic() - started > BACKOFF_CAP:
                    attempt = 0  # it ran well for a while: start the backoff afresh
                delay = backoff(attempt)
                attempt += 1
                if isinstance(exc, AgentError):
                    log.error(
                        "component_failed", component=name, error=str(exc), retry_in=round(delay, 2)
                    )
                else:
                    log.exception("component_crashed", component=name, retry_in=round(delay, 2))
                await asyncio.sleep(delay)
