"""Every query the dashboard runs. Tenant isolation lives here, in the SQL.

Each function that returns devices or their data takes the :class:`User` and
adds ``(staff OR org_id = user's org)`` to its WHERE clause: a customer's query
cannot reach another organization's row, whatever URL was typed. A device a
user may not see is indistinguishable from one that does not exist (404).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
from psycopg.rows import dict_row

from noc.accounts import User

Conn = psycopg.Connection[Any]
Row = dict[str, Any]

#: Sortable fleet columns: URL name -> SQL expression (never user input in SQL).
SORTS = {
    "device": "d.device_id",
    "org": "o.name",
    "status": "state",
    "heartbeat": "d.last_seen",
    "backlog": "d.outbox_queued",
    "drops": "d.outbox_dropped",
    "disk": "d.disk_pct",
    "load": "d.load1",
    "asterisk": "d.asterisk_up",
    "cert": "d.cert_not_after",
    "gaps": "d.missing",
    "alerts": "open_alerts",
}
STATES = ("online", "offline", "severed", "unknown")


def _rows(conn: Conn, sql: str, args: dict[str, Any]) -> list[Row]:
    with conn.cursor(row_factory=dict_row) as cur:
        return list(cur.execute(sql, args).fetchall())


def _scope(user: User) -> dict[str, Any]:
    return {"staff": user.staff, "org": user.org_id}


_STATE = (
    "CASE WHEN d.status = 'online' AND (d.last_seen IS NULL"
    " OR d.last_seen < now() - make_interval(secs => %(stale)s)) THEN 'offline'"
    " ELSE d.status END"
)


def fleet(
    conn: Conn,
    user: User,
    *,
    stale: float,
    sort: str = "device",
    descending: bool = False,
    q: str = "",
    state: str = "",
) -> list[Row]:
    """The fleet table: one row per device the user may see."""
    order = SORTS.get(sort, SORTS["device"])
    direction = "DESC NULLS LAST" if descending else "ASC NULLS LAST"
    where = ["(%(staff)s OR d.org_id = %(org)s)"]
    args: dict[str, Any] = {**_scope(user), "stale": stale}
    if q:
        where.append("(d.device_id ILIKE %(q)s OR o.name ILIKE %(q)s)")
        args["q"] = f"%{q.replace('%', '').replace('_', '')}%"
    if state in STATES:
        where.append(f"{_STATE} = %(state)s")
        args["state"] = state
    # S608: the ORDER BY column and direction come from SORTS and two literals above.
    sql = (
        f"SELECT d.device_id, o.name AS org, {_STATE} AS state, d.status, d.status_at,"  # noqa: S608
        " d.last_seen, extract(epoch FROM now() - d.last_seen) AS heartbeat_age,"
        " d.outbox_queued, d.outbox_dropped, d.disk_pct, d.load1, d.mem_pct, d.asterisk_up,"
        " d.cert_not_after, extract(day FROM d.cert_not_after - now()) AS cert_days,"
        " d.missing, d.envelopes, d.agent_version,"
        " (SELECT count(*) FROM alerts a WHERE a.device_id = d.device_id"
        "  AND a.resolved_at IS NULL) AS open_alerts"
        " FROM devices d LEFT JOIN orgs o ON o.id = d.org_id"
        f" WHERE {' AND '.join(where)} ORDER BY {order} {direction}, d.device_id"
    )
    return _rows(conn, sql, args)


def fleet_counts(rows: list[Row]) -> dict[str, int]:
    """How many devices are in each state."""
    out = dict.fromkeys(STATES, 0)
    for r in rows:
        out[r["state"]] = out.get(r["state"], 0) + 1
    return out


def device(conn: Conn, user: User, device_id: str, *, stale: float) -> Row | None:
    """One device, or None when it does not exist or the user may not see it."""
    rows = _rows(
        conn,
        f"SELECT d.*, {_STATE} AS state, o.name AS org,"  # noqa: S608 -- _STATE is a constant
        " extract(epoch FROM now() - d.last_seen) AS heartbeat_age,"
        " extract(day FROM d.cert_not_after - now()) AS cert_days"
        " FROM devices d LEFT JOIN orgs o ON o.id = d.org_id"
        " WHERE d.device_id = %(id)s AND (%(staff)s OR d.org_id = %(org)s)",
        {**_scope(user), "id": device_id, "stale": stale},
    )
    return rows[0] if rows else None


def health_series(conn: Conn, device_id: str, since: dt.datetime, step: int) -> list[Row]:
    """Health averaged per ``step`` seconds since ``since`` (call only for a visible device)."""
    return _rows(
        conn,
        "SELECT date_bin(make_interval(secs => %(step)s), ts, %(since)s) AS t,"
        " avg(cpu_pct) AS cpu, avg(load1) AS load, avg(mem_pct) AS mem, max(disk_pct) AS disk,"
        " max(outbox_queued) AS backlog"
        " FROM health WHERE device_id = %(id)s AND ts >= %(since)s GROUP BY 1 ORDER BY 1",
        {"id": device_id, "since": since, "step": step},
    )


def _call_scope(user: User, device_id: str | None) -> tuple[str, dict[str, Any]]:
    if device_id is not None:
        return "c.device_id = %(id)s AND (%(staff)s OR d.org_id = %(org)s)", {
            **_scope(user),
            "id": device_id,
        }
    return "(%(staff)s OR d.org_id = %(org)s)", _scope(user)


def calls_series(
    conn: Conn, user: User, since: dt.datetime, step: int, device_id: str | None = None
) -> list[Row]:
    """Calls per ``step`` seconds: volume, answered, ASR, ACD, peak (the user's devices only)."""
    where, args = _call_scope(user, device_id)
    return _rows(
        conn,
        "SELECT date_bin(make_interval(secs => %(step)s), c.bucket_start, %(since)s) AS t,"  # noqa: S608 -- {where} is one of two constants
        " sum(c.calls) AS calls, sum(c.answered) AS answered,"
        " sum(c.answered)::float / NULLIF(sum(c.calls), 0) AS asr,"
        " sum(c.billsec_sum)::float / NULLIF(sum(c.answered), 0) AS acd,"
        " max(c.peak_concurrent) AS peak"
        " FROM callstats c JOIN devices d ON d.device_id = c.device_id"
        f" WHERE {where} AND c.bucket_start >= %(since)s GROUP BY 1 ORDER BY 1",
        {**args, "since": since, "step": step},
    )


def calls_summary(conn: Conn, user: User, since: dt.datetime, device_id: str | None = None) -> Row:
    """Totals since ``since``: calls, answered ratio, ACD, peak concurrent calls."""
    where, args = _call_scope(user, device_id)
    rows = _rows(
        conn,
        "SELECT coalesce(sum(c.calls), 0) AS calls, coalesce(sum(c.answered), 0) AS answered,"  # noqa: S608 -- {where} is one of two constants
        " sum(c.answered)::float / NULLIF(sum(c.calls), 0) AS asr,"
        " sum(c.billsec_sum)::float / NULLIF(sum(c.answered), 0) AS acd,"
        " max(c.peak_concurrent) AS peak, max(c.received_at) AS latest"
        " FROM callstats c JOIN devices d ON d.device_id = c.device_id"
        f" WHERE {where} AND c.bucket_start >= %(since)s",
        {**args, "since": since},
    )
    return rows[0]


def trunk_usage(
    conn: Conn, user: User, since: dt.datetime, device_id: str | None = None
) -> list[Row]:
    """Calls per trunk since ``since`` (trunks are configuration names, never people)."""
    where, args = _call_scope(user, device_id)
    return _rows(
        conn,
        "SELECT t.key AS trunk, sum(t.value::int) AS calls"  # noqa: S608 -- {where} is one of two constants
        " FROM callstats c JOIN devices d ON d.device_id = c.device_id,"
        " jsonb_each_text(c.by_trunk) t"
        f" WHERE {where} AND c.bucket_start >= %(since)s"
        " GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 12",
        {**args, "since": since},
    )


def weekly(conn: Conn, user: User, weeks: int, device_id: str | None = None) -> list[Row]:
    """Per ISO week: calls, answered ratio, ACD, peak (the trend over ``weeks`` weeks)."""
    where, args = _call_scope(user, device_id)
    return _rows(
        conn,
        "SELECT date_trunc('week', c.bucket_start) AS week, sum(c.calls) AS calls,"  # noqa: S608 -- {where} is one of two constants
        " sum(c.answered) AS answered,"
        " sum(c.answered)::float / NULLIF(sum(c.calls), 0) AS asr,"
        " sum(c.billsec_sum)::float / NULLIF(sum(c.answered), 0) AS acd,"
        " max(c.peak_concurrent) AS peak"
        " FROM callstats c JOIN devices d ON d.device_id = c.device_id"
        f" WHERE {where} AND c.bucket_start >= date_trunc('week', now())"
        " - make_interval(weeks => %(weeks)s) GROUP BY 1 ORDER BY 1",
        {**args, "weeks": weeks},
    )


def snapshots(conn: Conn, device_id: str, limit: int = 20) -> list[Row]:
    """The device's configuration snapshots, newest first."""
    return _rows(
        conn,
        "SELECT snapshot_id, mode, parts, taken_at, first_part_at, complete_at,"
        " files_changed, files_removed, summary FROM snapshots WHERE device_id = %(id)s"
        " ORDER BY first_part_at DESC LIMIT %(limit)s",
        {"id": device_id, "limit": limit},
    )


def diffs(conn: Conn, device_id: str, snapshot_id: str) -> list[Row]:
    """The redacted diffs one snapshot made."""
    return _rows(
        conn,
        "SELECT path, change, diff FROM config_diffs"
        " WHERE device_id = %(id)s AND snapshot_id = %(snap)s ORDER BY path",
        {"id": device_id, "snap": snapshot_id},
    )


def commands(conn: Conn, device_id: str, limit: int = 20) -> list[Row]:
    """Commands sent to the device and their replies, newest first."""
    return _rows(
        conn,
        "SELECT id, cmd, args, sent_by, sent_at, reply_at, ok, result, error FROM commands"
        " WHERE device_id = %(id)s ORDER BY sent_at DESC LIMIT %(limit)s",
        {"id": device_id, "limit": limit},
    )


def gaps(conn: Conn, device_id: str) -> list[Row]:
    """Open sequence gaps of the device."""
    return _rows(
        conn,
        "SELECT first_seq, last_seq, opened_at FROM seq_gaps WHERE device_id = %(id)s"
        " ORDER BY first_seq DESC LIMIT 20",
        {"id": device_id},
    )


def alerts(conn: Conn, *, device_id: str | None = None, limit: int = 100) -> list[Row]:
    """Open alerts first, then the most recently resolved (staff only)."""
    return _rows(
        conn,
        "SELECT id, device_id, rule, severity, detail, opened_at, resolved_at FROM alerts"
        " WHERE (%(id)s::text IS NULL OR device_id = %(id)s)"
        " ORDER BY resolved_at IS NOT NULL, coalesce(resolved_at, opened_at) DESC"
        " LIMIT %(limit)s",
        {"id": device_id, "limit": limit},
    )


def org_devices(conn: Conn, user: User, *, stale: float) -> list[Row]:
    """A customer's boxes with their connection state (and when it last changed)."""
    return fleet(conn, user, stale=stale)
