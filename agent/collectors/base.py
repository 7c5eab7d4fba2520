"""What a collector is: something that reads the box and hands records to the gate.

A collector never sends anything and never decides what may leave. It offers
each record to ``emit``, which returns True when the gate approved it and the
outbox stored it; a collector that keeps state (checkpoints, the last snapshot)
advances it on that answer, so a record the switch refused is not sent later.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from agent.policy.classes import Record

#: Offer a record to the gate; True when approved and stored in the outbox.
Emit = Callable[[Record], bool]


class Collector(Protocol):
    """The interface the daemon's scheduler drives."""

    @property
    def name(self) -> str:
        """Short name used in logs, status and the NOC ``collect`` command."""
        ...

    @property
    def interval(self) -> float:
        """Seconds between scheduled runs."""
        ...

    async def collect(self, emit: Emit, *, reason: str) -> None:
        """Gather once and offer records to ``emit``.

        ``reason`` is ``"schedule"`` or ``"command"`` (a NOC ``collect``); a
        snapshot collector sends a full snapshot on ``"command"``. Raise
        :class:`agent.errors.CollectorError` with an actionable message when the
        source cannot be read; the scheduler logs it, reports it in status and
        tries again at the next interval.
        """
        ...

    def status(self) -> dict[str, Any]:
        """Small JSON-able facts for ``agentctl status`` (counters, last error)."""
        ...

    async def aclose(self) -> None:
        """Release files and connections; called on shutdown and reload."""
        ...
