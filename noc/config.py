"""The NOC's configuration (``/etc/pbx-noc/noc.yaml``), parsed once and validated whole.

Every problem is reported with the file and the key path, all at once; the
result is a tree of frozen dataclasses, never a raw dict. ``etc/noc.yaml`` is
the commented default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from noc.errors import ConfigError

DEFAULT_PATH = Path("/etc/pbx-noc/noc.yaml")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(text: str | float) -> float:
    """``30s``, ``5m``, ``1h``, ``7d`` (or a number of seconds) as seconds; ValueError if not."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    m = _DURATION.match(str(text))
    if m is None:
        raise ValueError(f"{text!r} is not a duration such as 30s, 5m, 1h, 7d")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True, kw_only=True)
class BrokerSettings:
    """Where the broker is and how the NOC proves who it is."""

    host: str = "localhost"
    port: int = 8883
    ca_file: Path = Path("/etc/pbx-noc/vendor-ca.pem")
    cert_file: Path = Path("/etc/pbx-noc/noc.crt")
    key_file: Path = Path("/etc/pbx-noc/noc.key")
    # mosquitto's acl_file never checks subscriptions: a box that knows the group
    # name could join it. Pick an unguessable name per deployment (README).
    share_group: str = "noc"
    session_expiry: float = 7 * 86400.0
    keepalive: int = 30

    @property
    def url(self) -> str:
        """``mqtts://host:port``."""
        return f"mqtts://{self.host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class IngestSettings:
    """How a worker takes messages in."""

    batch: int = 500  # messages per transaction at most
    receive_maximum: int = 1000  # unacknowledged messages the broker may send us
    # mosquitto 2.0 does not persist shared subscriptions: after its restart, what the
    # fleet sends before the workers have subscribed again reaches no one. A standby
    # session (a plain subscription, which is persisted) catches that window.
    standby: bool = False
    standby_window: float = 60.0


@dataclass(frozen=True, kw_only=True)
class WebSettings:
    """The dashboard's listener and its sessions."""

    host: str = "127.0.0.1"
    port: int = 8080
    secure_cookies: bool = True
    session_ttl: float = 12 * 3600.0
    # A box silent for this many heartbeats is shown offline, whatever its retained status
    # says: mosquitto 2.0 checks keepalives only every 5 s, so its last will can come late.
    silent_after: float = 1.5
    login_window: float = 900.0  # failures counted over this window ...
    login_max_failures: int = 5  # ... this many per user name or address, then refused


@dataclass(frozen=True, kw_only=True)
class AlertSettings:
    """Alert rules (see the README's table) and where they are delivered."""

    interval: float = 15.0
    webhook: str | None = None
    webhook_timeout: float = 5.0
    heartbeat: float = 60.0  # the fleet's uplink.heartbeat
    offline_after: float = 3.0  # heartbeats without news before "offline"
    disk_pct: float = 90.0
    memory_pct: float = 90.0
    hysteresis_pct: float = 5.0  # a threshold alert resolves this far below its threshold
    cert_days: float = 14.0
    gap_grace: float = 120.0  # a sequence gap older than this is an alert (not reordering)
    resolve_after: float = 60.0  # a condition must be clear this long before it resolves
    restart_window: float = 3600.0  # an Asterisk restart stays an (informational) alert this long


@dataclass(frozen=True, kw_only=True)
class RetentionSettings:
    """How long each kind of row is kept; the prune runs every ``every``."""

    envelopes: float = 30 * 86400.0
    health: float = 30 * 86400.0
    callstats: float = 400 * 86400.0
    snapshots: float = 180 * 86400.0
    commands: float = 180 * 86400.0
    alerts: float = 180 * 86400.0
    every: float = 3600.0


@dataclass(frozen=True, kw_only=True)
class SigningSettings:
    """The command key every command is signed with (``noc keys issue-command-key``)."""

    key_file: Path = Path("/etc/pbx-noc/command-key.json")
    # A box refuses a command after this; its own command_max_age applies as well.
    lifetime: float = 300.0


@dataclass(frozen=True, kw_only=True)
class EnrollSettings:
    """The enrollment endpoint (``noc enroll``) and the certificates it issues."""

    host: str = "127.0.0.1"
    port: int = 8443
    cert_file: Path = Path("/etc/pbx-noc/enroll.crt")  # a server certificate of the vendor CA
    key_file: Path = Path("/etc/pbx-noc/enroll.key")
    ca_dir: Path = Path("/etc/pbx-noc/ca")  # ca.crt and ca.key (python -m noc.ca init)
    lifetime: float = 90 * 86400.0  # of a device certificate
    token_ttl: float = 86400.0  # of an enrollment token


