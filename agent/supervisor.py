"""Runs the daemon's components under one TaskGroup, restarting any that fail.

A component is a coroutine function that runs until cancelled. When one raises,
the error is logged and counted, and it is started again after a capped,
jittered backoff, while the others keep running. Cancellation (shutdown,
reload) goes straight through: it is never mistaken for a failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from agent.aio import BACKOFF_CAP, backoff
from agent.errors import AgentError

log = structlog.get_logger(__name__)

#: A component that ran at least this long before failing starts its backoff afresh.
STABLE_FOR = BACKOFF_CAP


@dataclass
class ComponentState:
    """What status shows about one component."""

    name: str
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


class Supervisor:
    """Starts named components in a TaskGroup and restarts the ones that fail."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        delay: Callable[[int], float] = backoff,
    ) -> None:
        """``clock``, ``sleep`` and ``delay`` (the backoff for an attempt) are for tests."""
        self.states: dict[str, ComponentState] = {}
        self._clock = clock
        self._sleep = sleep
        self._delay = delay

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
            started = self._clock()
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
                if self._clock() - started > STABLE_FOR:
                    attempt = 0  # it ran well for a while: start the backoff afresh
                delay = self._delay(attempt)
                attempt += 1
                if isinstance(exc, AgentError):
                    log.error(
                        "component_failed", component=name, error=str(exc), retry_in=round(delay, 2)
                    )
                else:
                    log.exception("component_crashed", component=name, retry_in=round(delay, 2))
                await self._sleep(delay)
