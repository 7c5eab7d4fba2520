"""``agentctl collect NAME``: run a collector now; ``--show``: here, and print its records.

``--show`` needs no daemon, like ``telegraf --test``: it gathers once in this
process, passes each record through the policy gate's serialisation and prints
the envelopes as the uplink would publish them (one JSON line each), a body
that travels compressed decoded for reading (stderr gives its size on the wire).
Nothing is stored in the outbox, sent, or advanced in a collector's state.

- ``health``: the collector runs here (AMI included, when configured). The
  daemon's own counters (outbox, gate) are not known here: the ``agent`` part
  holds the switch.
- ``config``: the snapshot parts the collector would offer now, scanned with
  its state read-only (as ``agentctl snapshot --dry-run``).
- ``callstats``: the buckets counted and not sent yet, each as it would be
  offered if it closed now, from the collector's state read-only.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from agent.cli.common import load_config

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.policy.classes import Record

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
        help="run it here, once, and print the records exactly as they would be sent "
        "(nothing stored, advanced or sent; no daemon needed)",
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
    """Collect once here and print the envelopes; 65 (and the bodies) when the gate refuses."""
    from agent import switch
    from agent.errors import PolicyRefused
    from agent.policy.gate import Gate

    config = load_config(args)
    from agent import logs

    # stdout carries the records alone; what the collector logs (AMI trouble) goes to stderr.
    logs.configure("warning")
    sw = switch.read_switch(config.paths.state_dir)
    records = {"health": _health, "config": _config, "callstats": _callstats}[args.collector](
        config, sw.word
    )
    if not records:
        print(f"agentctl: {args.collector}: nothing would be sent now", file=sys.stderr)
        return 0
    gate = Gate(policy=config.policy, switch_on=lambda: sw.on, last_seq=0)
    for record in records:
        try:
            envelope = gate.approve(record)
        except PolicyRefused as exc:
            import json

            for r in records:
                print(json.dumps(r.body, separators=(",", ":"), ensure_ascii=False))
            print(f"agentctl: not sent now: {exc}", file=sys.stderr)
            return exc.exit_code
        sys.stdout.write(_readable(envelope.payload) + "\n")
    if config.uplink is None:
        print(
            "agentctl: no uplink configured: the daemon keeps these locally, nothing is sent",
            file=sys.stderr,
        )
    return 0


def _readable(payload: bytes) -> str:
    """The envelope with its body decoded; its size and encoding on the wire to stderr."""
    import json

    from agent.policy.wire import decode_body

    env = json.loads(payload)
    encoding = env.pop("enc", None)
    dictionary = env.pop("zdict", None)
    if encoding is not None:
        env["body"] = decode_body({**env, "enc": encoding, "zdict": dictionary})
    how = f"{encoding}, dictionary {dictionary}" if dictionary else encoding or "plain JSON"
    print(
        f"agentctl: seq {env.get('seq')}: {len(payload)} bytes on the wire ({how})", file=sys.stderr
    )
    return json.dumps(env, separators=(",", ":"), ensure_ascii=False)


def _health(config: AgentConfig, switch_word: str) -> list[Record]:
    """One health record, gathered here (AMI included)."""
    import asyncio

    from agent.collectors.health.collector import HealthCollector

    records: list[Record] = []

    def local_stats() -> dict[str, Any]:
        return {"switch": switch_word}

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
    return records


def _config(config: AgentConfig, switch_word: str) -> list[Record]:
    """The parts of the snapshot the collector would offer now, scanned read-only.

    As ``agentctl snapshot --dry-run`` does: the state file is opened read-only and
    nothing advances; without a fingerprint key yet, a throwaway one is used.
    """
    import time

    from agent.collectors.pbxconfig import snapshot
    from agent.policy.classes import DataClass, Record

    settings = config.collectors.config
    state_dir = config.paths.state_dir
    store = snapshot.Store(state_dir / snapshot.STATE_DB, readonly=True)
    try:
        key, ephemeral = snapshot.load_key(state_dir, create=False)
        if ephemeral:
            print(
                "agentctl: no fingerprint key yet: markers use a throwaway key",
                file=sys.stderr,
            )
        now = time.time()
        scanned = snapshot.scan(settings, store, key, now=now, ephemeral_key=ephemeral)
        out = snapshot.outgoing(scanned, store, settings, full=False, now=now)
        return [Record(DataClass.CONFIG, body) for body in out.bodies(store, now=now)]
    finally:
        store.close()


def _callstats(config: AgentConfig, switch_word: str) -> list[Record]:
    """The buckets counted and not sent yet, each as it would be offered if it closed now.

    From the collector's state, read-only (the daemon reads the CDR source; rows it
    has not read yet are not in them).
    """
    import time

    from agent.cli.cmd_callstats import rows
    from agent.policy.classes import DataClass, Record

    cs = config.collectors.callstats
    found = rows(
        config.paths.state_dir,
        time.time() - cs.max_age,
        bucket_seconds=int(cs.bucket),
        min_count=cs.min_count,
    )
    return [Record(DataClass.CALLSTATS, body) for status, body in found if status == "pending"]
