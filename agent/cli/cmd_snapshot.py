"""``agentctl snapshot``: see exactly what a configuration snapshot would send, locally.

``--dry-run`` prints the bodies the collector would offer to the gate now (the
JSON as sent, then the decoded redacted content); with ``--explain`` it also
lists, per file, which rule masked something on which line (rule id, line and
the name that made it fire, never the value), so an administrator can see why
a line was masked and write a local rule; ``--diff`` shows what changed since
the last snapshot that was delivered. Both work without the daemon and
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
    p.add_argument(
        "--explain",
        action="store_true",
        help="with --dry-run: per file, which rule fired on which line (never the value)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Scan read-only and print what would be sent, or what changed."""
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
        explain = bool(args.explain) and not args.diff
        now = time.time()
        scanned = snapshot.scan(
            settings, store, key, now=now, ephemeral_key=ephemeral, explain=explain
        )
        if args.diff:
            return _print_diff(scanned, store)
        out = snapshot.outgoing(scanned, store, settings, full=bool(args.full), now=now)
        code = _print_dry_run(out, store, now=now, show_content=not args.no_content)
        if explain:
            _print_explain(scanned)
        return code
    finally:
        store.close()


def _print_dry_run(out: Any, store: Any, *, now: float, show_content: bool) -> int:
    from agent.collectors.pbxconfig import parts

    w = sys.stdout
    base = f" against {out.base}" if out.mode == parts.SnapshotMode.DELTA else ""
    w.write(f"# {out.mode} snapshot{base}, {out.scan.files_scanned} files scanned\n")
    pieces: dict[str, bytearray] = {}
    for body in out.bodies(store, now=now):
        wire = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        last = f" of {body['parts']}" if "parts" in body else ""
        w.write(
            f"\n## part {body['part']}{last}: body as offered to the gate "
            f"({len(wire.encode())} bytes)\n"
        )
        w.write(wire + "\n")
        if not show_content:
            continue
        for path, text in parts.decode_content(body).items():
            _print_text(w, path, text, body["part"])
        chunk = parts.decode_chunk(body)
        if chunk is not None:
            path, _, final, data = chunk
            pieces.setdefault(path, bytearray()).extend(data)
            if final:
                _print_text(w, path, pieces.pop(path).decode("utf-8"), body["part"])
    if out.mode == parts.SnapshotMode.UNCHANGED:
        w.write(f"unchanged since snapshot {out.base}: nothing would be sent\n")
        return 0
    w.write(f"\n# {out.parts} part(s), {out.files_sent} file(s) with content\n")
    return 0


def _print_explain(scanned: Any) -> None:
    """Per file, each rule that fired with its line; values never appear."""
    w = sys.stdout
    w.write("\n# explain: the rules that masked something, by file and line\n")
    for path in sorted(scanned.findings):
        w.write(f"\n{path}\n")
        for f in sorted(scanned.findings[path], key=lambda f: (f.line, f.rule)):
            why = f" ({f.why})" if f.why else ""
            where = f"line {f.line}" if f.line else "the whole file"
            w.write(f"  {where}: {f.rule}{why}\n")
    if not scanned.findings:
        w.write("no rule fired: nothing was masked\n")


def _print_text(w: Any, path: str, text: str, part: int) -> None:
    w.write(f"\n## decoded content of {path} (part {part})\n")
    w.write(text if text.endswith("\n") or not text else text + "\n")


def _print_diff(scanned: Any, store: Any) -> int:
    import difflib

    w = sys.stdout
    base = store.meta().get("snapshot_id")
    if base is None:
        w.write("no snapshot has been sent yet: the next one is full\n")
    changes = 0
    for path, entry, status, old, _ in store.against_sent(full=False):
        if old == entry:
            continue
        new = json.loads(entry)
        before = json.loads(old) if old is not None else None
        if before == new:
            continue
        changes += 1
        if before is None:
            w.write(f"added    {path} ({status})\n")
            continue
        facts = [k for k in sorted(set(before) | set(new)) if before.get(k) != new.get(k)]
        w.write(f"changed  {path} ({', '.join(facts)})\n")
        if "digest" in facts and status == "ok":
            w.writelines(
                difflib.unified_diff(
                    (store.sent_text(path) or "").splitlines(keepends=True),
                    store.content(path).splitlines(keepends=True),
                    fromfile=f"{path} (sent)",
                    tofile=f"{path} (now)",
                )
            )
    for path in store.gone_since_sent():
        changes += 1
        w.write(f"removed  {path}\n")
    if not changes:
        w.write(f"no change since snapshot {base}\n")
    return 0
