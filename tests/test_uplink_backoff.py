"""The uplink's reconnect backoff: it grows within an outage and starts afresh after a good run.

In process, with a real mTLS mosquitto that the test stops and starts: the
session's calls to ``backoff`` are recorded (and shortened) so that the test
reads which attempt each retry was, instead of timing random delays.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.uplink import session as session_mod
from agent.uplink.session import UplinkState
from tests.support.agents import SimAgent
from tests.support.mosquitto import Mosquitto
from tests.support.pki import PKI

pytestmark = pytest.mark.integration


def test_backoff_starts_afresh_after_a_stable_connection(
    pki: PKI, broker_factory: Callable[..., Mosquitto], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failed attempts count up; once a connection has stayed up, the next outage starts at 0."""
    attempts: list[int] = []

    def recorded(attempt: int, base: float = 1.0, cap: float = 60.0) -> float:
        attempts.append(attempt)
        return 0.05

    monkeypatch.setattr(session_mod, "backoff", recorded)
    monkeypatch.setattr(session_mod, "STABLE_FOR", 0.5)
    broker = broker_factory()
    root = Path(tempfile.mkdtemp(prefix="pbx-backoff-"))
    agent = SimAgent(
        "pbx-test-1", pki.device("pbx-test-1"), pki.ca_file, broker.port, root, keepalive=5
    )

    async def until(predicate: Callable[[], bool], what: str) -> None:
        async with asyncio.timeout(15):
            while not predicate():  # noqa: ASYNC110 -- the session's state has no event
                await asyncio.sleep(0.02)
        assert predicate(), what

    async def scenario() -> None:
        agent.open()
        assert agent.session is not None
        s = agent.session
        broker.stop()
        agent.start()
        await until(lambda: len(attempts) >= 4, "four failed attempts")
        assert attempts[:4] == [0, 1, 2, 3]  # one outage: each retry waits longer
        broker.start()
        await until(lambda: s.state is UplinkState.CONNECTED, "connected again")
        await asyncio.sleep(0.6)  # up longer than STABLE_FOR: that is the condition under test
        seen = len(attempts)
        broker.kill()
        await until(lambda: len(attempts) > seen, "a retry after the new outage")
        assert attempts[seen] == 0  # a new outage, not the fifth attempt of the old one
        await agent.stop()

    asyncio.run(scenario())
