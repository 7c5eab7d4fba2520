"""``agentctl snapshot``: see exactly what a configuration snapshot would send, locally.

``--dry-run`` prints the bodies the collector would offer to the gate now (the
JSON as sent, then the decoded redacted content); ``--diff`` shows what changed
since the last snapshot that was delivered. Both work without the daemon and
never change the collector's state: the state file is opened read-only, and
when no fingerprint key exists yet a throwaway one is used (and said so).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``snapshot`` subcommand."""
    p = sub.add_parser("snapshot", help="show what a configuration snapshot would send")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--dry-run",
        action="store_true",
        help="print exactly what would be sent now, with the content decoded",
    )
    what.add_argument(
        "--diff", action="store_true", help="show what changed since the last snapshot sent"
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="with --dry-run: a full snapshot, as the NOC's collect command sends",
    )
    p.add_argument(
        "--no-content",
        action="store_true",
        help="with --dry-run: print the bodies only, not the decoded content",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the plan read-only and print it."""
    from agent.collectors.pbxconfig import snapshot
    from agent.config import load

    config = load(args.config)
    settings = config.collectors.config
    state_dir = config.paths.state_dir
    store = snapshot.Store(state_dir / snapshot.STATE_DB, readonly=True)
    try:
        key, ephemeral = snapshot.load_key(state_dir, create=False)
        if ephemeral:
            print(
                "agentctl: no fingerprint key yet in the state folder: markers use a "
                "throwaway key and will differ from those sent",
                file=sys.stderr,
            )
        plan = snapshot.scan(settings, store, key, ephemeral_key=ephemeral)
        snapshot.decide(plan, store, settings, full=bool(args.full), now=time.time())
        if args.diff:
            return _print_diff(plan, store)
        return _print_dry_run(plan, show_content=not args.no_content)
    finally:
        store.close()


def _print_dry_run(plan: Any, *, show_content: bool) -> int:
    from agent.collectors.pbxconfig import snapshot

    out = sys.stdout
    if plan.mode == "unchanged":
        out.write(
            f"unchanged since snapshot {plan.base}: nothing would be sent "
            f"({plan.files_scanned} files scanned)\n"
        )
        return 0
    out.write(
        f"# {plan.mode} snapshot, {len(plan.bodies)} part(s), "
        f"{len(plan.texts)} file(s) with content\n"
    )
    for body in plan.bodies:
        wire = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        out.write(
            f"\n## part {body['part']}/{body['parts']}: body as offered to the gate "
            f"({len(wire.encode())} bytes)\n"
        )
        out.write(wire + "\n")
    if show_content:
        for body in plan.bodies:
            for path, text in snapshot.decode_content(body).items():
                out.write(f"\n## decoded content of {path} (part {body['part']})\n")
                out.write(text if text.endswith("\n") or not text else text + "\n")
    return 0


def _print_diff(plan: Any, store: Any) -> int:
    import difflib

    out = sys.stdout
    if plan.base is None:
        out.write("no snapshot has been sent yet: the next one is full\n")
    sent = store.sent()
    changed = [p for p in plan.manifest if sent.get(p) != plan.manifest[p]]
    removed = sorted(set(sent) - set(plan.manifest))
    if not changed and not removed:
        out.write(f"no change since snapshot {plan.base}\n")
        return 0
    for path in changed:
        new = plan.manifest[path]
        old = sent.get(path)
        if old is None:
            out.write(f"added    {path} ({new['status']})\n")
            continue
        facts = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        out.write(f"changed  {path} ({', '.join(facts)})\n")
        if "digest" in facts and new["status"] == "ok":
            before = store.sent_text(path) or ""
            after = plan.texts.get(path)
            if after is None:
                r = plan.results.get(path)
                after = (r.text if r is not None else None) or store.cached_text(path) or ""
            out.writelines(
                difflib.unified_diff(
                    before.splitlines(keepends=True),
                    after.splitlines(keepends=True),
                    fromfile=f"{path} (sent)",
                    tofile=f"{path} (now)",
                )
            )
    for path in removed:
        out.write(f"removed  {path}\n")
    return 0
