"""``agentctl audit``: the customer's view of everything that left the box, and its proof.

Reads the ledger straight from the state database (read-only), so it works
whether or not the daemon runs. ``audit verify`` walks the hash chain.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from agent.cli.common import load_paths, parse_since, size, user, when
from agent.errors import EX_DATAERR, EX_NOINPUT

if TYPE_CHECKING:
    import sqlite3


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``audit`` subcommand."""
    p = sub.add_parser("audit", help="show or verify the egress ledger")
    p.add_argument("action", nargs="?", choices=("show", "verify"), default="show")
    p.add_argument("--since", help="only entries since a duration ago (1h, 2d) or an ISO time")
    p.add_argument("--class", dest="data_class", help="only deliveries of this data class")
    p.add_argument(
        "--kind",
        choices=(
            "delivered",
            "switch",
            "command",
            "dropped",
            "reset",
            "support",
            "enroll",
            "renew",
        ),
        help="only entries of this kind",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the ledger, or verify it (exit 65 if the chain is broken, 66 if entries were lost)."""
    from agent import ledger
    from agent.errors import StateError
    from agent.store import open_readonly

    paths = load_paths(args)
    since = parse_since(args.since) if args.since else None  # a usage error before any I/O
    try:
        conn = open_readonly(paths.state_dir)
    except StateError as exc:
        if args.action == "verify":
            return _verify_without_database(exc, paths.state_dir)
        raise
    try:
        if args.action == "verify":
            return _verify(conn, paths.state_dir, json_out=args.json)
        total, count = 0, 0
        for e in ledger.read(conn, since=since, kind=args.kind, data_class=args.data_class):
            count += 1
            if args.json:
                print(json.dumps({"n": e.n, "ts": e.ts, "kind": e.kind, **e.data, "hash": e.hash}))
                continue
            d = e.data
            if e.kind == "delivered":
                total += d["size"]
                text = (
                    f"{d['class']:<10} seq {d['seq']:<8} {size(d['size']):>10}  id {d['id']}"
                    f"  sha256 {d['sha256'][:16]}…"
                )
            else:
                text = " ".join(f"{k}={_shown(k, v)}" for k, v in d.items())
            if count == 1:
                print(f"{'entry':>7}  {'time (local)':<19}  {'kind':<9}  what")
            print(f"{e.n:>7}  {when(e.ts)}  {e.kind:<9}  {text}")
        if not args.json:
            print(f"-- {count} entries; {size(total)} delivered in them")
    finally:
        conn.close()
    return 0


def _shown(key: str, value: object) -> object:
    """A ledger field for people: times as local times, uids with their user's name."""
    if key in ("at", "since", "until", "opened_at") and isinstance(value, int | float):
        return when(value).replace(" ", "T")
    if key == "uid" and isinstance(value, int):
        name = user(value)
        return f"{name.split()[0]}({value})" if not name.startswith("uid ") else value
    return value


def _verify(conn: sqlite3.Connection, state_dir: Path, *, json_out: bool) -> int:
    """Walk the chain; 0 intact, 65 broken, 66 intact only since a reset (entries lost).

    The anchor is compared too: a database replaced while the daemon was stopped
    has a chain of its own that verifies, but not the head the agent last wrote.
    """
    from agent import anchor, ledger
    from agent.store import database_id

    verdict = ledger.verify(conn)
    loss = anchor.check(
        conn, anchor.read_anchor(state_dir), db_id=database_id(conn), created=False, moved=None
    )
    if json_out:
        print(
            json.dumps(
                {
                    "ok": verdict.ok,
                    "entries": verdict.entries,
                    "broken_at": verdict.broken_at,
                    "reason": verdict.reason,
                    "head": verdict.head,
                    "lost": verdict.lost or loss is not None,
                    "unrecorded_loss": loss.reason if loss else None,
                    "resets": [
                        {"n": e.n, "ts": e.ts, **e.data, "text": ledger.describe_reset(e)}
                        for e in verdict.resets
                    ],
                }
            )
        )
    elif not verdict.ok:
        print(
            f"ledger BROKEN at entry {verdict.broken_at}: {verdict.reason} "
            f"({verdict.entries} entries before it are intact)"
        )
    elif verdict.resets:
        last = verdict.resets[-1]
        print(
            f"ledger chain intact since reset at entry {last.n} ({verdict.entries} entries); "
            "state was LOST before it:"
        )
        for e in verdict.resets:
            print(f"  {ledger.describe_reset(e)}")
    elif loss is None:
        print(f"ledger ok: {verdict.entries} entries, chain intact")
    if verdict.ok and loss is not None and loss.last is not None and not json_out:
        mark = loss.last  # check() reports a loss only against an anchor
        print(
            f"ledger chain intact ({verdict.entries} entries) but it is NOT the one this agent "
            f"last wrote: {loss.reason}. The last head recorded outside the database "
            f"(anchor) was entry {mark.ledger_n}, hash {mark.ledger_hash}, last seq {mark.seq}"
        )
    if verdict.ok and verdict.head and not json_out:
        # Noting this lets a customer detect a later rewrite of the whole chain.
        print(f"head: entry {verdict.entries} {verdict.head}")
    if not verdict.ok:
        return EX_DATAERR
    return EX_NOINPUT if verdict.lost or loss is not None else 0


def _verify_without_database(exc: Exception, state_dir: Path) -> int:
    """No readable database: a loss if the anchor says there was a ledger, else the error."""
    from agent.anchor import read_anchor

    last = read_anchor(state_dir)
    if last is None or last.ledger_n == 0:
        raise exc
    print(
        f"ledger LOST: {exc}. The last head recorded outside the database (anchor) was "
        f"entry {last.ledger_n}, hash {last.ledger_hash}, last seq {last.seq}, "
        f"{last.queued} envelopes queued"
    )
    return EX_NOINPUT
