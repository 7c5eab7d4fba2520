"""Helpers shared by agentctl's commands: loading the configuration, times, sizes."""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from agent.errors import EX_USAGE, AgentError

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.paths import Paths


class UsageError(AgentError):
    """A command-line argument is wrong."""

    exit_code = EX_USAGE


def load_config(args: argparse.Namespace) -> AgentConfig:
    """The configuration named by ``-c``; raises ConfigError (exit 78) when it is bad."""
    from agent.config import load

    return load(args.config)


def load_paths(args: argparse.Namespace) -> Paths:
    """The state and runtime folders, even when the rest of the configuration is broken.

    ``agentctl status`` and ``uplink off`` must work while an administrator is
    in the middle of editing the file; ``agentctl config check`` reports the rest.
    """
    import sys

    from agent.paths import read_paths

    paths, warning = read_paths(args.config)
    if warning is not None:
        print(f"agentctl: warning: {warning}", file=sys.stderr)
    return paths


def parse_since(text: str, now: float | None = None) -> float:
    """``--since``: a duration back from ``now`` (``1h``, ``2d``) or an ISO date/time.

    An ISO time without an offset is local time. Anything else is a usage error
    (exit 64) that shows the value.
    """
    from agent.confreader import parse_duration

    seconds = parse_duration(text)
    if seconds is not None:
        return (time.time() if now is None else now) - seconds
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--since: expected a duration such as 1h or 2d, or an ISO date such "
            f"as 2026-11-28T10:00, got {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()
    return when.timestamp()


def ago(ts: float | None, now: float | None = None) -> str:
    """``'12s ago'``, ``'3m ago'``; ``'never'`` for None."""
    if ts is None:
        return "never"
    return f"{span((now or time.time()) - ts)} ago"


def span(seconds: float) -> str:
    """A short human duration: ``45s``, ``3m``, ``2h 5m``, ``3d 4h``."""
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def when(ts: float | None) -> str:
    """Local time, to the second, or ``'-'``."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def user(uid: int | None) -> str:
    """``'root (uid 0)'``; ``'uid 1234'`` for a uid this box has no name for."""
    if uid is None:
        return "-"
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def size(n: float) -> str:
    """Bytes in binary units: ``512 B``, ``1.2 KiB``, ``3.4 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
