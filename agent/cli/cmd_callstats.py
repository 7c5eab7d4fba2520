"""``agentctl callstats``: the call statistics exactly as they are (or would be) sent.

The customer's view of the promise: for every bucket, the body that was
offered to the gate (``sent``, ``refused`` by the switch or policy, or ``local``:
kept locally because no uplink is configured) or, for a
bucket still open or awaiting a revision, the body that would be offered if it
closed now, rendered by the same code the collector uses. The state file is
opened read-only; nothing is advanced.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

WIDTH = 30


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``callstats`` subcommand."""
    p = sub.add_parser(
        "callstats",
        help="show the call statistics that are (or would be) sent",
        description="Show per-bucket call statistics exactly as they are, or would be, sent.",
    )
    p.add_argument(
        "--since",
        default="24h",
        metavar="DURATION_OR_ISO",
        help="how far back: a duration such as 2h or 7d, or an ISO time (default: 24h)",
    )
    p.add_argument("--json", action="store_true", help="print the bodies as JSON lines")
    p.set_defaults(func=run)


def rows(
    state_dir: Path, since: float, *, bucket_seconds: int, min_count: int
) -> list[tuple[str, dict[str, Any]]]:
    """(status, body) per bucket from ``since`` on, oldest first.

    Offered buckets show the body stored when they were offered; the others are
    rendered with the configured bucket size and ``min_count``, as they would be.
    """
    from agent.collectors.callstats.aggregate import render
    from agent.collectors.callstats.store import STATE_FILE, CallstatsStore

    path = state_dir / STATE_FILE
    if not path.exists():
        return []
    store = CallstatsStore(path, readonly=True)
    try:
        out: list[tuple[str, dict[str, Any]]] = []
        start = int(since)
        for r in store.since(start - start % 60):
            if r.status.offered and r.body is not None:
                out.append((r.status, r.body))
            else:
                body = render(
                    r.bucket,
                    bucket_seconds=bucket_seconds,
                    revision=r.revision + 1,
                    min_count=min_count,
                )
                out.append(("pending", body))
        return out
    finally:
        store.close()


def _fmt_start(iso: str) -> str:
    when = dt.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    return when.astimezone().strftime("%Y-%m-%d %H:%M")


def table(items: list[tuple[str, dict[str, Any]]], min_count: int) -> str:
    """The human view: one line per bucket and a bar of calls."""
    most = max((b.get("calls", 0) for _, b in items), default=0) or 1
    head = (
        f"{'bucket (local)':<16} {'rev':>3} {'status':<8} {'calls':>6} {'answ':>5} "
        f"{'ASR':>5} {'ACD':>6} {'peak':>4} {'in':>4} {'out':>4} {'int':>4}  chart"
    )
    lines = [head, "-" * len(head)]
    for status, b in items:
        start = _fmt_start(b["bucket_start"])
        if b.get("folded"):
            lines.append(
                f"{start:<16} {b['revision']:>3} {status:<8} {'<' + str(min_count):>6} "
                f"{'':>5} {'':>5} {'':>6} {'':>4} {'':>4} {'':>4} {'':>4}  ·"
            )
            continue
        d = b.get("by_direction", {})
        asr = "" if b.get("asr") is None else f"{b['asr'] * 100:.0f}%"
        acd = "" if b.get("acd") is None else f"{b['acd']:.0f}s"
        answered = "" if b.get("answered") is None else str(b["answered"])
        bar = "█" * max(1, round(WIDTH * b["calls"] / most))
        lines.append(
            f"{start:<16} {b['revision']:>3} {status:<8} {b['calls']:>6} {answered:>5} "
            f"{asr:>5} {acd:>6} {b['peak_concurrent']:>4} {d.get('inbound', ''):>4} "
            f"{d.get('outbound', ''):>4} {d.get('internal', ''):>4}  {bar}"
        )
    lines.append("")
    lines.append(
        f"{len(items)} bucket(s). Categories under {min_count} calls are folded into "
        "'other'; a bucket under that shows no counters. 'pending': not closed yet, "
        "shown as it would be sent. 'local': kept locally (no uplink), never queued or sent."
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the buckets since ``--since`` as a table (or JSON lines)."""
    from agent import config as config_mod
    from agent.cli.common import parse_since

    cfg = config_mod.load(args.config)
    cs = cfg.collectors.callstats
    since = parse_since(args.since)
    items = rows(cfg.paths.state_dir, since, bucket_seconds=int(cs.bucket), min_count=cs.min_count)
    if args.json:
        for status, body in items:
            print(json.dumps({"status": status, "body": body}, sort_keys=True))
        return 0
    if not items:
        print(
            f"No call statistics since {dt.datetime.fromtimestamp(since):%Y-%m-%d %H:%M} "
            f"(source: {cs.source_label()})."
        )
        return 0
    if cfg.uplink is None:
        print(
            "No uplink configured (local only): nothing leaves this box; closed buckets are "
            "kept locally (status 'local'), never queued for sending.\n"
        )
    print(table(items, cs.min_count))
    return 0
