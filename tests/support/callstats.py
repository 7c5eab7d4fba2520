"""Helpers shared by the call-statistics tests: a hand-moved clock, an emit that records,
and the list of collectors a test opened (tests/conftest.py closes what is left in it)."""

from __future__ import annotations

import asyncio
from typing import Any

from agent.collectors.callstats.collector import CallstatsCollector
from agent.policy.classes import Record

#: Collectors opened by the running test; a test that closes one itself removes it.
OPEN: list[CallstatsCollector] = []


def close_open() -> None:
    """Close every collector still in :data:`OPEN`."""
    while OPEN:
        asyncio.run(OPEN.pop().aclose())


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Sink:
    """Records offered bodies; answers True (approved) or False (switch off)."""

    def __init__(self, approve: bool = True) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.approve = approve

    def __call__(self, record: Record) -> bool:
        self.bodies.append(dict(record.body))
        return self.approve

    def final(self) -> dict[str, dict[str, Any]]:
        """The last revision offered per bucket."""
        out: dict[str, dict[str, Any]] = {}
        for body in self.bodies:
            out[body["bucket_start"]] = body
        return out
