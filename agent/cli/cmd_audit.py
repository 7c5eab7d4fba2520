"""``agentctl audit``: the customer's view of everything that left the box, and its proof.

Reads the ledger straight from the state database (read-only), so it works
whether or not the daemon runs. ``audit verify`` walks the hash chain.
"""

from __future__ import annotations

import argparse
import json

from agent.cli.common import load_paths, parse_since, size, when
from agent.errors import EX_DATAERR


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``audit`` subcommand."""
    p = sub.add_parser("audit", help="show or verify the egress ledger")
    p.add_argument("action", nargs="?", choices=("show", "verify"), default="show")
    p.add_argument("--since", help="only entries since a duration ago (1h, 2d) or an ISO time")
    p.add_argument("--class", dest="data_class", help="only deliveries of this data class")
    p.add_argument(
        "--kind",
        choices=("delivered", "switch", "command", "dropped", "reset"),
        help="only entries of this kind",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the ledger, or verify it (exit 65 if the chain is broken)."""
    from agent import ledger
    from agent.store import open_readonly

    paths = load_paths(args)
    conn = open_readonly(paths.state_dir)
    try:
        if args.action == "verify":
            verdict = ledger.verify(conn)
            if args.json:
                print(
                    json.dumps(
                        {
                            "ok": verdict.ok,
                            "entries": verdict.entries,
                            "broken_at": verdict.broken_at,
                            "reason": verdict.reason,
                            "head": verdict.head,
                        }
                    )
                )
            elif verdict.ok:
                print(f"ledger ok: {verdict.entries} entries, chain intact")
                if verdict.head:
                    # Noting this lets a customer detect a later rewrite of the whole chain.
                    print(f"head: entry {verdict.entries} {verdict.head}")
            else:
                print(
                    f"ledger BROKEN at entry {verdict.broken_at}: {verdict.reason} "
                    f"({verdict.entries} entries before it are intact)"
                )
            return 0 if verdict.ok else EX_DATAERR
        since = parse_since(args.since) if args.since else None
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
                text = " ".join(f"{k}={v}" for k, v in d.items())
            print(f"{e.n:>7}  {when(e.ts)}  {e.kind:<9}  {text}")
        if not args.json:
            print(f"-- {count} entries; {size(total)} delivered in them")
    finally:
        conn.close()
    return 0
