"""Builds the enabled collectors from the configuration (the daemon's one place for it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.collectors.base import Collector
from agent.config import AgentConfig


def build(config: AgentConfig, agent_stats: Callable[[], dict[str, Any]]) -> list[Collector]:
    """Instantiate every enabled collector; they open their sources lazily, in collect()."""
    from agent.collectors.health.collector import HealthCollector

    collectors: list[Collector] = []
    c = config.collectors
    state_dir = config.paths.state_dir
    if c.health.enabled:
        collectors.append(
            HealthCollector(c.health, agent_stats, state_dir=state_dir, trunk_rules=c.callstats)
        )
    if c.config.enabled:
        try:
            from agent.collectors.pbxconfig.collector import SnapshotCollector
        except ImportError:
            pass
        else:
            collectors.append(SnapshotCollector(c.config, state_dir))
    if c.callstats.enabled:
        try:
            from agent.collectors.callstats.collector import CallstatsCollector
        except ImportError:
            pass
        else:
            collectors.append(CallstatsCollector(c.callstats, state_dir))
    return collectors
