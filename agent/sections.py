"""The configuration's own sections: what the layers below the daemon are configured with.

The uplink, the policy gate, the outbox and the control socket each take their
section from here, typed and frozen; none of them sees the whole file or the
collectors' settings. :mod:`agent.config` reads the file and assembles these
with the collectors' sections (:mod:`agent.collectors.registry`) into one
:class:`agent.config.AgentConfig`. No module reads YAML or raw dictionaries
but the ``parse_*`` functions here, through :class:`agent.confreader.Section`,
which names file, key path and line for every problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from agent.confreader import Section
from agent.errors import KeyFormatError
from agent.paths import CONTROL_SOCKET_NAME, DEFAULT_RUNTIME_DIR, DEFAULT_STATE_DIR
from agent.sshkeys import HostKeyPin, known_hosts_name, parse_host_key

DEFAULT_CONFIG_PATH = Path("/etc/pbx-agent/agent.yaml")
#: The vendor's root public key that NOC commands must chain to (agent.uplink.signing).
DEFAULT_COMMAND_ROOT = Path("/etc/pbx-agent/vendor-root.pub")

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
    command_root: Path = DEFAULT_COMMAND_ROOT
    max_inflight: int = 100
    reconnect_max: float = 300.0
    connect_timeout: float = 10.0

    @property
    def broker(self) -> str:
        """The broker URL as written in the configuration."""
        return f"mqtts://{self.host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class EnrollConfig:
    """Where ``agentctl enroll`` trades a one-time token for the box's certificate."""

    url: str  # https://HOST[:PORT][/PATH]: the vendor's EST-shaped endpoint
    host: str
    port: int = 443
    path: str = "/.well-known/est"
    ca_file: Path  # the only CA trusted for the endpoint (the vendor CA)
    broker: str | None = None  # written into a new uplink section after enrollment
    timeout: float = 30.0


@dataclass(frozen=True, kw_only=True)
class SupportService:
    """A local service the vendor may reach through the support tunnel."""

    name: str
    host: str
    port: int

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class SupportConfig:
    """Remote support: the vendor's bastion (pinned) and the services it may reach."""

    bastion_host: str
    bastion_port: int = 22
    bastion_user: str
    host_key: HostKeyPin
    services: tuple[SupportService, ...]
    key_file: Path
    account: str = "pbx-support"
    sshd_log: Path | None = None
    max_window: float = 4 * 3600.0
    idle_timeout: float = 1800.0
    keepalive_interval: float = 15.0
    keepalive_deadline: float = 15.0
    reconnect_max: float = 60.0
    connect_timeout: float = 15.0
    max_channels: int = 16

    @property
    def bastion(self) -> str:
        """``host:port`` of the bastion."""
        return f"{self.bastion_host}:{self.bastion_port}"

    def service(self, name: str) -> SupportService | None:
        """The configured service called ``name``."""
        return next((s for s in self.services if s.name == name), None)

    @property
    def service_names(self) -> tuple[str, ...]:
        """The configured services' names, in configuration order."""
        return tuple(s.name for s in self.services)


def parse_paths(sec: Section) -> PathsConfig:
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


def parse_control(sec: Section) -> ControlConfig:
    c = ControlConfig(
        read_group=_group(sec, "read_group", "pbx-agent"),
        admin_group=_group(sec, "admin_group", "pbx-agent-admin"),
        max_request=sec.size("max_request", ControlConfig.max_request, min=1024, max=1024 * 1024),
    )
    sec.finish()
    return c


def parse_outbox(sec: Section) -> OutboxConfig:
    """The ``outbox`` section."""
    o = OutboxConfig(
        max_bytes=sec.size("max_bytes", OutboxConfig.max_bytes, min=1024 * 1024, max=64 * 1024**3)
    )
    sec.finish()
    return o


def parse_uplink(sec: Section) -> UplinkConfig:
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
        command_root=sec.path("command_root", str(DEFAULT_COMMAND_ROOT)),
        max_inflight=sec.int("max_inflight", 100, min=1, max=1000),
        reconnect_max=sec.duration("reconnect_max", 300.0, min=1, max=3600),
        connect_timeout=sec.duration("connect_timeout", 10.0, min=1, max=120),
    )
    sec.finish()
    return u


HOST_PATTERN = r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[?[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*\]?"
SERVICE_NAME_PATTERN = r"[a-z][a-z0-9_-]{0,31}"
ACCOUNT_PATTERN = r"[a-z_][a-z0-9_-]{0,31}"
BASTION_USER_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}"
_HOST_PORT = re.compile(
    r"\[(?P<v6>[0-9A-Fa-f:.]+)\]:(?P<p6>\d{1,5})|(?P<h>[A-Za-z0-9.-]+):(?P<p>\d{1,5})"
)

# Stands in for a host key that failed validation: the problem is reported and build() raises.
_PLACEHOLDER_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
)


