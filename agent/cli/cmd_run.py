"""``agentctl run``: the daemon in the foreground (what the systemd unit runs)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``run`` subcommand."""
    p = sub.add_parser("run", help="run the daemon in the foreground")
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="override the configuration's log_level",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM; exit 78 on a bad configuration."""
    from agent.daemon import run as run_daemon

    return run_daemon(args.config, args.log_level)
