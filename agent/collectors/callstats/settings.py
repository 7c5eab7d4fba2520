"""The ``collectors.callstats`` section: where the CDRs are and how they are aggregated.

Besides the source and the bucket, the section holds the rules that decide a
call's direction and which channel names count as trunks. Defaults fit FreePBX;
a plain Asterisk box may need its own contexts::

    callstats:
      bucket: 5m
      min_count: 3
      settle: 15m            # a bucket closes this long after its end
      max_age: 7d            # older rows are skipped (and counted), not sent
      usegmtime: false       # true when cdr.conf [csv] sets usegmtime=yes
      source: { csv: /var/log/asterisk/cdr-csv/Master.csv }
      #source: { mariadb: "mysql://agent:PASS@127.0.0.1:3306/asteriskcdrdb", table: cdr }
      directions:            # first match wins; regexes match from the start
        - { direction: inbound, context: "from-(trunk|pstn|did-direct)|ext-did" }
        - { direction: outbound, context: "from-internal|outbound-allroutes|outrt-|macro-dialout",
            dstchannel: "(PJSIP|SIP|IAX2)/[^/]*[A-Za-z]" }
      default_direction: internal
      trunks: []             # explicit trunk names; empty: derive from channels
      trunk_pattern: "(?=.*[A-Za-z])[A-Za-z0-9_.-]+"

A channel name that holds no letter (``PJSIP/1001``, ``SIP/+15551234567``,
``SIP/192.0.2.7``) is an extension, a number or an address, never a trunk. On a
box whose extensions have names rather than numbers, list the trunks in
``trunks``: only those names can then appear in what is sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from agent.confreader import Section

DEFAULT_CSV = Path("/var/log/asterisk/cdr-csv/Master.csv")
DEFAULT_TABLE = "cdr"
DIRECTIONS = ("inbound", "outbound", "internal")


@dataclass(frozen=True, kw_only=True, slots=True)
class DirectionRule:
    """One rule: when every given regex matches (from the start), the call has ``direction``.

    ``context`` is tried on the CDR's destination context (``dcontext``),
    ``channel`` on the calling channel and ``dstchannel`` on the called one, each
    without its unique suffix (``PJSIP/provider-0000001a`` is seen as
    ``PJSIP/provider``), so that rules and their cache see configuration only.
    """

    direction: str
    context: str | None = None
    channel: str | None = None
    dstchannel: str | None = None


#: FreePBX: calls from providers land in from-trunk/from-pstn (or from-trunk-<tech>-<name>,
#: ext-did after routing); calls from extensions run in from-internal and leave over a
#: channel whose name is not an extension number.
DEFAULT_DIRECTION_RULES: tuple[DirectionRule, ...] = (
    DirectionRule(direction="inbound", context=r"from-(trunk|pstn|did-direct)|ext-did"),
    DirectionRule(
        direction="outbound",
        context=r"from-internal|outbound-allroutes|outrt-|macro-dialout",
        dstchannel=r"(PJSIP|SIP|IAX2)/[^/]*[A-Za-z]",
    ),
)
DEFAULT_TRUNK_PATTERN = r"(?=.*[A-Za-z])[A-Za-z0-9_.-]+"


@dataclass(frozen=True, kw_only=True)
class CallstatsSettings:
    """How call statistics are read and bucketed."""

    enabled: bool = True
    interval: float = 30.0  # how often the source is polled for new rows
    bucket: float = 300.0
    min_count: int = 3
    csv: Path | None = DEFAULT_CSV
    mariadb: str | None = None
    table: str = DEFAULT_TABLE
    settle: float = 900.0
    max_age: float = 7 * 86400.0
    lookback: float = 4 * 3600.0  # MariaDB: rows are inserted at call end, keyed by start
    usegmtime: bool = False
    directions: tuple[DirectionRule, ...] = field(default=DEFAULT_DIRECTION_RULES)
    default_direction: str = "internal"
    trunks: tuple[str, ...] = ()
    trunk_pattern: str = DEFAULT_TRUNK_PATTERN

    def __repr__(self) -> str:
        # The connection string holds the read-only account's password: never print it.
        return (
            f"CallstatsSettings(source={self.source_label()!r}, bucket={self.bucket:g}, "
            f"min_count={self.min_count})"
        )

    def source_label(self) -> str:
        """The source as it may be shown in status and logs (no password)."""
        if self.mariadb is not None:
            return redact_dsn(self.mariadb)
        return str(self.csv)


def redact_dsn(dsn: str) -> str:
    """``mysql://user:secret@host/db`` → ``mysql://user:***@host/db``."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{user}:***@{host}{port}{parts.path}"


