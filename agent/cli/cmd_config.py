"""``agentctl config check [FILE]``: validate a configuration and print what takes effect.

Besides the file itself (:func:`agent.config.load`), the check runs what would
fail only at run time (:func:`agent.preflight.check`: the uplink's TLS files,
judged for the user the service runs as); ``--syntax-only`` skips that part,
e.g. to check a file meant for another box.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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


def run_check(args: argparse.Namespace) -> int:
    """Exit 0 and print the effective configuration, or 78 and every problem."""
    from agent.config import load

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
        from agent.cli.effective import to_yaml

        # Valid agent.yaml: fed back to `config check`, it gives this same configuration.
        print(f"# effective configuration from {path} (defaults included; passwords masked)")
        print(to_yaml(config), end="")
    if config.uplink is not None and not args.syntax_only:
        # Not an error (a box may report without taking commands), but the operator should know.
        from agent.uplink.signing import load_root

        try:
            load_root(config.uplink.command_root)
        except ValueError as exc:
            print(f"note: uplink.command_root: {exc}: every NOC command will be refused",
                  file=sys.stderr)  # fmt: skip
    print(f"{path}: ok", file=sys.stderr)
    return 0
