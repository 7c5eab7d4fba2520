"""When the renewer renews, on an injected clock: at two thirds of the life less the jitter,
never while the switch is off, never a certificate that has expired (a new token is needed);
status warns under 14 days. The exchange itself is proven in tests/test_enrollment.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from pathlib import Path
from typing import Any

import pytest

from agent.config import loads
from agent.ledger import Ledger
from agent.store import open_db
from agent.uplink import renew
from agent.uplink.renew import CertInfo, Renewer, due
from tests.support.pki import PKI

DAY = 86400.0


def info(start: float, days: float) -> CertInfo:
    """A certificate valid ``days`` from ``start``."""
    return CertInfo("CN=x", "CN=ca", "1", start, start + days * DAY)


def test_due_is_two_thirds_less_up_to_five_percent() -> None:
    """Over many draws: never after 2/3 of the life, never before 2/3 - 5 %, spread between."""
    rng = random.Random(1)
    c = info(0, 90)
    draws = [due(c, rng) / DAY for _ in range(2000)]
    assert 55.5 <= min(draws) < 56.0 and 59.5 < max(draws) <= 60.0


def test_status_warns_under_14_days_and_says_expired() -> None:
    """Days left, a warning under 14 days, and an expired one names the way out."""
    c = info(0, 90)
    assert "warning" not in c.status(now=70 * DAY)
    assert c.status(now=80 * DAY)["warning"] == "expires in 10.0 days"
    assert "new enrollment token" in c.status(now=91 * DAY)["warning"]


class Clock:
    """Time that moves only when the renewer sleeps."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.slept: list[float] = []
        self.moved = asyncio.Event()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        self.moved.set()
        await asyncio.sleep(0)

    async def tick(self) -> None:
        """Until the renewer has slept once more."""
        self.moved.clear()
        await asyncio.wait_for(self.moved.wait(), 5)


def renewer(tmp_path: Path, pki: PKI, clock: Clock, switch: list[bool]) -> Renewer:
    """A renewer for a certificate of the test PKI; its renew() only counts."""
    creds = pki.device("pbx-test-1")
    cfg = loads(
        "device_id: pbx-test-1\n"
        f"uplink: {{broker: 'mqtts://localhost:1', ca_file: {pki.ca_file}, "
        f"cert_file: {creds.cert}, key_file: {creds.key}}}\n"
        f"enroll: {{url: 'https://localhost:2', ca_file: {pki.ca_file}}}\n"
    )
    conn, _ = open_db(tmp_path / "state")
    assert cfg.uplink is not None and cfg.enroll is not None
    r = Renewer(
        cfg=cfg.enroll,
        uplink=cfg.uplink,
        device_id="pbx-test-1",
        state_dir=tmp_path / "state",
        switch_on=lambda: switch[0],
        ledger=Ledger(conn),
        session=None,
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(2),
    )
    r.calls = []  # type: ignore[attr-defined]

    async def counted() -> Any:
        r.calls.append(clock.now)  # type: ignore[attr-defined]
        raise asyncio.CancelledError  # one renewal is all this test needs to see

    r.renew = counted  # type: ignore[method-assign]
    return r


def test_renews_at_the_due_time_and_not_while_switched_off(tmp_path: Path, pki: PKI) -> None:
    """Switched off past the due time: nothing; switched on: renewed at once."""
    cert = renew.read_cert(pki.device("pbx-test-1").cert)
    at = due(cert, random.Random(2))
    clock = Clock(cert.not_before)
    switch = [False]
    r = renewer(tmp_path, pki, clock, switch)

    async def scenario() -> None:
        task = asyncio.create_task(r.run())
        while clock.now < at + 3600:  # an hour past due, severed
            await clock.tick()
        assert r.calls == []  # type: ignore[attr-defined]
        switch[0] = True
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert len(r.calls) == 1 and r.calls[0] >= at  # type: ignore[attr-defined]


def test_an_expired_certificate_is_not_renewed(tmp_path: Path, pki: PKI) -> None:
    """Past its expiry (severed all along, say) the renewer waits for a new enrollment."""
    cert = renew.read_cert(pki.device("pbx-test-1").cert)
    clock = Clock(cert.not_after + 1)
    r = renewer(tmp_path, pki, clock, [True])

    async def scenario() -> None:
        task = asyncio.create_task(r.run())
        while len(clock.slept) < 3:
            await clock.tick()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert r.calls == []  # type: ignore[attr-defined]
    assert "new enrollment token" in (r.last_error or "")
    assert dt.datetime.fromtimestamp(clock.now, dt.UTC) > dt.datetime.fromtimestamp(
        cert.not_after, dt.UTC
    )
