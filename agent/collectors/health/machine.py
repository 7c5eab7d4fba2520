"""The machine's health: CPU, memory, disks, load, uptime, network errors, PBX processes.

psutil reads /proc; nothing here opens a socket. The figures are small (about
1 KiB) and hold no content from the PBX: only numbers and process names.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import psutil

from agent.collectors.health.settings import HealthSettings

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


def _pattern(name: str) -> re.Pattern[str]:
    """The whole-name regex of ``name``; one that does not compile is matched literally."""
    try:
        return re.compile(rf"^(?:{name})$")
    except re.error:
        return re.compile(rf"^{re.escape(name)}$")


def _round(x: float, n: int = 1) -> float:
    return round(x, n)


class Machine:
    """Reads the machine's figures; keeps the psutil objects that need priming between runs."""

    def __init__(self, settings: HealthSettings) -> None:
        self.settings = settings
        self._self = psutil.Process()
        self._self.cpu_percent(None)  # prime: the first call always says 0.0
        psutil.cpu_percent(None)
        self._patterns = {name: _pattern(name) for name in self._process_names(settings)}

    @staticmethod
    def _process_names(settings: HealthSettings) -> list[str]:
        names = list(settings.pbx_processes)
        if FREEPBX_MARKER.exists():
            names.extend(FREEPBX_PROCESSES)
        return names

    def gather(self) -> dict[str, Any]:
        """The machine part of a health body (the agent's own figures under ``agent``)."""
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
            "agent": me,
        }

    def processes(self) -> dict[str, dict[str, Any]]:
        """Each configured process name (its first alternative): running or not, how many."""
        found: dict[str, int] = dict.fromkeys(self._patterns, 0)
        for pname in process_names():
            for key, pattern in self._patterns.items():
                if pattern.match(pname):
                    found[key] += 1
        return {name.split("|")[0]: {"running": n > 0, "count": n} for name, n in found.items()}


#: The kernel keeps this many characters of a process's name (TASK_COMM_LEN - 1).
COMM_LEN = 15


def process_names(proc: Path = Path("/proc")) -> list[str]:
    """The name of every process, as ``psutil.Process.name()`` gives it, at a third of the cost.

    One read of ``/proc/PID/comm`` each (psutil reads and parses ``stat``); a name
    the kernel cut at 15 characters is completed from the command line, as psutil
    does. This runs every minute over every process of the box (issue 17).
    """
    names: list[str] = []
    try:
        entries = os.scandir(proc)
    except OSError:
        return [p.info.get("name") or "" for p in psutil.process_iter(["name"])]
    with entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"{entry.path}/comm", "rb") as f:
                    name = f.read().rstrip(b"\n").decode("utf-8", "replace")
            except OSError:
                continue  # ended since the listing, or hidden from us (hidepid)
            if len(name) >= COMM_LEN:
                name = _full_name(entry.path, name)
            names.append(name)
    return names


def _full_name(path: str, comm: str) -> str:
    """A cut name completed from the program's path in its command line, when it fits."""
    try:
        with open(f"{path}/cmdline", "rb") as f:
            argv0 = f.read(4096).split(b"\0", 1)[0]
    except OSError:
        return comm
    base = os.path.basename(argv0.decode("utf-8", "replace"))
    return base if base.startswith(comm) else comm
