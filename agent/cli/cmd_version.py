"""``agentctl version``: the agent's and its key dependencies' versions."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``version`` subcommand."""
    p = sub.add_parser("version", help="print versions")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print one ``name version`` line per component."""
    from agent.version import versions

    for name, version in versions().items():
        print(f"{name} {version}")
    return 0
