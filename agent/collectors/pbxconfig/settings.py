"""The ``collectors.config`` section: where the PBX configuration lives and how much to read.

Roots are limited to configuration trees. A root that is, lies inside or
contains a tree that holds something private or dangerous to copy (the whole
machine, the kernel's trees, home directories, the spools, Asterisk's sounds
and keys, logs and databases of call records, password hashes, SSH and TLS
keys, this agent's own configuration and state) is a configuration error,
reported with file, key and line: at run time such a tree would be walked
file by file, and the walk's own refusals are the last line, not the first.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.collectors.pbxconfig.sources import ALWAYS_FORBIDDEN, glob_regex
from agent.confreader import Section
from agent.policy.local_rules import LocalRules, compile_rules

DEFAULT_ROOTS = (Path("/etc/asterisk"), Path("/etc/freepbx.conf"), Path("/etc/amportal.conf"))
DEFAULT_EXCLUDE = ("/etc/asterisk/keys/**",)

#: Trees no root may be, lie in, or contain; what each holds, for the message.
GUARDED_TREES: Mapping[str, str] = {
    "/proc": "the kernel's view of processes",
    "/sys": "the kernel's view of devices",
    "/dev": "device files",
    "/run": "the runtime state of running services",
    "/home": "home directories",
    "/root": "root's home directory",
    "/var/spool": "spools: voicemail, call recordings, mail",
    "/var/lib/asterisk": "Asterisk's sounds, keys and database",
    "/var/log": "logs and call detail records",
    "/var/lib/mysql": "databases, call detail records among them",
    "/etc/shadow": "password hashes",
    "/etc/shadow-": "password hashes",
    "/etc/gshadow": "group password hashes",
    "/etc/gshadow-": "group password hashes",
    "/etc/ssh": "SSH host keys",
    "/etc/ssl/private": "TLS private keys",
    "/etc/sudoers": "privilege rules",
    "/etc/sudoers.d": "privilege rules",
    "/etc/pbx-agent": "this agent's configuration and device key",
    "/var/lib/pbx-agent": "this agent's state and redaction key",
}
#: Trees the walk never opens (key folders live inside /etc/asterisk): a root may
#: contain them, but may not be or lie inside one.
_NEVER_OPENED: Mapping[str, str] = {str(p): "spool or key material" for p in ALWAYS_FORBIDDEN}


@dataclass(frozen=True, kw_only=True)
class RedactExtra:
    """``collectors.config.redact.extra``: the administrator's own rules (they only add)."""

    keys: tuple[str, ...] = ()  # regexes over key and variable names
    values: tuple[str, ...] = ()  # regexes searched in every line
    arguments: tuple[tuple[str, tuple[int, ...]], ...] = ()  # application → positions

    def rules(self) -> LocalRules:
        """The compiled rules (validated when the configuration was loaded)."""
        return _compiled(self)


@functools.lru_cache(maxsize=8)
def _compiled(extra: RedactExtra) -> LocalRules:
    rules, _ = compile_rules(
        list(extra.keys), list(extra.values), [(n, list(p)) for n, p in extra.arguments]
    )
    return rules


@dataclass(frozen=True, kw_only=True)
class RedactSettings:
    """``collectors.config.redact``."""

    extra: RedactExtra = field(default_factory=RedactExtra)


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
    #: Local redaction rules, on top of the built-in ones (which cannot be removed).
    redact: RedactSettings = field(default_factory=RedactSettings)


def _redact(sec: Section) -> RedactSettings:
    """Validate ``redact.extra``; a bad pattern is an error naming the key and line."""
    red = sec.section("redact")
    extra = red.section("extra")
    keys = extra.str_list("keys", [])
    values = extra.str_list("values", [])
    args_sec = extra.section("arguments")
    arguments: list[tuple[str, tuple[int, ...]]] = []
    for name in list(args_sec.keys()):
        raw = args_sec.raw(name)
        items: list[object] = list(raw) if isinstance(raw, list) else [raw]
        numbers = [i for i in items if isinstance(i, int) and not isinstance(i, bool)]
        if not items or len(numbers) != len(items):
            args_sec.problem(
                str(name), "expected an argument number (from 1) or a list of them, e.g. [1, 3]"
            )
            continue
        arguments.append((str(name), tuple(numbers)))
    _, problems = compile_rules(list(keys), list(values), [(n, list(p)) for n, p in arguments])
    for where, reason in problems:
        if where.startswith("arguments."):
            args_sec.problem(where.split(".", 1)[1], reason)
        else:
            field_name = where.split("[", 1)[0]
            sec.problems.add(f"{extra.where}.{where}", reason, extra.line_of(field_name))
    extra.finish()
    red.finish()
    return RedactSettings(
        extra=RedactExtra(keys=tuple(keys), values=tuple(values), arguments=tuple(arguments))
    )


def root_problem(
    root: Path, guarded: Mapping[str, str], never_opened: Mapping[str, str] = _NEVER_OPENED
) -> str | None:
    """Why ``root`` may not be a configuration root, or None.

    The path is checked as written (normalised) and where it really leads, so a
    link named like a configuration tree does not smuggle in ``/``.
    """
    spellings = [os.path.normpath(str(root))]
    real = os.path.realpath(root)
    if real not in spellings:
        spellings.append(real)
    for path in spellings:
        shown = str(root) if path == spellings[0] else f"{root} (really {path})"
        if path == "/":
            return f"{shown} is the whole machine; list configuration trees such as /etc/asterisk"
        for tree, what in {**guarded, **never_opened}.items():
            if path == tree:
                return f"{shown} holds {what}: it is never a configuration root"
            if path.startswith(tree + "/"):
                return f"{shown} lies inside {tree} ({what}): it is never a configuration root"
            if tree in guarded and tree.startswith(path + "/"):
                return (
                    f"{shown} contains {tree} ({what}); list the configuration trees "
                    "themselves, such as /etc/asterisk"
                )
    return None


def parse_settings(sec: Section, *, guarded: Mapping[str, str] | None = None) -> SnapshotSettings:
    """Validate ``collectors.config``; ``guarded`` adds trees of this installation
    (state and runtime folders, the CDR file) to :data:`GUARDED_TREES`."""
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
        redact=_redact(sec),
    )
    trees = {**GUARDED_TREES, **(guarded or {})}
    for root in s.roots:
        if root.is_absolute():
            why = root_problem(root, trees)
            if why is not None:
                sec.problem("roots", why)
    for key in ("include", "exclude"):
        for pattern in getattr(s, key):
            try:
                glob_regex(pattern)
            except re.error as exc:
                sec.problem(key, f"invalid glob {pattern!r}: {exc}")
    sec.finish()
    return s
