"""Retention: rows older than their setting are deleted, in bounded batches.

``noc alerts`` runs :func:`prune` every ``retention.every``; ``noc prune``
runs it once (for a timer). Devices, users and open alerts are never pruned;
a snapshot is pruned with its diffs, never the current file contents.
"""

from __future__ import annotations

from typing import Any

import psycopg

from noc.config import RetentionSettings

#: (table, time column, setting) in the order they are pruned.
_RULES = (
    ("envelopes", "received_at", "envelopes"),
    ("health", "ts", "health"),
    ("callstats", "bucket_start", "callstats"),
    ("config_diffs", None, "snapshots"),
    ("snapshots", "first_part_at", "snapshots"),
    ("snapshot_parts", "received_at", "snapshots"),
    ("commands", "sent_at", "commands"),
    ("replies", "received_at", "commands"),
    ("status_events", "at", "alerts"),
    ("alerts", "resolved_at", "alerts"),
    ("rejects", "received_at", "envelopes"),
)
BATCH = 50_000


def prune(conn: psycopg.Connection[Any], settings: RetentionSettings) -> dict[str, int]:
    """Delete what is older than the settings; returns rows deleted per table."""
    counts: dict[str, int] = {}
    for table, column, setting in _RULES:
        age = float(getattr(settings, setting))
        total = 0
        while True:
            with conn.transaction():
                if table == "config_diffs":
                    cur = conn.execute(
                        "DELETE FROM config_diffs d USING snapshots s"
                        " WHERE s.device_id = d.device_id AND s.snapshot_id = d.snapshot_id"
                        " AND s.first_part_at < now() - make_interval(secs => %s)",
                        (age,),
                    )
                else:
                    # Table and column names come from _RULES above, never from input.
                    cur = conn.execute(
                        f"DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table}"  # noqa: S608
                        f" WHERE {column} < now() - make_interval(secs => %s) LIMIT %s)",
                        (age, BATCH),
                    )
            total += cur.rowcount
            if table == "config_diffs" or cur.rowcount < BATCH:
                break
        counts[table] = total
    with conn.transaction():
        cur = conn.execute("DELETE FROM sessions WHERE expires_at < now()")
        counts["sessions"] = cur.rowcount
        cur = conn.execute("DELETE FROM login_failures WHERE at < now() - interval '1 day'")
        counts["login_failures"] = cur.rowcount
    return counts
