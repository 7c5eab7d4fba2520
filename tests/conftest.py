"""Shared fixtures. Keep this file thin: the logic lives in tests/support/."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support.callstats import close_open
from tests.support.mosquitto import Mosquitto, MosquittoUnavailable, require_mosquitto
from tests.support.pki import PKI, temporary_pki
from tests.support.relay import Relay


@pytest.fixture(scope="session")
def pki() -> Iterator[PKI]:
    """The test PKI: vendor CA, rogue CA, broker, pbx-test-1, pbx-test-2 and noc."""
    with temporary_pki() as p:
        yield p


def _mosquitto_or_fail() -> None:
    try:
        require_mosquitto()
    except MosquittoUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def broker(pki: PKI) -> Iterator[Mosquitto]:
    """One real mosquitto for the session. Do not stop it: use broker_factory for that."""
    _mosquitto_or_fail()
    with Mosquitto(pki) as m:
        yield m


@pytest.fixture
def broker_factory(pki: PKI) -> Iterator[Callable[..., Mosquitto]]:
    """Make private brokers (started) that a test may stop and start; all closed afterwards."""
    _mosquitto_or_fail()
    made: list[Mosquitto] = []

    def make(**kwargs: object) -> Mosquitto:
        m = Mosquitto(pki, **kwargs)  # type: ignore[arg-type]
        made.append(m)
        m.start()
        return m

    yield make
    for m in made:
        m.close()


@pytest.fixture
def relay_factory() -> Iterator[Callable[[str, int], Relay]]:
    """Make byte-counting relays to a host and port; all closed afterwards."""
    made: list[Relay] = []

    def make(host: str, port: int) -> Relay:
        r = Relay(host, port)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture(autouse=True)
def _close_callstats_collectors() -> Iterator[None]:
    """Close the call-statistics collectors a test left open (their state file, thread)."""
    yield
    close_open()
