"""``agentctl config check [FILE]``: validate a configuration and print what takes effect.

Besides the file itself (:func:`agent.config.load`), the check runs what would
fail only at run time (:func:`agent.preflight.check`: the uplink's TLS files,
judged for the user the service runs as); ``--syntax-only`` skips that part,
e.g. to check a file meant for another box.
"""

from __future__ import annotations

import argparse
import enum
import sys
from pathlib import Path
from typing import Any

from agent.errors import EX_CONFIG, ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``config`` subcommand."""
    p = sub.add_parser("config", help="check the configuration")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = csub.add_parser("check", help="validate and print the effective configuration")
    check.add_argument(
        "file", nargs="?", type=Path, help="file to check (default: the -c/--config file)"
    )
    check.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    check.add_argument(
        "--syntax-only",
        action="store_true",
        help="check the file alone, not the files and folders it names on this box",
    )
    check.add_argument(
        "--user",
        metavar="NAME",
        help="judge file access for this user (default: pbx-agent where it exists, else you)",
    )
    check.set_defaults(func=run_check)


def plain(value: Any) -> Any:
    """Dataclasses, paths, enums and sets as plain YAML-able values."""
    import dataclasses  # with inspect, ~20 ms: keep it off every agentctl start

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, frozenset | set):
        return sorted(plain(v) for v in value)
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def run_check(args: argparse.Namespace) -> int:
    """Exit 0 and print the effective configuration, or 78 and every problem."""
    import yaml

    from agent.config import load
    from agent.logs import mask_secrets

    path: Path = args.file or args.config
    try:
        config = load(path)
        if not args.syntax_only:
            from agent import preflight

            user = preflight.service_user(args.user)
            found = preflight.check(config, user=user)
            if found:
                print(f"(run-time checks for {user})", file=sys.stderr)
                raise ConfigError(found)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{path}: {len(exc.problems)} problem(s); nothing was changed", file=sys.stderr)
        return EX_CONFIG
    if not args.quiet:
        data = plain(config)
        data.pop("source", None)
        cs = data["collectors"]["callstats"]
        if cs.get("mariadb"):
            cs["mariadb"] = mask_secrets(None, "", {"v": cs["mariadb"]})["v"]
        print(f"# effective configuration from {path}")
        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), end="")
    print(f"{path}: ok", file=sys.stderr)
    return 0
