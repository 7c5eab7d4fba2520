"""``agentctl uplink off|on|status``: the customer's single switch.

``off`` and ``on`` go through the daemon when it runs (it records who asked,
closes the connection and replies only once it is closed); when it does not,
the switch file is written directly, and the daemon honours it on its next start.

When the daemon cannot write the file (a full disk), ``off`` still takes effect
at once: exit 0, with a warning that it is not persisted yet. ``on`` is refused
(exit 73) and the uplink stays off: an ``on`` that is not written would be
contradicted by the file at the next start.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent.cli.common import load_paths, user, when


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``uplink`` subcommand."""
    p = sub.add_parser("uplink", help="sever or restore the connection to the vendor")
    p.add_argument("action", choices=("off", "on", "status"))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Flip or show the switch."""
    from agent import control, switch
    from agent.errors import DaemonNotRunning

    paths = load_paths(args)
    sock = paths.control_socket
    daemon = True
    try:
        if args.action == "status":
            result: dict[str, Any] = control.request(sock, "uplink-status")
        else:
            result = control.request(sock, "uplink", state=args.action)
    except DaemonNotRunning:
        daemon = False
        before = switch.read_switch(paths.state_dir)
        state = before
        if args.action != "status":
            state = switch.write_switch(
                paths.state_dir,
                args.action == "on",
                uid=switch.current_uid(),
                via="agentctl",
            )
        result = {
            "switch": state.to_json(),
            "uplink": {"state": "daemon not running"},
            "changed": len(state.history) != len(before.history) or state.on != before.on,
        }
    if args.json:
        print(json.dumps({"daemon_running": daemon, **result}, indent=2))
        return 0
    sw = result["switch"]
    unchanged = args.action != "status" and result.get("changed") is False
    print(
        f"uplink switch: {switch_word(sw)}"
        + (
            f" (it was already {args.action}: nothing changed, no flip recorded)"
            if unchanged
            else ""
        )
    )
    if sw.get("not_persisted"):
        print(
            f"agentctl: warning: the uplink is {sw['state']} in the running daemon, but the "
            f"switch file could not be written ({sw['not_persisted']}); the daemon keeps "
            "trying. Free space in the state directory: until it is written, a restart "
            "would read the old state",
            file=sys.stderr,
        )
    if sw.get("error"):
        print(f"  warning: {sw['error']}")
    if sw.get("changed_at"):
        print(f"  last changed {when(sw['changed_at'])} by {user(sw['changed_by_uid'])}")
    up = result["uplink"]
    if not daemon:
        print("  daemon not running: the switch file is what it will read at start")
    elif up.get("configured") is False:
        print("  no uplink configured: nothing leaves this box either way")
    else:
        print(f"  connection: {up.get('state', '?')}")
    if args.action == "status" and sw.get("history"):
        print("  recent flips:")
        print(f"    {'time (local)':<19}  {'to':<3}  {'by':<24} via")
        for flip in sw["history"][-5:]:
            print(
                f"    {when(flip['at'])}  {flip['state']:<3}  {user(flip['uid']):<24} {flip['via']}"
            )
    return 0


def switch_word(sw: dict[str, Any]) -> str:
    """``on``, ``off``, or ``off (not persisted: why)`` from a status reply's switch."""
    if sw.get("not_persisted"):
        return f"{sw['state']} (not persisted: {sw['not_persisted']})"
    return str(sw["state"])
