"""Alert rules against a real PostgreSQL, delivered to a real local HTTP receiver (the webhook).

The device states are made by the ingest code (noc.store) from the messages a
box would send; only times in the past (a box offline for an hour) are set
directly, since a test cannot wait an hour.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest

from noc import alerts
from noc.config import AlertSettings
from tests.support.agents import health_body
from tests.support.nocseed import set_status
from tests.test_noc_store import envelope, put


class Receiver:
    """A webhook endpoint on a free loopback port that records every POST."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.fail = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.fail:
                    self.send_response(500)
                else:
                    outer.events.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def seen(self) -> list[tuple[str, str, str]]:
        """(event, device, rule) of every delivery so far."""
        return [(e["event"], e["alert"]["device"], e["alert"]["rule"]) for e in self.events]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def health(conn: psycopg.Connection[Any], dev: str, seq: int, **figures: Any) -> None:
    """A health envelope with chosen disk %, memory % and Asterisk state."""
    import random

    body = health_body(random.Random(seq), {"queued": 0, "dropped": 0})
    body["disks"][0]["percent"] = figures.get("disk", 40.0)
    body["memory"]["percent"] = figures.get("mem", 40.0)
    body["pbx"]["asterisk"]["running"] = figures.get("asterisk", True)
    put(conn, "health", envelope("health", seq, body), dev=dev)


def settings(receiver: Receiver, **kw: Any) -> AlertSettings:
    return AlertSettings(webhook=receiver.url, heartbeat=60.0, offline_after=3.0, **kw)


def run(conn: psycopg.Connection[Any], s: AlertSettings) -> None:
    alerts.evaluate(conn, s)
    alerts.deliver(conn, s)


def test_each_rule_opens_once_and_reaches_the_webhook(noc_dsn: str, receiver: Receiver) -> None:
    """Offline, severed (info), disk, memory, Asterisk, sequence gap and certificate rules each
    open one alert, delivered once; a second evaluation adds nothing."""
    with psycopg.connect(noc_dsn) as conn:
        for dev in ("box-ok", "box-off", "box-sev", "box-disk", "box-mem", "box-ast", "box-gap"):
            set_status(conn, dev, "online")
        health(conn, "box-ok", 1)
        health(conn, "box-disk", 1, disk=95.0)
        health(conn, "box-mem", 1, mem=97.0)
        health(conn, "box-ast", 1, asterisk=False)
        health(conn, "box-gap", 1)
        health(conn, "box-gap", 5)  # 2..4 never arrive
        set_status(conn, "box-sev", "severed")
        set_status(conn, "box-off", "offline")
        with conn.transaction():
            conn.execute(
                "UPDATE devices SET status_at = now() - interval '1 hour'"
                " WHERE device_id = 'box-off'"
            )
            conn.execute("UPDATE seq_gaps SET opened_at = now() - interval '10 minutes'")
            conn.execute(
                "UPDATE devices SET cert_not_after = now() + interval '5 days'"
                " WHERE device_id = 'box-ok'"
            )
        s = settings(receiver)
        run(conn, s)
        run(conn, s)
        severities: dict[str, str] = dict(
            conn.execute("SELECT rule, severity FROM alerts").fetchall()
        )
    assert sorted(receiver.seen()) == sorted(
        [
            ("opened", "box-off", "offline"),
            ("opened", "box-sev", "severed"),
            ("opened", "box-disk", "disk"),
            ("opened", "box-mem", "memory"),
            ("opened", "box-ast", "asterisk"),
            ("opened", "box-gap", "seq_gap"),
            ("opened", "box-ok", "cert"),
        ]
    )
    assert severities["severed"] == "info"  # the customer's choice is never an error
    assert severities["offline"] == "critical"


def test_hysteresis_no_flapping_storm(noc_dsn: str, receiver: Receiver) -> None:
    """Disk wobbling around 90% makes one alert: 88% is not clear (hysteresis), a dip to 80%
    must last resolve_after before it resolves, and the resolution is delivered once."""
    with psycopg.connect(noc_dsn) as conn:
        set_status(conn, "box-disk", "online")
        seq = 0

        def disk(pct: float, s: AlertSettings) -> None:
            nonlocal seq
            seq += 1
            health(conn, "box-disk", seq, disk=pct)
            run(conn, s)

        patient = settings(receiver, resolve_after=600.0)
        for pct in (95.0, 88.0, 93.0, 80.0, 96.0, 81.0, 95.0, 88.0):
            disk(pct, patient)
        assert receiver.seen() == [("opened", "box-disk", "disk")]
        eager = settings(receiver, resolve_after=0.0)
        disk(88.0, eager)  # within the hysteresis band: still open
        assert receiver.seen() == [("opened", "box-disk", "disk")]
        disk(80.0, eager)
        disk(80.0, eager)
        assert receiver.seen() == [("opened", "box-disk", "disk"), ("resolved", "box-disk", "disk")]
        rows = conn.execute("SELECT count(*) FROM alerts WHERE rule = 'disk'").fetchone()
    assert rows == (1,)


def test_webhook_failure_is_retried(noc_dsn: str, receiver: Receiver) -> None:
    """A webhook that answers 500 is told again at the next evaluation, once it answers."""
    with psycopg.connect(noc_dsn) as conn:
        set_status(conn, "box-ast", "online")
        health(conn, "box-ast", 1, asterisk=False)
        receiver.fail = True
        run(conn, settings(receiver))
        assert receiver.seen() == []
        receiver.fail = False
        run(conn, settings(receiver))
    assert receiver.seen() == [("opened", "box-ast", "asterisk")]


