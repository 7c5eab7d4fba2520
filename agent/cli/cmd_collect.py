"""``agentctl collect NAME``: run a collector now; ``--show``: here, and print its record.

``agentctl collect health --show`` needs no daemon: it builds the health
collector from the configuration, runs it once in this process (AMI included,
when configured), passes the record through the policy gate's serialisation and
prints the envelope exactly as the uplink would publish it. Nothing is stored
in the outbox or sent. The daemon's own counters (outbox, gate) are not known
here: the ``agent`` part holds this process's figures and the switch.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from agent.cli.common import UsageError, load_config

if TYPE_CHECKING:
    from agent.policy.classes import Record

SHOWABLE = ("health",)
#: agent.collectors.registry.NAMES, repeated so that parsing imports no collector code
#: (tests/test_cli.py checks they agree). An unknown name is a usage error (64),
#: daemon or not.
COLLECTORS = ("health", "config", "callstats")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``collect`` subcommand."""
    p = sub.add_parser("collect", help="run a collector now (health, config, callstats)")
    p.add_argument("collector", choices=COLLECTORS, help="the collector to run")
    p.add_argument(
        "--show",
        action="store_true",
        help="run it here, once, and print the record exactly as it would be sent "
        "(nothing stored or sent; no daemon needed; health only)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Ask the daemon to run the collector, or run it here with ``--show``."""
    if args.show:
        return show(args)
    from agent import control
    from agent.cli.common import load_paths

    result = control.request(load_paths(args).control_socket, "collect", collector=args.collector)
    print(f"collecting: {result['triggered']} (see agentctl status)")
    return 0


def show(args: argparse.Namespace) -> int:
    """Collect once here and print the envelope; 65 (and the body) when the gate refuses."""
    import asyncio

    from agent import switch
    from agent.collectors.health.collector import HealthCollector
    from agent.errors import PolicyRefused
    from agent.policy.gate import Gate

    if args.collector not in SHOWABLE:
        raise UsageError(
            f"--show runs {', '.join(SHOWABLE)}; for the configuration use "
            "`agentctl snapshot --dry-run`, for call statistics `agentctl callstats`"
        )
    from agent import logs

    config = load_config(args)
    # stdout carries the record alone; what the collector logs (AMI trouble) goes to stderr.
    logs.configure("warning")
    sw = switch.read_switch(config.paths.state_dir)
    records: list[Record] = []

    def local_stats() -> dict[str, Any]:
        return {"switch": sw.word}

    def keep(record: Record) -> bool:
        records.append(record)
        return True

    async def once() -> None:
        collector = HealthCollector(
            config.collectors.health,
            local_stats,
            state_dir=config.paths.state_dir,
            trunk_rules=config.collectors.callstats,
        )
        try:
            await collector.collect(keep, reason="command")
        finally:
            await collector.aclose()

    asyncio.run(once())
    gate = Gate(policy=config.policy, switch_on=lambda: sw.on, last_seq=0)
    (record,) = records
    try:
        envelope = gate.approve(record)
    except PolicyRefused as exc:
        import json

        print(json.dumps(record.body, separators=(",", ":"), ensure_ascii=False))
        print(f"agentctl: not sent now: {exc}", file=sys.stderr)
        return exc.exit_code
    sys.stdout.write(envelope.payload.decode() + "\n")
    return 0
