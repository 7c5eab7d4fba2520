"""The agent's configuration: parsed once, validated whole, passed down as frozen objects.

``load(path)`` returns an :class:`AgentConfig` or raises :class:`ConfigError`
listing every problem with its file, key path and line. No other module reads
YAML or raw dictionaries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from agent.collectors.callstats.settings import CallstatsSettings
from agent.collectors.callstats.settings import parse_settings as parse_callstats
from agent.collectors.health.settings import HealthSettings
from agent.collectors.health.settings import parse_settings as parse_health
from agent.collectors.pbxconfig.settings import SnapshotSettings
from agent.collectors.pbxconfig.settings import parse_settings as parse_snapshot
from agent.confreader import LineMap, Problems, Section, load_yaml, parse_yaml
from agent.paths import CONTROL_SOCKET_NAME, DEFAULT_RUNTIME_DIR, DEFAULT_STATE_DIR
from agent.policy.classes import HARD_DENIED, DataClass

DEFAULT_CONFIG_PATH = Path("/etc/pbx-agent/agent.yaml")

# An MQTT topic level and a certificate CN both have to hold it: keep it plain.
DEVICE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"


@dataclass(frozen=True, kw_only=True)
class PathsConfig:
    """Where the agent keeps its state and its runtime files."""

    state_dir: Path = DEFAULT_STATE_DIR
    runtime_dir: Path = DEFAULT_RUNTIME_DIR

    @property
    def control_socket(self) -> Path:
        """The Unix socket ``agentctl`` talks to."""
        return self.runtime_dir / CONTROL_SOCKET_NAME


@dataclass(frozen=True, kw_only=True)
class ControlConfig:
    """Who may talk to the daemon over its socket."""

    read_group: str | None = "pbx-agent"
    admin_group: str | None = "pbx-agent-admin"
    max_request: int = 64 * 1024


@dataclass(frozen=True, kw_only=True)
class CollectorsConfig:
    """All collectors' settings."""

    health: HealthSettings = field(default_factory=HealthSettings)
    config: SnapshotSettings = field(default_factory=SnapshotSettings)
    callstats: CallstatsSettings = field(default_factory=CallstatsSettings)


@dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    """What the customer permits to leave the box."""

    send: frozenset[DataClass] = frozenset(DataClass)


