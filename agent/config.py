"""The agent's configuration: read once, validated whole, passed down as frozen objects.

``load(path)`` returns an :class:`AgentConfig` or raises :class:`ConfigError`
listing every problem with its file, key path and line, all at once. It
assembles the agent's own sections (:mod:`agent.sections`, what the layers
below the daemon are configured with) and the collectors' (each collector owns
its settings; :mod:`agent.collectors.registry` lists them). This module sits
above both, beside the daemon and the command line that load it: the uplink,
the gate and the collectors take only their own section, never the whole file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agent.collectors.registry import CollectorsConfig
from agent.collectors.registry import parse as parse_collectors
from agent.confreader import LineMap, Problems, Section, load_yaml, parse_yaml
from agent.policy.settings import PolicyConfig, parse_policy
from agent.sections import (
    DEFAULT_CONFIG_PATH,
    DEVICE_ID_PATTERN,
    ControlConfig,
    EnrollConfig,
    OutboxConfig,
    PathsConfig,
    SupportConfig,
    SupportService,
    UplinkConfig,
    parse_control,
    parse_enroll,
    parse_outbox,
    parse_paths,
    parse_support,
    parse_uplink,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEVICE_ID_PATTERN",
    "AgentConfig",
    "CollectorsConfig",
    "ControlConfig",
    "EnrollConfig",
    "OutboxConfig",
    "PathsConfig",
    "PolicyConfig",
    "SupportConfig",
    "SupportService",
    "UplinkConfig",
    "build",
    "load",
    "loads",
]


UPDATE_MODES = ("off", "notify", "auto")


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
    enroll: EnrollConfig | None = None
    support: SupportConfig | None = None
    log_level: str = "info"
    # The update unit's permission (agent/updater): off, notify (say so) or auto.
    updates: str = "notify"


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
    paths = parse_paths(top.section("paths"))
    control = parse_control(top.section("control"))
    collectors = parse_collectors(top.section("collectors"), paths)
    policy = parse_policy(top.section("policy"))
    outbox = parse_outbox(top.section("outbox"))
    uplink = parse_uplink(top.section("uplink")) if top.has("uplink") else None
    top.raw("uplink")
    enroll = parse_enroll(top.section("enroll")) if top.has("enroll") else None
    top.raw("enroll")
    support = None
    if top.has("support") and isinstance(paths.state_dir, Path):
        support = parse_support(top.section("support"), device_id, paths.state_dir)
    top.raw("support")
    log_level = top.choice("log_level", ("debug", "info", "warning", "error"), "info")
    # YAML 1.1 reads a bare `off` as false: the word the README prints must work as written.
    updates = (
        "off" if top.raw("updates") is False else top.choice("updates", UPDATE_MODES, "notify")
    )
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
        enroll=enroll,
        support=support,
        log_level=log_level,
        updates=updates,
    )
