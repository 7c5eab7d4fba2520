"""The ``collectors.config`` section: where the PBX configuration lives and how much to read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.confreader import Section

DEFAULT_ROOTS = (Path("/etc/asterisk"), Path("/etc/freepbx.conf"), Path("/etc/amportal.conf"))
DEFAULT_EXCLUDE = ("/etc/asterisk/keys/**",)


@dataclass(frozen=True, kw_only=True)
class SnapshotSettings:
    """How the configuration-snapshot collector finds and bounds its files."""

    enabled: bool = True
    interval: float = 3600.0
    full_every: float = 7 * 86400.0
    roots: tuple[Path, ...] = DEFAULT_ROOTS
    include: tuple[str, ...] = ("**",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    max_file: int = 1024 * 1024
    max_total: int = 64 * 1024 * 1024
    #: Trees never opened, on top of the built-in spools and key folders
    #: (agent.collectors.pbxconfig.sources.ALWAYS_FORBIDDEN, which cannot be removed).
    never_read: tuple[Path, ...] = ()


def parse_settings(sec: Section) -> SnapshotSettings:
    """Validate ``collectors.config``."""
    d = SnapshotSettings()
    s = SnapshotSettings(
        enabled=sec.bool("enabled", d.enabled),
        interval=sec.duration("interval", d.interval, min=10, max=7 * 86400),
        full_every=sec.duration("full_every", d.full_every, min=3600, max=90 * 86400),
        roots=sec.path_list("roots", [str(p) for p in d.roots]),
        include=sec.str_list("include", list(d.include)),
        exclude=sec.str_list("exclude", list(d.exclude)),
        max_file=sec.size("max_file", d.max_file, min=1024, max=64 * 1024**2),
        max_total=sec.size("max_total", d.max_total, min=64 * 1024, max=1024**3),
        never_read=sec.path_list("never_read", []),
    )
    sec.finish()
    return s