def _host_port(text: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` → (host, port); None when it is neither."""
    m = _HOST_PORT.fullmatch(text)
    if m is None:
        return None
    port = int(m["p6"] or m["p"])
    return (m["v6"] or m["h"], port) if 1 <= port <= 65535 else None


def _bastion_pin(b: Section, host: str, port: int) -> HostKeyPin:
    text: object = b.str("host_key")
    if not isinstance(text, str):
        return parse_host_key(_PLACEHOLDER_KEY)
    try:
        pin = parse_host_key(text)
    except KeyFormatError as exc:
        b.problem("host_key", f"not a usable host key ({exc})")
        return parse_host_key(_PLACEHOLDER_KEY)
    if host and not pin.matches_host(host, port):
        b.problem(
            "host_key",
            f"the known_hosts line is for {', '.join(pin.hosts or ())}, not for the bastion "
            f"{known_hosts_name(host, port)} (write just 'TYPE BASE64', or the line for this "
            "host and port)",
        )
    return pin


def _support_services(sec: Section) -> tuple[SupportService, ...]:
    services: list[SupportService] = []
    svc = sec.section("services")
    names = list(svc.keys())
    for name in names:
        value = svc.raw(str(name))
        if not isinstance(name, str) or re.fullmatch(SERVICE_NAME_PATTERN, name) is None:
            svc.problem(str(name), "a service name is lower-case letters, digits, '_' or '-'")
            continue
        parsed = _host_port(value) if isinstance(value, str) else None
        if parsed is None:
            svc.problem(name, f"expected HOST:PORT of the local service, got {value!r}")
            continue
        services.append(SupportService(name=name, host=parsed[0], port=parsed[1]))
    if not names:
        sec.problem("services", "name at least one local service the vendor may reach")
    svc.finish()
    return tuple(services)


def parse_enroll(sec: Section) -> EnrollConfig:
    """The ``enroll`` section."""
    url = sec.str(
        "url",
        pattern=r"https://[^/:\s]+(:\d{1,5})?(/\S*)?",
        hint="expected https://HOST[:PORT][/PATH]; plain http:// is not accepted",
    )
    host, port, path = "", 443, "/.well-known/est"
    if isinstance(url, str):
        parts = urlsplit(url)
        host = parts.hostname or ""
        try:
            port = parts.port or 443
        except ValueError:
            sec.problem("url", "port out of range")
        path = parts.path.rstrip("/") or path
    broker = None
    if sec.has("broker"):
        broker = sec.str(
            "broker",
            pattern=r"mqtts://[^/:]+(:\d{1,5})?/?",
            hint="expected mqtts://HOST[:PORT]",
        )
    e = EnrollConfig(
        url=url,
        host=host,
        port=port,
        path=path,
        ca_file=sec.path("ca_file"),
        broker=broker,
        timeout=sec.duration("timeout", 30.0, min=1, max=300),
    )
    sec.finish()
    return e


def parse_support(sec: Section, device_id: object, state_dir: Path) -> SupportConfig:
    b = sec.section("bastion")
    raw_host = b.str("host", pattern=HOST_PATTERN, hint="a host name or an IP address")
    host = raw_host.strip("[]") if isinstance(raw_host, str) else ""
    port = b.int("port", 22, min=1, max=65535)
    default_user = device_id if isinstance(device_id, str) else "pbx"
    user = b.str("user", default_user, pattern=BASTION_USER_PATTERN, hint="the box's account")
    pin = _bastion_pin(b, host, port if isinstance(port, int) else 22)
    b.finish()
    services = _support_services(sec)
    sshd_log = sec.path("sshd_log") if sec.has("sshd_log") else None
    sec.raw("sshd_log")
    cfg = SupportConfig(
        bastion_host=host,
        bastion_port=port,
        bastion_user=user,
        host_key=pin,
        services=services,
        key_file=sec.path("key_file", str(state_dir / "support" / "id_ed25519")),
        account=sec.str("account", "pbx-support", pattern=ACCOUNT_PATTERN, hint="a user name"),
        sshd_log=sshd_log,
        max_window=sec.duration("max_window", 4 * 3600.0, min=60, max=7 * 86400),
        idle_timeout=sec.duration("idle_timeout", 1800.0, min=1, max=86400),
        keepalive_interval=sec.duration("keepalive_interval", 15.0, min=0.2, max=3600),
        keepalive_deadline=sec.duration("keepalive_deadline", 15.0, min=0.2, max=3600),
        reconnect_max=sec.duration("reconnect_max", 60.0, min=0.5, max=3600),
        connect_timeout=sec.duration("connect_timeout", 15.0, min=0.5, max=120),
        max_channels=sec.int("max_channels", 16, min=1, max=32),  # a thread each; TasksMax=64
    )
    sec.finish()
    return cfg
