"""History for the NOC's dashboard tests and the demo, stored through the ingest code.

Why it exists: a dashboard is judged on a day or a month of data, and neither a
test nor ``make demo`` can wait that long. The envelopes made here have the
shapes the agent sends (health as ``agent/collectors/health.py``, buckets as
``callstats/1``), with times in the past, and they go through
``noc.store.handle_batch`` exactly as a worker would store them.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
from typing import Any

import psycopg

from agent.policy.gate import new_id
from noc import accounts, store
from tests.support.agents import health_body

PASSWORD = "correct horse battery"  # every seeded account's password (tests and demo only)


def seed_accounts(conn: psycopg.Connection[Any]) -> None:
    """Two customer organizations, a NOC staff user and one customer user in each."""
    accounts.add_org(conn, "acme", "Acme Dental Group")
    accounts.add_org(conn, "globex", "Globex Logistics")
    accounts.add_user(conn, "noc-admin", PASSWORD, role=accounts.Role.STAFF, org=None)
    accounts.add_user(conn, "alice", PASSWORD, role=accounts.Role.CUSTOMER, org="acme")
    accounts.add_user(conn, "bob", PASSWORD, role=accounts.Role.CUSTOMER, org="globex")


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def history(
    device: str,
    *,
    now: dt.datetime | None = None,
    hours: int = 24,
    days: int = 30,
    seed: int = 1,
    size: float = 1.0,
) -> list[tuple[str, bytes, bool]]:
    """Health every 5 minutes for ``hours`` and hourly call buckets for ``days``, as messages."""
    rng = random.Random(f"{device}-{seed}")
    now = now or dt.datetime.now(dt.UTC)
    out: list[tuple[str, bytes, bool]] = []
    seq = 0

    def env(data_class: str, ts: dt.datetime, body: dict[str, Any]) -> None:
        nonlocal seq
        seq += 1
        payload = {"v": 1, "id": new_id(ts.timestamp()), "ts": _iso(ts), "class": data_class,
                   "seq": seq, "body": body}  # fmt: skip
        out.append((f"pbx/{device}/up/{data_class}", json.dumps(payload).encode(), False))

    start = (now - dt.timedelta(days=days)).replace(minute=0, second=0, microsecond=0)
    t = start
    while t < now - dt.timedelta(hours=1):
        local = (t.hour + 1) % 24  # a business day in CET, roughly
        weekday = t.weekday() < 5
        busy = max(0.0, math.sin(math.pi * (local - 7) / 12)) if 7 <= local <= 19 else 0.0
        calls = int(rng.gauss(40 * size * busy * (1.0 if weekday else 0.25), 3)) if busy else 0
        if calls >= 3:
            answered = int(calls * rng.uniform(0.72, 0.92))
            billsec = int(answered * rng.uniform(110, 210))
            trunk_a = int(calls * 0.6)
            body = {
                "schema": "callstats/1", "bucket_start": t.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "bucket_seconds": 3600, "revision": 0, "min_count": 3, "folded": False,
                "calls": calls, "answered": answered, "duration_sum": billsec + 20 * calls,
                "billsec_sum": billsec, "asr": round(answered / calls, 4),
                "acd": round(billsec / answered, 1) if answered else None,
                "peak_concurrent": max(1, int(calls / 6 + rng.uniform(0, 3))),
                "by_direction": {"inbound": calls - calls // 3, "outbound": calls // 3},
                "by_disposition": {"ANSWERED": answered, "other": calls - answered},
                "by_trunk": {"sip-provider-a": trunk_a, "sip-provider-b": calls - trunk_a},
                "by_hour": {str(local): calls},
            }  # fmt: skip
            env("callstats", t + dt.timedelta(hours=1, minutes=15), body)
        t += dt.timedelta(hours=1)
    t = now - dt.timedelta(hours=hours)
    disk = rng.uniform(35, 60)
    outbox = {"queued": 0, "bytes": 0, "max_bytes": 256 << 20, "dropped": 0, "delivered": seq}
    while t < now:
        hb = health_body(rng, outbox)
        hb["cpu"]["percent"] = round(8 + 6 * math.sin(t.hour / 3) + rng.uniform(0, 4), 1)
        hb["memory"]["percent"] = round(41 + rng.uniform(0, 3), 1)
        hb["disks"][0]["percent"] = round(disk + 2 * (1 - (now - t) / dt.timedelta(hours=hours)), 1)
        env("health", t, hb)
        t += dt.timedelta(minutes=5)
    return out


def store_history(conn: psycopg.Connection[Any], messages: list[tuple[str, bytes, bool]]) -> None:
    """Store messages through the ingest code, in batches as a worker would."""
    for i in range(0, len(messages), 500):
        with conn.transaction():
            results = store.handle_batch(conn, messages[i : i + 500])
        bad = [r for r in results if isinstance(r, store.Rejected)]
        assert not bad, bad[:3]


def set_status(conn: psycopg.Connection[Any], device: str, word: str) -> None:
    """Apply a retained-status message, as the broker would deliver it."""
    with conn.transaction():
        store.handle(conn, f"pbx/{device}/status", word.encode())
