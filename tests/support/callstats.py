"""Helpers shared by the call-statistics tests: a hand-moved clock and an emit that records."""

from __future__ import annotations

from typing import Any

from agent.collectors.base import Record


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
