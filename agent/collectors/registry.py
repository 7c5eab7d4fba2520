"""Every collector the agent has, in one explicit list: its section of the configuration and
how to make it.

A collector owns its settings (``settings.py`` in its package); this registry is
where they meet: :func:`parse` validates the ``collectors`` section (every
collector's part of it, each problem with file, key and line) and
:func:`specs` says which collectors the configuration enables and how to make
each. Making one can fail on this box's state (a state file of a newer format,
an unreadable folder): the daemon makes each one inside its own supervised
task, so such a failure is reported and retried for that collector alone. Here
only names, intervals and recipes are decided, which cannot fail. Collector
modules are imported when a collector is made, never to read the configuration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.collectors.base import Collector
from agent.collectors.callstats.settings import CallstatsSettings
from agent.collectors.callstats.settings import parse_settings as parse_callstats
from agent.collectors.health.settings import HealthSettings
from agent.collectors.health.settings import parse_settings as parse_health
from agent.collectors.pbxconfig.settings import SnapshotSettings
from agent.collectors.pbxconfig.settings import parse_settings as parse_snapshot
from agent.confreader import Section
from agent.sections import PathsConfig

#: The collectors, by the name they have in the configuration, status and NOC commands.
NAMES = ("health", "config", "callstats")


@dataclass(frozen=True, kw_only=True)
class CollectorsConfig:
    """Every collector's settings (the ``collectors`` section)."""

    health: HealthSettings = field(default_factory=HealthSettings)
    config: SnapshotSettings = field(default_factory=SnapshotSettings)
    callstats: CallstatsSettings = field(default_factory=CallstatsSettings)


def parse(sec: Section, paths: PathsConfig) -> CollectorsConfig:
    """Validate the ``collectors`` section; ``paths`` are the agent's own folders, which no
    configuration root may reach."""
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


@dataclass(frozen=True, slots=True)
class CollectorSpec:
    """An enabled collector, not made yet: its name, its interval and how to make it."""

    name: str
    interval: float
    make: Callable[[], Collector]


def specs(
    c: CollectorsConfig,
    state_dir: Path,
    agent_stats: Callable[[], dict[str, Any]],
    *,
    local_only: bool = False,
) -> list[CollectorSpec]:
    """Every enabled collector's recipe, in :data:`NAMES` order; nothing is opened yet.

    ``local_only``: no uplink is configured; collectors that keep state say "kept
    locally" where they would say "sent".
    """
    out: list[CollectorSpec] = []
    if c.health.enabled:

        def health() -> Collector:
            from agent.collectors.health.collector import HealthCollector

            return HealthCollector(
                c.health, agent_stats, state_dir=state_dir, trunk_rules=c.callstats
            )

        out.append(CollectorSpec("health", c.health.interval, health))
    if c.config.enabled:

        def snapshots() -> Collector:
            from agent.collectors.pbxconfig.collector import SnapshotCollector

            return SnapshotCollector(c.config, state_dir, local_only=local_only)

        out.append(CollectorSpec("config", c.config.interval, snapshots))
    if c.callstats.enabled:

        def callstats() -> Collector:
            from agent.collectors.callstats.collector import CallstatsCollector

            return CallstatsCollector(c.callstats, state_dir, local_only=local_only)

        out.append(CollectorSpec("callstats", c.callstats.interval, callstats))
    return out


def build(
    c: CollectorsConfig, state_dir: Path, agent_stats: Callable[[], dict[str, Any]]
) -> list[Collector]:
    """Make every enabled collector at once (for tools; the daemon makes each supervised)."""
    return [spec.make() for spec in specs(c, state_dir, agent_stats)]
