"""Which collectors the configuration enables, and how to make each (the daemon's one place for it).

Making a collector can fail on this box's state (a state file of a newer
format, an unreadable folder): the daemon makes each one inside its own
supervised task, so such a failure is reported and retried for that collector
alone. Here, only the names, intervals and recipes are decided, which cannot fail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.collectors.base import Collector
from agent.config import AgentConfig


@dataclass(frozen=True, slots=True)
class CollectorSpec:
    """An enabled collector, not made yet: its name, its interval and how to make it."""

    name: str
    interval: float
    make: Callable[[], Collector]


def specs(config: AgentConfig, agent_stats: Callable[[], dict[str, Any]]) -> list[CollectorSpec]:
    """Every enabled collector's recipe; nothing is opened until ``make`` is called."""
    out: list[CollectorSpec] = []
    c = config.collectors
    state_dir = config.paths.state_dir
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

            return SnapshotCollector(c.config, state_dir)

        out.append(CollectorSpec("config", c.config.interval, snapshots))
    if c.callstats.enabled:

        def callstats() -> Collector:
            from agent.collectors.callstats.collector import CallstatsCollector

            return CallstatsCollector(c.callstats, state_dir)

        out.append(CollectorSpec("callstats", c.callstats.interval, callstats))
    return out


def build(config: AgentConfig, agent_stats: Callable[[], dict[str, Any]]) -> list[Collector]:
    """Make every enabled collector at once (for tools; the daemon makes each supervised)."""
    return [spec.make() for spec in specs(config, agent_stats)]
