"""The health collector: one record per interval with the machine and the PBX.

The machine's figures come from psutil (in a thread: process_iter walks /proc),
the PBX's from Asterisk over AMI when ``collectors.health.pbx.ami`` is set, and
the CDR and configuration ages from the agent's own state files. The three run
side by side; the AMI part is bounded by its timeout, so a hung Asterisk delays
a record by that much and never stops it: the ``pbx`` section then says why.

Body (``health``): ``cpu``, ``load``, ``memory``, ``swap``, ``disks``,
``uptime``, ``net``, ``agent`` and ``pbx``; ``pbx`` holds ``state`` and
``reason``, ``processes``, ``asterisk``, ``calls``, ``trunks``, ``endpoints``,
``queues``, ``sections``, ``cdr`` and ``config`` (see the README).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.collectors.base import Emit
from agent.collectors.callstats.settings import CallstatsSettings
from agent.collectors.health.ages import ages
from agent.collectors.health.machine import Machine
from agent.collectors.health.settings import HealthSettings
from agent.errors import AgentError, CollectorError
from agent.policy.classes import DataClass, Record

if TYPE_CHECKING:
    from agent.collectors.health.pbx import PbxProbe


class HealthCollector:
    """Implements :class:`agent.collectors.base.Collector` for the ``health`` class."""

    name = "health"

    def __init__(
        self,
        settings: HealthSettings,
        agent_stats: Callable[[], dict[str, Any]],
        *,
        state_dir: Path | None = None,
        trunk_rules: CallstatsSettings | None = None,
    ) -> None:
        """``trunk_rules``: the call-statistics settings, so trunks are named the same way."""
        self.settings = settings
        self._agent_stats = agent_stats
        self._state_dir = state_dir
        self._machine = Machine(settings)
        self._probe: PbxProbe | None = None
        if settings.ami is not None:
            # Imported here: a box without AMI configured never loads the client.
            from agent.collectors.health.pbx import PbxProbe

            self._probe = PbxProbe(settings.ami, trunk_rules or CallstatsSettings())
        self._runs = 0

    @property
    def interval(self) -> float:
        """Seconds between health records."""
        return self.settings.interval

    def _local(self, now: float) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        return self._machine.gather(), self._machine.processes(), ages(self._state_dir, now)

    async def gather(self) -> dict[str, Any]:
        """One health body."""
        now = time.time()
        try:
            async with asyncio.TaskGroup() as tg:
                # One thread for the three local readings, one after the other: run side by
                # side they only took turns at the GIL, waking each other (issue 17).
                local = tg.create_task(asyncio.to_thread(self._local, now))
                ami = tg.create_task(self._probe.gather(now)) if self._probe is not None else None
        except* AgentError as group:
            # The scheduler reports an AgentError and tries again; not a group of them.
            first = group.exceptions[0]
            raise CollectorError(f"health: {first}") from first
        body, procs, own = local.result()
        body["agent"].update(self._agent_stats())
        body["agent"]["update"] = update_summary()
        pbx: dict[str, Any] = (
            {"state": "not_configured", "reason": None} if ami is None else ami.result()
        )
        asterisk = procs.get("asterisk")
        pbx_asterisk: dict[str, Any] = pbx.get("asterisk") or {"running": None}
        if asterisk is not None:
            # The process check stands in while AMI cannot say (or is not configured).
            pbx_asterisk["processes"] = asterisk["count"]
            if not pbx_asterisk.get("running"):
                pbx_asterisk["running"] = asterisk["running"]
        pbx["asterisk"] = pbx_asterisk
        pbx["processes"] = procs
        pbx.update(own)
        body["pbx"] = pbx
        return body

    async def collect(self, emit: Emit, *, reason: str) -> None:
        """Gather and offer one record."""
        body = await self.gather()
        self._runs += 1
        emit(Record(DataClass.HEALTH, body))

    def status(self) -> dict[str, Any]:
        """Runs, and the PBX headline when AMI is configured."""
        out: dict[str, Any] = {"runs": self._runs}
        out["pbx"] = self._probe.status() if self._probe is not None else {"ami": None}
        return out

    async def aclose(self) -> None:
        """Close the AMI connection, if there is one."""
        if self._probe is not None:
            await self._probe.aclose()


def update_summary(update_dir: Path | None = None) -> dict[str, Any] | None:
    """What the update unit last found (agent/update_state.py), for the NOC to see
    an update waiting under ``updates: notify``; None before the first check."""
    from agent.update_state import DEFAULT_UPDATE_DIR, read_state

    state = read_state(update_dir or DEFAULT_UPDATE_DIR)
    if state is None:
        return None
    return {
        "setting": state.mode,
        "outcome": state.outcome,
        "installed": state.installed,
        "available": state.available,
        "held": state.held,
        "checked_at": state.at,
    }
