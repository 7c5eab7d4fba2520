"""Shared fixtures. Keep this file thin: the logic lives in tests/support/."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.callstats import close_open
from tests.support.mosquitto import Mosquitto, MosquittoUnavailable, require_mosquitto
from tests.support.pki import PKI, temporary_pki
from tests.support.postgres import Postgres, PostgresUnavailable
from tests.support.relay import Relay


@pytest.fixture(scope="session")
def deb_v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pbx-agent's .deb, built for real once per session (tests/test_deb.py, test_update_e2e.py)."""
    from tests.support import deb

    return deb.build(tmp_path_factory.mktemp("deb-v1"), deb.V1)


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


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One real PostgreSQL 15 cluster for the session; skipped where the binaries are missing."""
    try:
        pg = Postgres()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    with pg:
        yield pg


@pytest.fixture
def noc_dsn(postgres: Postgres, request: pytest.FixtureRequest) -> str:
    """A fresh database with the NOC's schema migrated; its DSN."""
    from noc import db

    name = "t_" + "".join(ch if ch.isalnum() else "_" for ch in request.node.name)[:50].lower()
    dsn = postgres.create_database(name)
    db.migrate(dsn)
    return dsn
