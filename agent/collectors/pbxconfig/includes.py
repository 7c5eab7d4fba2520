"""Includes of a scanned tree: every ``#include`` resolved without opening anything.

Each include, glob or not, is resolved against the scan's own rows (indexed
look-ups in the ``scan`` table): a target in a forbidden tree or outside the
roots is refused and reported, a missing one reported, loops found. Nothing is
read here that the walk did not already read.
"""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING, Any

from agent.collectors.pbxconfig.parts import canonical
from agent.collectors.pbxconfig.sources import (
    PathPolicy,
    glob_regex,
)

if TYPE_CHECKING:
    from agent.collectors.pbxconfig.scan import Scan
    from agent.collectors.pbxconfig.state import Store

#: An entry lists its include directives up to this many bytes of JSON, then counts the rest.
MAX_NOTES_BYTES = 32 * 1024
_GLOB_CHARS = re.compile(r"[*?\[]")


def check_includes(policy: PathPolicy, store: Store, out: Scan) -> None:
    """Resolve every include without opening anything; note refusals, misses and loops.

    Each file's notes are added to its manifest entry; the include graph is kept
    in memory only for the files that have includes (to find loops).
    """
    edges: dict[str, list[str]] = {}
    indexed = False
    for path, entry_text, includes_text in store.with_includes():
        if not indexed:
            store.index_real()
            indexed = True
        root = next(
            (str(rt) for rt in policy.roots if path == str(rt) or path.startswith(str(rt) + "/")),
            os.path.dirname(path),
        )
        base_dir = root if os.path.isdir(root) else os.path.dirname(root)
        notes: list[dict[str, Any]] = []
        omitted = 0
        size = 0
        for directive, argument, line in json.loads(includes_text):
            if directive == "exec":
                note: dict[str, Any] = {
                    "directive": "exec",
                    "line": line,
                    "status": "recorded, not run",
                }
            elif directive in ("include", "tryinclude"):
                target = argument if argument.startswith("/") else os.path.join(base_dir, argument)
                target = os.path.normpath(target)
                status, found = _resolve(policy, target, store)
                note = {"directive": directive, "line": line, "target": target, "status": status}
                edges.setdefault(path, []).extend(found)
                if status in ("forbidden", "outside-roots"):
                    out.problem(
                        {
                            "path": path,
                            "line": line,
                            "problem": f"#{directive} {target} refused: {status}",
                        }
                    )
                elif status == "missing" and directive == "include":
                    out.problem(
                        {"path": path, "line": line, "problem": f"#include {target}: no such file"}
                    )
            else:
                continue
            size += len(canonical(note).encode("utf-8")) + 1
            if size > MAX_NOTES_BYTES:
                omitted += 1
                continue
            notes.append(note)
        entry = json.loads(entry_text)
        entry["includes"] = notes
        if omitted:
            entry["includes_omitted"] = omitted
        store.note(path, canonical(entry))
    if indexed:
        store.apply_notes()
    for path, cycle in _loops(edges):
        out.problem({"path": path, "problem": "include loop: " + " -> ".join(cycle)})


def _resolve(policy: PathPolicy, target: str, store: Store) -> tuple[str, list[str]]:
    magic = _GLOB_CHARS.search(target)
    prefix = target[: magic.start()] if magic else target
    prefix_dir = prefix if magic is None else (os.path.dirname(prefix) or "/")
    # Checked lexically first: a forbidden tree is refused without touching it.
    if policy.is_forbidden(prefix_dir) or policy.is_forbidden(target):
        return "forbidden", []
    if magic is not None:
        rx = glob_regex(target)
        hits = [(p, st) for p, st in store.scanned_under(prefix) if rx.match(p)]
        if not hits:
            why = policy.check(prefix_dir)
            return (why or "missing"), []
        ok = [p for p, st in hits if st == "ok"]
        return ("ok" if ok else "skipped"), ok
    why = policy.check(target)
    if why is not None:
        return why, []
    row = store.scanned(target)
    if row is None:
        at = store.ok_at(os.path.realpath(target))
        return ("ok", [at]) if at is not None else ("missing", [])
    status, reason, link_target = row
    if status == "link":
        at = store.ok_at(link_target or "")
        return ("ok", [at]) if at is not None else ("skipped", [])
    if status == "ok":
        return "ok", [target]
    return f"skipped: {reason or ''}", []


def _loops(edges: dict[str, list[str]]) -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = []
    color: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        color[node] = 1
        for nxt in edges.get(node, ()):
            if color.get(nxt) == 1:
                found.append((node, [*stack[stack.index(nxt) :], node, nxt]))
            elif color.get(nxt) is None:
                visit(nxt, [*stack, nxt])
        color[node] = 2

    for start in sorted(edges):
        if start not in color:
            visit(start, [start])
    return found
