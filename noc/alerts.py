"""``noc alerts``: the alert rules, their webhook, and the periodic prune.

Every ``alerts.interval`` the rules are evaluated over the devices table. An
alert *opens* once (one open row per device and rule, a unique index makes
that a fact of the database, not of this loop) and *resolves* once: only
after its condition has stayed clear for ``resolve_after``, and for threshold
rules only below the threshold minus ``hysteresis_pct``; a value that wobbles
around a threshold makes one alert, not a storm. Each opening and resolution
is POSTed to the webhook as JSON; a delivery that fails is retried at the next
evaluation (``alerts.notified`` records what the webhook was told).

| rule | condition | severity |
|---|---|---|
| offline | no heartbeat for ``offline_after`` × ``heartbeat`` (or offline that long) | critical |
| severed | the customer turned the uplink off | info (never an error) |
| disk | fullest disk ≥ ``disk_pct`` | warning |
| memory | memory ≥ ``memory_pct`` | warning |
| asterisk | Asterisk not running (health) | critical |
| asterisk_restarted | Asterisk's start time changed within ``restart_window`` | info |
| trunk_down | a trunk down in two health records running (resolves when none is) | warning |
| seq_gap | envelopes missing for longer than ``gap_grace`` (within the last day) | warning |
| cert | certificate expires in under ``cert_days`` days | warning |
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from psycopg_pool import ConnectionPool

from noc import db, retention
from noc.config import AlertSettings, NocConfig

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Rule:
    """One rule: SQL for "condition holds", SQL for "condition is clear", a severity."""

    name: str
    severity: str
    holds: str  # a boolean SQL expression over devices d (and the settings' parameters)
    clear: str  # the stricter "clear" condition (hysteresis); holds and clear never overlap
    detail: str  # a SQL text expression describing the alert


_OFFLINE_FOR = "now() - make_interval(secs => %(offline)s)"
RULES = (
    Rule(
        "offline", "critical",
        f"(d.status = 'offline' AND d.status_at < {_OFFLINE_FOR}) OR (d.status = 'online'"
        f" AND d.last_seen < {_OFFLINE_FOR})",
        f"NOT ((d.status = 'offline' AND d.status_at < {_OFFLINE_FOR}) OR (d.status = 'online'"
        f" AND d.last_seen < {_OFFLINE_FOR})) AND d.status <> 'offline'",
        "'offline since ' || to_char(coalesce(CASE WHEN d.status = 'offline' THEN d.status_at"
        " END, d.last_seen), 'YYYY-MM-DD HH24:MI UTC')",
    ),
    Rule(
        "severed", "info", "d.status = 'severed'", "d.status <> 'severed'",
        "'uplink turned off by the customer (informational)'",
    ),
    Rule(
        "disk", "warning", "d.disk_pct >= %(disk)s",
        "coalesce(d.disk_pct, 0) < %(disk)s - %(hyst)s",
        "'disk ' || round(d.disk_pct::numeric) || '%% full'",
    ),
    Rule(
        "memory", "warning", "d.mem_pct >= %(mem)s", "coalesce(d.mem_pct, 0) < %(mem)s - %(hyst)s",
        "'memory ' || round(d.mem_pct::numeric) || '%% used'",
    ),
    Rule(
        "asterisk", "critical", "d.asterisk_up = false AND d.status = 'online'",
        "d.asterisk_up IS DISTINCT FROM false OR d.status <> 'online'", "'Asterisk is not running'",
    ),
    Rule(
        "asterisk_restarted", "info",
        "d.asterisk_restarted_at > now() - make_interval(secs => %(restart)s)",
        "d.asterisk_restarted_at IS NULL"
        " OR d.asterisk_restarted_at <= now() - make_interval(secs => %(restart)s)",
        "'Asterisk restarted at ' || to_char(d.asterisk_restarted_at AT TIME ZONE 'UTC',"
        " 'YYYY-MM-DD HH24:MI UTC')",
    ),
    Rule(
        "trunk_down", "warning", "d.trunks_down_streak >= 2", "d.trunks_down_streak = 0",
        "'trunk down: ' || array_to_string(d.trunks_down, ', ')",
    ),
    Rule(
        "seq_gap", "warning",
        "EXISTS (SELECT 1 FROM seq_gaps g WHERE g.device_id = d.device_id"
        " AND g.opened_at < now() - make_interval(secs => %(grace)s)"
        " AND g.opened_at > now() - interval '1 day')",
        "NOT EXISTS (SELECT 1 FROM seq_gaps g WHERE g.device_id = d.device_id"
        " AND g.opened_at < now() - make_interval(secs => %(grace)s)"
        " AND g.opened_at > now() - interval '1 day')",
        "d.missing || ' envelope(s) never received'",
    ),
    Rule(
        "cert", "warning", "d.cert_not_after < now() + make_interval(secs => %(cert)s)",
        "d.cert_not_after IS NULL OR d.cert_not_after >= now() + make_interval(secs => %(cert)s)",
        "'certificate expires ' || to_char(d.cert_not_after, 'YYYY-MM-DD')",
    ),
)  # fmt: skip


def _params(a: AlertSettings) -> dict[str, Any]:
    return {
        "offline": a.offline_after * a.heartbeat,
        "disk": a.disk_pct,
        "mem": a.memory_pct,
        "hyst": a.hysteresis_pct,
        "grace": a.gap_grace,
        "cert": a.cert_days * 86400,
        "restart": a.restart_window,
        "resolve_after": a.resolve_after,
    }


def evaluate(conn: psycopg.Connection[Any], settings: AlertSettings) -> dict[str, int]:
    """One pass over every rule; returns how many alerts opened and resolved."""
    p = _params(settings)
    opened = resolved = 0
    with conn.transaction():
        for r in RULES:
            # S608: the rule's SQL comes from RULES above; values are bound parameters.
            cur = conn.execute(
                "INSERT INTO alerts (device_id, rule, severity, detail)"  # noqa: S608
                f" SELECT d.device_id, %(rule)s, %(sev)s, {r.detail} FROM devices d"
                f" WHERE ({r.holds}) ON CONFLICT (device_id, rule) WHERE resolved_at IS NULL"
                " DO UPDATE SET clear_since = NULL WHERE alerts.clear_since IS NOT NULL",
                {**p, "rule": r.name, "sev": r.severity},
            )
            del cur
            conn.execute(
                "UPDATE alerts a SET clear_since = now() FROM devices d"  # noqa: S608
                " WHERE a.device_id = d.device_id AND a.rule = %(rule)s AND a.resolved_at IS NULL"
                f" AND a.clear_since IS NULL AND ({r.clear})",
                {**p, "rule": r.name},
            )
            cur = conn.execute(
                "UPDATE alerts SET resolved_at = now() WHERE rule = %(rule)s"
                " AND resolved_at IS NULL AND clear_since IS NOT NULL"
                " AND clear_since <= now() - make_interval(secs => %(resolve_after)s)",
                {**p, "rule": r.name},
            )
            resolved += cur.rowcount
        row = conn.execute(
            "SELECT count(*) FROM alerts WHERE notified = '' AND resolved_at IS NULL"
        ).fetchone()
        opened = int(row[0]) if row else 0
    return {"pending_open": opened, "resolved": resolved}


def pending(conn: psycopg.Connection[Any]) -> list[tuple[str, dict[str, Any]]]:
    """Notifications not yet delivered: ('opened'|'resolved', alert)."""
    out: list[tuple[str, dict[str, Any]]] = []
    rows = conn.execute(
        "SELECT id, device_id, rule, severity, detail, opened_at, resolved_at, notified"
        " FROM alerts WHERE notified NOT LIKE '%%open%%'"
        " OR (resolved_at IS NOT NULL AND notified NOT LIKE '%%resolve%%') ORDER BY id"
    ).fetchall()
    for aid, dev, rule, sev, detail, opened, resolved, notified in rows:
        alert = {
            "id": aid, "device": dev, "rule": rule, "severity": sev, "detail": detail,
            "opened_at": opened.isoformat(),
            "resolved_at": resolved.isoformat() if resolved else None,
        }  # fmt: skip
        if "open" not in notified:
            out.append(("opened", alert))
        if resolved is not None and "resolve" not in notified:
            out.append(("resolved", alert))
    return out


def deliver(conn: psycopg.Connection[Any], settings: AlertSettings) -> int:
    """POST what the webhook has not been told yet; returns how many were delivered."""
    delivered = 0
    for event, alert in pending(conn):
        if settings.webhook:
            body = json.dumps({"event": event, "alert": alert}).encode()
            req = urllib.request.Request(  # noqa: S310 -- the URL is the operator's setting
                settings.webhook, data=body, method="POST",
                headers={"Content-Type": "application/json", "User-Agent": "pbx-noc-alerts"},
            )  # fmt: skip
            try:
                with urllib.request.urlopen(req, timeout=settings.webhook_timeout) as resp:  # noqa: S310
                    if resp.status >= 300:
                        raise OSError(f"HTTP {resp.status}")
            except OSError as exc:
                log.warning(
                    "webhook_failed", url=settings.webhook, error=str(exc), alert=alert["id"]
                )
                return delivered  # keep the order: try again at the next evaluation
        mark = "open" if event == "opened" else "resolve"
        conn.execute(
            "UPDATE alerts SET notified = CASE WHEN notified = '' THEN %s"
            " ELSE notified || ',' || %s END WHERE id = %s",
            (mark, mark, alert["id"]),
        )
        conn.commit()
        delivered += 1
        log.info("alert_" + event, **{k: v for k, v in alert.items() if k != "id"})
    return delivered


def run_once(pool: ConnectionPool, config: NocConfig) -> None:
    """Evaluate, then deliver."""
    with pool.connection() as conn:
        evaluate(conn, config.alerts)
        deliver(conn, config.alerts)


def serve(config: NocConfig) -> int:
    """Evaluate every interval and prune every retention.every, until SIGTERM/SIGINT."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    pool = db.pool(config.database, max_size=2, name="noc-alerts")
    next_prune = 0.0
    log.info("alerts_started", interval=config.alerts.interval, webhook=bool(config.alerts.webhook))
    try:
        while not stop.is_set():
            try:
                run_once(pool, config)
                if time.monotonic() >= next_prune:
                    with pool.connection() as conn:
                        counts = retention.prune(conn, config.retention)
                    log.info("pruned", **counts)
                    next_prune = time.monotonic() + config.retention.every
            except psycopg.OperationalError as exc:
                log.error("alerts_store_unavailable", error=str(exc))
            stop.wait(config.alerts.interval)
    finally:
        pool.close()
    return 0