def pbx_health(
    conn: psycopg.Connection[Any], dev: str, seq: int, *, started: int, down: tuple[str, ...] = ()
) -> None:
    """A health envelope with Asterisk's start time and trunks, some down."""
    import random

    body = health_body(random.Random(seq), {"queued": 0, "dropped": 0})
    body["pbx"]["asterisk"]["started_at"] = started
    body["pbx"]["trunks"] = {
        name: {"state": "down" if name in down else "up", "channels": 0}
        for name in ("carrier-a", "carrier-b", "other")
    }
    put(conn, "health", envelope("health", seq, body), dev=dev)


def test_trunk_down_needs_two_records_and_names_the_trunks(
    noc_dsn: str, receiver: Receiver
) -> None:
    """One record with a trunk down is a blip; two running open one alert naming it; a record
    with none down clears it (resolved after resolve_after)."""
    s = settings(receiver, resolve_after=0.0)
    with psycopg.connect(noc_dsn) as conn:
        set_status(conn, "box-trunk", "online")
        pbx_health(conn, "box-trunk", 1, started=1000, down=("carrier-b",))
        pbx_health(conn, "box-trunk", 2, started=1000)
        run(conn, s)
        assert receiver.seen() == []  # down, then up: no alert
        pbx_health(conn, "box-trunk", 3, started=1000, down=("carrier-b",))
        run(conn, s)
        assert receiver.seen() == []
        pbx_health(conn, "box-trunk", 4, started=1000, down=("carrier-b", "carrier-a"))
        run(conn, s)
        assert receiver.seen() == [("opened", "box-trunk", "trunk_down")]
        assert receiver.events[0]["alert"]["detail"] == "trunk down: carrier-a, carrier-b"
        assert receiver.events[0]["alert"]["severity"] == "warning"
        pbx_health(conn, "box-trunk", 5, started=1000)
        run(conn, s)
        run(conn, s)
    assert receiver.seen() == [
        ("opened", "box-trunk", "trunk_down"),
        ("resolved", "box-trunk", "trunk_down"),
    ]


def test_records_out_of_order_count_in_sequence_order(noc_dsn: str, receiver: Receiver) -> None:
    """A delayed older record (a backlog after an outage) does not rewrite the newest state."""
    with psycopg.connect(noc_dsn) as conn:
        set_status(conn, "box-late", "online")
        pbx_health(conn, "box-late", 2, started=1000)
        pbx_health(conn, "box-late", 1, started=1000, down=("carrier-a",))  # older, late
        row = conn.execute(
            "SELECT trunks_down, trunks_down_streak FROM devices WHERE device_id = 'box-late'"
        ).fetchone()
    assert row == ([], 0)


def test_asterisk_restart_is_an_informational_alert(noc_dsn: str, receiver: Receiver) -> None:
    """A changed start time opens one info alert; the same start time again opens nothing;
    the first record ever seen is not a restart."""
    import time

    booted = int(time.time()) - 3000
    with psycopg.connect(noc_dsn) as conn:
        set_status(conn, "box-rst", "online")
        pbx_health(conn, "box-rst", 1, started=booted)
        pbx_health(conn, "box-rst", 2, started=booted + 1)  # rounding, not a restart
        run(conn, settings(receiver))
        assert receiver.seen() == []
        pbx_health(conn, "box-rst", 3, started=booted + 2400)
        pbx_health(conn, "box-rst", 4, started=booted + 2400)
        run(conn, settings(receiver))
        run(conn, settings(receiver))
        assert receiver.seen() == [("opened", "box-rst", "asterisk_restarted")]
        assert receiver.events[0]["alert"]["severity"] == "info"
        assert receiver.events[0]["alert"]["detail"].startswith("Asterisk restarted at ")
        # Past its window it resolves by itself.
        run(conn, settings(receiver, restart_window=0.0, resolve_after=0.0))
        run(conn, settings(receiver, restart_window=0.0, resolve_after=0.0))
    assert receiver.seen()[-1] == ("resolved", "box-rst", "asterisk_restarted")


@pytest.mark.parametrize("started", [2**70, -5, "1790000000", 1.5, None, True])
def test_hostile_start_times_are_ignored(noc_dsn: str, started: Any) -> None:
    """A start time that is not a plausible epoch is ignored, and the envelope still lands."""
    with psycopg.connect(noc_dsn) as conn:
        set_status(conn, "box-odd", "online")
        pbx_health(conn, "box-odd", 1, started=1_790_000_000)
        import random

        body = health_body(random.Random(2), {"queued": 0, "dropped": 0})
        body["pbx"]["asterisk"]["started_at"] = started
        body["pbx"]["trunks"] = {"x" * 500: {"state": "down"}, "y": "not a dict"}
        put(conn, "health", envelope("health", 2, body), dev="box-odd")
        row = conn.execute(
            "SELECT asterisk_started_at, asterisk_restarted_at, trunks_down FROM devices"
            " WHERE device_id = 'box-odd'"
        ).fetchone()
    assert row == (1_790_000_000, None, ["x" * 64])
