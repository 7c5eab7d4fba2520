"""System health: CPU, memory, disks, load, uptime, network errors, PBX processes, the agent.

psutil reads /proc; nothing here opens a socket. The body is small (about
1-2 KiB) and holds no content from the PBX: only figures and process names.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from agent.collectors.base import Emit, Record
from agent.config import HealthSettings
from agent.policy.classes import DataClass

# Pseudo and container file systems say nothing about the PBX's disks.
_SKIP_FSTYPES = frozenset(
    {
        "tmpfs",
        "devtmpfs",
        "proc",
        "sysfs",
        "cgroup",
        "cgroup2",
        "overlay",
        "squashfs",
        "devpts",
        "mqueue",
        "debugfs",
        "tracefs",
        "securityfs",
        "pstore",
        "bpf",
        "autofs",
        "fusectl",
        "configfs",
        "hugetlbfs",
        "nsfs",
        "ramfs",
        "binfmt_misc",
        "efivarfs",
    }
)
# Services FreePBX runs beside Asterisk; checked only where FreePBX is installed.
FREEPBX_PROCESSES = ("mariadbd|mysqld", "apache2|httpd", "php-fpm.*|php", "PM2.*|node")
FREEPBX_MARKER = Path("/etc/freepbx.conf")


def _round(x: float, n: int = 1) -> float:
    return round(x, n)


class HealthCollector:
    """Gathers the health record at each interval."""

    name = "health"

    def __init__(self, settings: HealthSettings, agent_stats: Callable[[], dict[str, Any]]):
        self.settings = settings
        self._agent_stats = agent_stats
        self._self = psutil.Process()
        self._self.cpu_percent(None)  # prime: the first call always says 0.0
        psutil.cpu_percent(None)
        self._runs = 0

    @property
    def interval(self) -> float:
        """Seconds between health records."""
        return self.settings.interval

    def _process_names(self) -> list[str]:
        names = list(self.settings.pbx_processes)
        if FREEPBX_MARKER.exists():
            names.extend(FREEPBX_PROCESSES)
        return names

    def gather(self) -> dict[str, Any]:
        """One health body."""
        vm = psutil.virtual_memory()
        sw = psutil.swap_memory()
        load = os.getloadavg()
        disks = []
        for part in psutil.disk_partitions(all=False):
            if part.fstype in _SKIP_FSTYPES:
                continue
            try:
                du = psutil.disk_usage(part.mountpoint)
            except OSError:
                continue
            disks.append(
                {
                    "mount": part.mountpoint,
                    "fstype": part.fstype,
                    "total": du.total,
                    "used": du.used,
                    "percent": du.percent,
                }
            )
        net = psutil.net_io_counters(pernic=False)
        with self._self.oneshot():
            me = {
                "pid": self._self.pid,
                "rss": self._self.memory_info().rss,
                "cpu_percent": _round(self._self.cpu_percent(None)),
                "threads": self._self.num_threads(),
            }
        me.update(self._agent_stats())
        return {
            "cpu": {"percent": _round(psutil.cpu_percent(None)), "count": psutil.cpu_count()},
            "load": [_round(x, 2) for x in load],
            "memory": {"total": vm.total, "available": vm.available, "percent": vm.percent},
            "swap": {"total": sw.total, "used": sw.used, "percent": sw.percent},
            "disks": disks,
            "uptime": int(time.time() - psutil.boot_time()),
            "net": {
                "errin": net.errin,
                "errout": net.errout,
                "dropin": net.dropin,
                "dropout": net.dropout,
            }
            if net
            else {},
            "pbx": self._pbx_processes(),
            "agent": me,
        }

    def _pbx_processes(self) -> dict[str, Any]:
        import re

        patterns = {name: re.compile(rf"^(?:{name})$") for name in self._process_names()}
        found: dict[str, int] = dict.fromkeys(patterns, 0)
        for proc in psutil.process_iter(["name"]):
            pname = proc.info.get("name") or ""
            for key, pattern in patterns.items():
                if pattern.match(pname):
                    found[key] += 1
        return {name.split("|")[0]: {"running": n > 0, "count": n} for name, n in found.items()}

    async def collect(self, emit: Emit, *, reason: str) -> None:
        """Gather (in a thread: process_iter walks /proc) and offer one record."""
        body = await asyncio.to_thread(self.gather)
        self._runs += 1
        emit(Record(DataClass.HEALTH, body))

    def status(self) -> dict[str, Any]:
        """Counters for agentctl status."""
        return {"runs": self._runs}

    async def aclose(self) -> None:
        """Nothing to release."""
