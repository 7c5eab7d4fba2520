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
from typing import NoReturn

from agent.errors import EX_SOFTWARE, EX_USAGE, AgentError, Refusal

COMMANDS = (
    "run",
    "status",
    "uplink",
    "support",
    "enroll",
    "collect",
    "config",
    "audit",
    "snapshot",
    "callstats",
    "diagnose",
    "version",
    "update",
)


CONFIG_HELP = "configuration file (default: $PBX_AGENT_CONFIG or /etc/pbx-agent/agent.yaml)"


class Parser(argparse.ArgumentParser):
    """argparse with sysexits: a usage error is 64 (EX_USAGE), not argparse's 2.

    Subparsers are made of this class too (``add_subparsers`` uses the parent's
    class), so ``agentctl uplink maybe`` is 64 like ``agentctl --bogus``.
    """

    def error(self, message: str) -> NoReturn:
        """Print the usage and the message, then leave with EX_USAGE."""
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _add_config_option(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("-c", "--config", type=Path, default=default, help=CONFIG_HELP)


def _config_everywhere(parser: argparse.ArgumentParser) -> None:
    """``-c FILE`` after any subcommand too (``agentctl status -c FILE``).

    Below the top level its default is SUPPRESS, so a subcommand that is not
    given ``-c`` leaves the top level's value (or default) alone.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                _add_config_option(child, argparse.SUPPRESS)
                _config_everywhere(child)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``agentctl`` argument parser."""
    from agent import __version__

    parser = Parser(
        prog="agentctl",
        description="Control the pbx-agent daemon on this PBX.",
        epilog="Exit status follows sysexits(3): 0 ok, 64 usage, 65 data (a broken ledger "
        "chain, a record the gate refuses), 66 ledger entries lost, 69 daemon not running, "
        "70 internal error, 73 state unusable, 75 try again later, 77 permission denied, "
        "78 bad configuration.",
    )
    _add_config_option(
        parser, Path(os.environ.get("PBX_AGENT_CONFIG", "/etc/pbx-agent/agent.yaml"))
    )
    parser.add_argument(
        "--version", action="version", version=f"agentctl (pbx-agent) {__version__}"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        # Every command is listed here and has its module: a missing one is a bug to see.
        importlib.import_module(f"agent.cli.cmd_{name}").register(sub)
    _config_everywhere(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``agentctl`` console script; returns a sysexits code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and --version: 0; a usage error: 64 (Parser.error)
        return exc.code if isinstance(exc.code, int) else EX_USAGE
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
    except Exception:  # the last resort: a bug gets 70 (EX_SOFTWARE) and its traceback
        import traceback

        traceback.print_exc()
        print("agentctl: internal error (a bug; the traceback above says where)", file=sys.stderr)
        return EX_SOFTWARE
    return code


def fail_usage(message: str) -> int:
    """Print a usage error and return EX_USAGE."""
    print(f"agentctl: {message}", file=sys.stderr)
    return EX_USAGE
