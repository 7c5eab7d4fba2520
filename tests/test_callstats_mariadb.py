"""The FreePBX MariaDB source against a real MariaDB server with FreePBX's cdr schema."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
from structlog.testing import capture_logs

from agent.collectors.callstats.collector import CallstatsCollector
from agent.collectors.callstats.settings import CallstatsSettings
from agent.collectors.callstats.store import STATE_FILE
from agent.errors import CollectorError
from agent.policy.classes import Record
from tests.fixtures.cdr.cdrgen import Call, fields, fmt_time, make_calls, recount, stored_counters
from tests.support.callstats import OPEN

pytestmark = pytest.mark.integration

BUCKET = 300
NOW = int(time.time())
T0 = NOW - 6 * 3600 - NOW % BUCKET

#: FreePBX's asteriskcdrdb.cdr (FreePBX 15/16 installs), without a primary key as shipped.
FREEPBX_CDR = """
CREATE TABLE `cdr` (
  `calldate` datetime NOT NULL DEFAULT '1000-01-01 00:00:00',
  `clid` varchar(80) NOT NULL DEFAULT '',
  `src` varchar(80) NOT NULL DEFAULT '',
  `dst` varchar(80) NOT NULL DEFAULT '',
  `dcontext` varchar(80) NOT NULL DEFAULT '',
  `channel` varchar(80) NOT NULL DEFAULT '',
  `dstchannel` varchar(80) NOT NULL DEFAULT '',
  `lastapp` varchar(80) NOT NULL DEFAULT '',
  `lastdata` varchar(80) NOT NULL DEFAULT '',
  `duration` int(11) NOT NULL DEFAULT 0,
  `billsec` int(11) NOT NULL DEFAULT 0,
  `disposition` varchar(45) NOT NULL DEFAULT '',
  `amaflags` int(11) NOT NULL DEFAULT 0,
  `accountcode` varchar(20) NOT NULL DEFAULT '',
  `uniqueid` varchar(32) NOT NULL DEFAULT '',
  `userfield` varchar(255) NOT NULL DEFAULT '',
  `did` varchar(50) NOT NULL DEFAULT '',
  `recordingfile` varchar(255) NOT NULL DEFAULT '',
  `cnum` varchar(80) NOT NULL DEFAULT '',
  `cnam` varchar(80) NOT NULL DEFAULT '',
  `outbound_cnum` varchar(80) NOT NULL DEFAULT '',
  `outbound_cnam` varchar(80) NOT NULL DEFAULT '',
  `dst_cnam` varchar(80) NOT NULL DEFAULT '',
  `linkedid` varchar(32) NOT NULL DEFAULT '',
  `peeraccount` varchar(80) NOT NULL DEFAULT '',
  `sequence` int(11) NOT NULL DEFAULT 0,
  KEY `calldate` (`calldate`),
  KEY `dst` (`dst`),
  KEY `accountcode` (`accountcode`),
  KEY `uniqueid` (`uniqueid`),
  KEY `did` (`did`),
  KEY `recordingfile` (`recordingfile`(191))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
"""


class Db:
    """A throwaway database with the cdr table and a SELECT-only account."""

    def __init__(self, root: pymysql.connections.Connection[Any]) -> None:
        self.root = root
        self.name = f"cdrtest_{secrets.token_hex(4)}"
        self.user = f"cdr_ro_{secrets.token_hex(3)}"
        self.password = f"pw-{secrets.token_hex(8)}"
        with root.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{self.name}`")
            cur.execute(f"USE `{self.name}`")
            cur.execute(FREEPBX_CDR)
            cur.execute(f"CREATE USER '{self.user}'@'127.0.0.1' IDENTIFIED BY %s", (self.password,))
            cur.execute(f"GRANT SELECT ON `{self.name}`.* TO '{self.user}'@'127.0.0.1'")
        self.seq = 1

    @property
    def dsn(self) -> str:
        """The connection string the agent is configured with."""
        return f"mysql://{self.user}:{self.password}@127.0.0.1:3306/{self.name}"

    def insert(self, calls: list[Call]) -> None:
        """Insert rows as Asterisk's cdr_adaptive_odbc would for FreePBX."""
        rows = []
        for c in calls:
            v = fields(c, self.seq)
            self.seq += 2
            rows.append(
                (
                    fmt_time(c.start),
                    v[4],
                    v[1],
                    v[2],
                    v[3],
                    v[5],
                    v[6],
                    v[7],
                    v[8],
                    c.duration,
                    c.billsec,
                    c.disposition,
                    3,
                    c.account,
                    c.uniqueid,
                    c.userfield,
                    "",
                    "",
                    c.ext,
                    c.name,
                    "",
                    "",
                    "",
                    c.uniqueid,
                    "",
                    self.seq,
                )
            )
        with self.root.cursor() as cur:
            cur.executemany(
                f"INSERT INTO `{self.name}`.cdr (calldate, clid, src, dst, dcontext, channel, "
                "dstchannel, lastapp, lastdata, duration, billsec, disposition, amaflags, "
                "accountcode, uniqueid, userfield, did, recordingfile, cnum, cnam, "
                "outbound_cnum, outbound_cnam, dst_cnam, linkedid, peeraccount, sequence) "
                "VALUES (" + ",".join(["%s"] * 26) + ")",
                rows,
            )

    def drop(self) -> None:
        """Remove the database and the account."""
        with self.root.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{self.name}`")
            cur.execute(f"DROP USER IF EXISTS '{self.user}'@'127.0.0.1'")


@pytest.fixture
def db() -> Iterator[Db]:
    """A fresh FreePBX-like CDR database on the local MariaDB (skipped when none answers)."""
    try:
        root = pymysql.connect(
            host="127.0.0.1",
            port=3306,
            user="root",
            password="",
            autocommit=True,
            connect_timeout=3,
        )
    except pymysql.MySQLError as exc:
        pytest.skip(f"no MariaDB answers on 127.0.0.1:3306 as root without password: {exc}")
    d = Db(root)
    try:
        yield d
    finally:
        d.drop()
        root.close()


def make(db: Db, state: Path, **kw: Any) -> CallstatsCollector:
    c = CallstatsCollector(CallstatsSettings(mariadb=db.dsn, csv=None, **kw), state)
    OPEN.append(c)
    return c


def collect(c: CallstatsCollector) -> list[dict[str, Any]]:
    bodies: list[dict[str, Any]] = []

    def emit(r: Record) -> bool:
        bodies.append(dict(r.body))
        return True

    asyncio.run(c.collect(emit, reason="schedule"))
    return bodies


def test_counts_equal_recount_incrementally(db: Db, tmp_path: Path) -> None:
    """Rows read in several polls, with late inserts for earlier start times, count once each."""
    calls = make_calls(900, start=T0, span=4 * 3600, seed=21)
    db.insert(calls[:400])
    c = make(db, tmp_path / "state")
    collect(c)
    db.insert(calls[400:800])
    collect(c)
    collect(c)  # nothing new: re-reading the look-back window adds nothing
    db.insert(calls[800:])
    collect(c)
    assert stored_counters(tmp_path / "state" / STATE_FILE) == recount(calls, BUCKET)
    assert c.status()["rows_read"] == 900


def test_restart_reads_each_row_once(db: Db, tmp_path: Path) -> None:
    """A new collector on the same state (a restart) neither recounts nor skips rows."""
    calls = make_calls(500, start=T0, span=3 * 3600, seed=22)
    db.insert(calls[:250])
    c = make(db, tmp_path / "state")
    collect(c)
    asyncio.run(c.aclose())
    OPEN.remove(c)
    db.insert(calls[250:])
    c2 = make(db, tmp_path / "state")
    collect(c2)
    assert stored_counters(tmp_path / "state" / STATE_FILE) == recount(calls, BUCKET)


def test_negative_duration_rows_are_counted_as_skipped(db: Db, tmp_path: Path) -> None:
    """A row with a negative duration is skipped and counted, the others are read."""
    calls = make_calls(30, start=T0, span=3600, seed=23)
    db.insert(calls)
    with db.root.cursor() as cur:
        cur.execute(
            f"INSERT INTO `{db.name}`.cdr (calldate, duration, billsec, disposition, "
            "uniqueid) VALUES (%s, -4, 0, 'FAILED', 'neg.1')",
            (fmt_time(T0 + 5),),
        )
    c = make(db, tmp_path / "state")
    collect(c)
    assert c.status()["rows_skipped"] == {"negative_duration": 1}
    assert stored_counters(tmp_path / "state" / STATE_FILE) == recount(calls, BUCKET)


def test_wrong_password_is_reported_without_the_password(db: Db, tmp_path: Path) -> None:
    """Wrong password: an actionable error without the password, in status and logs."""
    real = db.password
    db.password = "wrong-" + real
    settings = CallstatsSettings(mariadb=db.dsn, csv=None)
    c = make(db, tmp_path / "state")
    with capture_logs() as logs, pytest.raises(CollectorError, match="Access denied") as err:
        collect(c)
    db.password = real
    for text in (str(err.value), repr(c.status()), repr(logs), repr(settings)):
        assert real not in text and "wrong-" not in text
    assert "***" in c.status()["source"]
