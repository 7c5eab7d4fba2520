"""``agentctl``: the local command line of pbx-agent.

Each subcommand lives in its own module ``agent.cli.cmd_<name>`` with a
``register(subparsers)`` function that adds its parser and sets ``func`` to a
handler ``(args) -> int``. Command modules import only what parsing needs; the
handlers import the heavy parts (asyncio, structlog, psutil) when they run, so
``agentctl status`` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.errors import EX_USAGE, AgentError, Refusal

COMMANDS = (
    "run",
    "status",
    "uplink",
    "support",
    "collect",
    "config",
    "audit",
    "snapshot",
    "callstats",
    "version",
)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``agentctl`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="agentctl",
        description="Control the pbx-agent daemon on this PBX.",
    )
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=Path(os.environ.get("PBX_AGENT_CONFIG", "/etc/pbx-agent/agent.yaml")),
        help="configuration file (default: $PBX_AGENT_CONFIG or /etc/pbx-agent/agent.yaml)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        # Every command is listed here and has its module: a missing one is a bug to see.
        importlib.import_module(f"agent.cli.cmd_{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``agentctl`` console script; returns a sysexits code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except (AgentError, Refusal) as exc:
        print(f"agentctl: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `agentctl audit | head`: the reader went away; that is not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return code


def fail_usage(message: str) -> int:
    """Print a usage error and return EX_USAGE."""
    print(f"agentctl: {message}", file=sys.stderr)
    return EX_USAGE