@dataclass(frozen=True, kw_only=True)
class OutboxConfig:
    """Bounds of the durable outbox."""

    max_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class UplinkConfig:
    """The MQTT-over-mutual-TLS connection to the vendor's broker."""

    host: str
    port: int = 8883
    ca_file: Path
    cert_file: Path
    key_file: Path
    keepalive: float = 60.0
    heartbeat: float = 60.0
    command_max_age: float = 300.0
    max_inflight: int = 100
    reconnect_max: float = 300.0
    connect_timeout: float = 10.0

    @property
    def broker(self) -> str:
        """The broker URL as written in the configuration."""
        return f"mqtts://{self.host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """The whole validated configuration."""

    source: Path
    device_id: str
    paths: PathsConfig = field(default_factory=PathsConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    collectors: CollectorsConfig = field(default_factory=CollectorsConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    uplink: UplinkConfig | None = None
    log_level: str = "info"


def load(path: Path) -> AgentConfig:
    """Read and validate the configuration file at ``path``."""
    return build(load_yaml(path), path)


def loads(text: str, path: Path = Path("<string>")) -> AgentConfig:
    """Validate configuration text (for tests and ``config check -``)."""
    return build(parse_yaml(text, path), path)


def build(data: LineMap, path: Path) -> AgentConfig:
    """Turn parsed YAML into an :class:`AgentConfig`, reporting every problem at once."""
    problems = Problems(path)
    top = Section(data, "", problems, 1)
    device_id = top.str(
        "device_id",
        pattern=DEVICE_ID_PATTERN,
        hint="letters, digits, '.', '_' and '-', at most 64, as in the "
        "client certificate's common name",
    )
    paths = _paths(top.section("paths"))
    control = _control(top.section("control"))
    collectors = _collectors(top.section("collectors"), paths)
    policy = _policy(top.section("policy"))
    outbox_sec = top.section("outbox")
    outbox = OutboxConfig(
        max_bytes=outbox_sec.size(
            "max_bytes", OutboxConfig.max_bytes, min=1024 * 1024, max=64 * 1024**3
        )
    )
    outbox_sec.finish()
    uplink = _uplink(top.section("uplink")) if top.has("uplink") else None
    top.raw("uplink")
    log_level = top.choice("log_level", ("debug", "info", "warning", "error"), "info")
    top.finish()
    problems.raise_if_any()
    return AgentConfig(
        source=path,
        device_id=device_id,
        paths=paths,
        control=control,
        collectors=collectors,
        policy=policy,
        outbox=outbox,
        uplink=uplink,
        log_level=log_level,
    )


def _paths(sec: Section) -> PathsConfig:
    p = PathsConfig(
        state_dir=sec.path("state_dir", str(DEFAULT_STATE_DIR)),
        runtime_dir=sec.path("runtime_dir", str(DEFAULT_RUNTIME_DIR)),
    )
    # sun_path is 108 bytes; a longer socket path fails only at bind time otherwise.
    if isinstance(p.runtime_dir, Path) and len(bytes(p.control_socket)) > 100:
        sec.problem("runtime_dir", "is too long for a Unix socket path (keep it under 90 bytes)")
    sec.finish()
    return p


def _group(sec: Section, key: str, default: str) -> str | None:
    value = sec.raw(key) if sec.has(key) else default
    if value is False:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*\$?", value):
        sec.problem(key, f"expected a group name or false, got {value!r}")
        return default
    return value


def _control(sec: Section) -> ControlConfig:
    c = ControlConfig(
        read_group=_group(sec, "read_group", "pbx-agent"),
        admin_group=_group(sec, "admin_group", "pbx-agent-admin"),
        max_request=sec.size("max_request", ControlConfig.max_request, min=1024, max=1024 * 1024),
    )
    sec.finish()
    return c


def _collectors(sec: Section, paths: PathsConfig) -> CollectorsConfig:
    health = parse_health(sec.section("health"))
    config_sec = sec.section("config")
    callstats = parse_callstats(sec.section("callstats"))
    # This installation's own private trees: a root must not reach them either.
    guarded = {
        str(paths.state_dir): "this agent's state and redaction key",
        str(paths.runtime_dir): "this agent's control socket",
    }
    if callstats.enabled and callstats.csv is not None:
        guarded[str(callstats.csv)] = "call detail records (collectors.callstats.source.csv)"
    c = CollectorsConfig(
        health=health,
        config=parse_snapshot(config_sec, guarded=guarded),
        callstats=callstats,
    )
    sec.finish()
    return c


def _policy(sec: Section) -> PolicyConfig:
    names = sec.str_list("send", [c.value for c in DataClass])
    allowed: set[DataClass] = set()
    for name in names:
        if name in HARD_DENIED:
            sec.problem(
                "send",
                f"{name!r} never leaves the box: the privacy policy forbids it, "
                "whatever the configuration says; remove it",
            )
        elif name not in DataClass.__members__.values():
            sec.problem(
                "send",
                f"unknown data class {name!r} (known: {', '.join(c.value for c in DataClass)})",
            )
        else:
            allowed.add(DataClass(name))
    sec.finish()
    return PolicyConfig(send=frozenset(allowed))


def _uplink(sec: Section) -> UplinkConfig:
    broker = sec.str(
        "broker",
        pattern=r"mqtts://[^/:]+(:\d{1,5})?/?",
        hint="expected mqtts://HOST[:PORT]; plain mqtt:// is not accepted",
    )
    host, port = "", 8883
    if isinstance(broker, str):
        parts = urlsplit(broker)
        host = parts.hostname or ""
        try:
            port = parts.port or 8883
        except ValueError:
            sec.problem("broker", "port out of range")
    u = UplinkConfig(
        host=host,
        port=port,
        ca_file=sec.path("ca_file"),
        cert_file=sec.path("cert_file"),
        key_file=sec.path("key_file"),
        keepalive=sec.duration("keepalive", 60.0, min=5, max=3600),
        heartbeat=sec.duration("heartbeat", 60.0, min=1, max=3600),
        command_max_age=sec.duration("command_max_age", 300.0, min=1, max=86400),
        max_inflight=sec.int("max_inflight", 100, min=1, max=1000),
        reconnect_max=sec.duration("reconnect_max", 300.0, min=1, max=3600),
        connect_timeout=sec.duration("connect_timeout", 10.0, min=1, max=120),
    )
    sec.finish()
    return u