@dataclass(frozen=True, kw_only=True)
class RevocationSettings:
    """Where the broker's CRL is written and how the broker is told to read it again."""

    crl_file: Path = Path("/etc/mosquitto/pbx-agent/crl.pem")  # the broker's crlfile
    broker_pid_file: Path = Path("/run/mosquitto/mosquitto.pid")  # SIGHUP reloads the CRL
    crl_validity: float = 7 * 86400.0  # its nextUpdate: refresh it well before (noc crl)


@dataclass(frozen=True, kw_only=True)
class NocConfig:
    """The whole configuration."""

    database: str = "postgresql:///noc"
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    web: WebSettings = field(default_factory=WebSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    signing: SigningSettings = field(default_factory=SigningSettings)
    enroll: EnrollSettings = field(default_factory=EnrollSettings)
    revocation: RevocationSettings = field(default_factory=RevocationSettings)
    command_timeout: float = 10.0
    source: str = "(defaults)"


_SECTIONS: dict[str, type[Any]] = {
    "broker": BrokerSettings,
    "ingest": IngestSettings,
    "web": WebSettings,
    "alerts": AlertSettings,
    "retention": RetentionSettings,
    "signing": SigningSettings,
    "enroll": EnrollSettings,
    "revocation": RevocationSettings,
}
_DURATIONS = {
    "broker.session_expiry",
    "web.session_ttl",
    "web.login_window",
    "alerts.interval",
    "alerts.webhook_timeout",
    "alerts.heartbeat",
    "alerts.gap_grace",
    "alerts.resolve_after",
    "alerts.restart_window",
    "ingest.standby_window",
    "command_timeout",
    "signing.lifetime",
    "enroll.lifetime",
    "enroll.token_ttl",
    "revocation.crl_validity",
} | {f"retention.{k}" for k in RetentionSettings.__dataclass_fields__}


def _value(key: str, raw: Any, default: Any, problems: list[str]) -> Any:
    try:
        if key in _DURATIONS:
            return duration(raw)
        if key == "broker.url":
            return raw
        if isinstance(default, bool):
            if not isinstance(raw, bool):
                raise ValueError("expected true or false")
            return raw
        if isinstance(default, int):
            if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
                raise ValueError("expected a whole number >= 0")
            return raw
        if isinstance(default, float):
            if isinstance(raw, bool) or not isinstance(raw, int | float) or raw < 0:
                raise ValueError("expected a number >= 0")
            return float(raw)
        if isinstance(default, Path):
            if not isinstance(raw, str) or not raw.startswith("/"):
                raise ValueError("expected an absolute path")
            return Path(raw)
        if raw is not None and not isinstance(raw, str):
            raise ValueError("expected a string")
        return raw
    except ValueError as exc:
        problems.append(f"{key}: {exc}")
        return default


def parse(data: Any, source: str = "(text)") -> NocConfig:
    """Validate a loaded YAML document; ConfigError listing every problem."""
    problems: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the configuration must be a mapping")
    top: dict[str, Any] = {"source": source}
    for key, raw in data.items():
        if key == "database":
            if not isinstance(raw, str):
                problems.append("database: expected a connection string")
            else:
                top["database"] = raw
        elif key == "command_timeout":
            top[key] = _value(key, raw, 10.0, problems)
        elif key in _SECTIONS:
            cls = _SECTIONS[key]
            if not isinstance(raw, dict):
                problems.append(f"{key}: expected a mapping")
                continue
            defaults = cls()
            values: dict[str, Any] = {}
            for sub, v in raw.items():
                name = f"{key}.{sub}"
                if key == "broker" and sub == "url":
                    url = urlsplit(str(v))
                    if url.scheme != "mqtts" or not url.hostname:
                        problems.append(f"{name}: expected mqtts://HOST[:PORT], got {v!r}")
                    else:
                        values["host"], values["port"] = url.hostname, url.port or 8883
                    continue
                if sub not in cls.__dataclass_fields__:
                    problems.append(f"{name}: unknown key")
                    continue
                values[sub] = _value(name, v, getattr(defaults, sub), problems)
            top[key] = cls(**values)
        else:
            problems.append(f"{key}: unknown key")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return NocConfig(**top)


def load(path: Path | None) -> NocConfig:
    """Read and validate ``path`` (None: the defaults, for tools that take their options)."""
    if path is None:
        return NocConfig()
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse(data, str(path))
