"""The ``collectors.callstats`` section: where the CDRs are and how they are aggregated."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.confreader import Section

DEFAULT_CSV = Path("/var/log/asterisk/cdr-csv/Master.csv")


@dataclass(frozen=True, kw_only=True)
class CallstatsSettings:
    """How call statistics are read and bucketed."""

    enabled: bool = True
    interval: float = 30.0  # how often the source is polled for new rows
    bucket: float = 300.0
    min_count: int = 3
    csv: Path | None = DEFAULT_CSV
    mariadb: str | None = None


def parse_settings(sec: Section) -> CallstatsSettings:
    """Validate ``collectors.callstats``."""
    d = CallstatsSettings()
    enabled = sec.bool("enabled", d.enabled)
    interval = sec.duration("interval", d.interval, min=1, max=3600)
    bucket = sec.duration("bucket", d.bucket, min=60, max=86400)
    if bucket and 86400 % bucket:
        sec.problem("bucket", "must divide a day evenly (e.g. 1m, 5m, 15m, 1h)")
    min_count = sec.int("min_count", d.min_count, min=1, max=1000)
    src = sec.section("source")
    csv: Path | None = None
    mariadb: str | None = None
    if src.has("csv") and src.has("mariadb"):
        src.problem("mariadb", "give either csv or mariadb, not both")
    if src.has("mariadb"):
        mariadb = src.str("mariadb", pattern=r"mysql://.+", hint="expected mysql://user:pass@host/db")
    else:
        csv = src.path("csv", str(DEFAULT_CSV))
    src.finish()
    s = CallstatsSettings(enabled=enabled, interval=interval, bucket=bucket, min_count=min_count,
                          csv=csv, mariadb=mariadb)
    sec.finish()
    return s
