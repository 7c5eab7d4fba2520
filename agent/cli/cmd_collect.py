"""``agentctl collect NAME``: run a collector now instead of at its next interval."""

from __future__ import annotations

import argparse

from agent.cli.common import load_paths


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``collect`` subcommand."""
    p = sub.add_parser("collect", help="run a collector now (health, config, callstats)")
    p.add_argument("collector", help="the collector's name, as agentctl status lists it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Ask the daemon to run the collector; it runs in the background."""
    from agent import control

    result = control.request(load_paths(args).control_socket, "collect", collector=args.collector)
    print(f"collecting: {result['triggered']} (see agentctl status)")
    return 0