def _regex(sec: Section, key: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        sec.problem(key, f"expected a regular expression, got {value!r}")
        return None
    try:
        re.compile(value)
    except re.error as exc:
        sec.problem(key, f"invalid regular expression {value!r}: {exc}")
        return None
    return value


def _rules(sec: Section) -> tuple[DirectionRule, ...]:
    raw = sec.raw("directions")
    if raw is None:
        return DEFAULT_DIRECTION_RULES
    if not isinstance(raw, list):
        sec.problem(
            "directions",
            "expected a list of rules such as {direction: inbound, context: 'from-trunk'}",
        )
        return DEFAULT_DIRECTION_RULES
    rules: list[DirectionRule] = []
    for i, item in enumerate(raw):
        key = f"directions[{i}]"
        if not isinstance(item, dict):
            sec.problem(key, "expected a mapping with direction and context/channel/dstchannel")
            continue
        unknown = set(item) - {"direction", "context", "channel", "dstchannel"}
        if unknown:
            sec.problem(
                key,
                f"unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                "(known: direction, context, channel, dstchannel)",
            )
        direction = item.get("direction")
        if direction not in DIRECTIONS:
            sec.problem(key, f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
            continue
        rules.append(
            DirectionRule(
                direction=str(direction),
                context=_regex(sec, f"{key}.context", item.get("context")),
                channel=_regex(sec, f"{key}.channel", item.get("channel")),
                dstchannel=_regex(sec, f"{key}.dstchannel", item.get("dstchannel")),
            )
        )
    return tuple(rules)


def parse_settings(sec: Section) -> CallstatsSettings:
    """Validate ``collectors.callstats``."""
    d = CallstatsSettings()
    enabled = sec.bool("enabled", d.enabled)
    interval = sec.duration("interval", d.interval, min=1, max=3600)
    bucket = sec.duration("bucket", d.bucket, min=60, max=86400)
    if bucket and 86400 % bucket:
        sec.problem("bucket", "must divide a day evenly (e.g. 1m, 5m, 15m, 1h)")
    min_count = sec.int("min_count", d.min_count, min=1, max=1000)
    settle = sec.duration("settle", d.settle, min=0, max=86400)
    max_age = sec.duration("max_age", d.max_age, min=3600, max=3650 * 86400)
    lookback = sec.duration("lookback", d.lookback, min=60, max=7 * 86400)
    usegmtime = sec.bool("usegmtime", d.usegmtime)
    directions = _rules(sec)
    default_direction = sec.choice("default_direction", DIRECTIONS, d.default_direction)
    trunks = sec.str_list("trunks", [])
    trunk_pattern = sec.str("trunk_pattern", d.trunk_pattern)
    if isinstance(trunk_pattern, str):
        trunk_pattern = _regex(sec, "trunk_pattern", trunk_pattern) or d.trunk_pattern
    src = sec.section("source")
    csv: Path | None = None
    mariadb: str | None = None
    table = src.str(
        "table",
        DEFAULT_TABLE,
        pattern=r"[A-Za-z_][A-Za-z0-9_]{0,63}",
        hint="a plain table name such as cdr",
    )
    if src.has("csv") and src.has("mariadb"):
        src.problem("mariadb", "give either csv or mariadb, not both")
    if src.has("mariadb"):
        raw = src.raw("mariadb")
        # The value holds a password: never echo it in a configuration error.
        if not isinstance(raw, str) or not re.fullmatch(r"mysql://.+", raw):
            src.problem("mariadb", "is not valid: expected mysql://user:pass@host[:port]/db")
        else:
            mariadb = raw
    else:
        csv = src.path("csv", str(DEFAULT_CSV))
    src.finish()
    s = CallstatsSettings(
        enabled=enabled,
        interval=interval,
        bucket=bucket,
        min_count=min_count,
        csv=csv,
        mariadb=mariadb,
        table=table,
        settle=settle,
        max_age=max_age,
        lookback=lookback,
        usegmtime=usegmtime,
        directions=directions,
        default_direction=default_direction,
        trunks=trunks,
        trunk_pattern=trunk_pattern,
    )
    sec.finish()
    return s
