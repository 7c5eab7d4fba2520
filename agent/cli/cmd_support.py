"""``agentctl support``: the customer's side of remote support.

``open`` starts a window in which, and only in which, the vendor's NOC may
bring up a support tunnel (for the ticket named, to the services named);
``close`` ends it and any tunnel at once; ``status`` shows the window, the live
session with its channels and bytes each way, and the vendor's logins.
``authorized-keys USER`` is what sshd's ``AuthorizedKeysCommand`` runs; ``key``
prints the box's public key for the vendor's bastion.

``close`` works without the daemon (it writes the window file, which the
daemon honours and ledgers when it starts); ``open`` needs the daemon, since
nothing could connect without it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from agent.cli.common import UsageError, load_config, load_paths, size, span, user, when


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``support`` subcommand."""
    p = sub.add_parser("support", help="open, watch or close a remote support window")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    o = actions.add_parser("open", help="let the vendor connect for a while (admin)")
    o.add_argument(
        "--for",
        dest="duration",
        required=True,
        metavar="DURATION",
        help="how long: 30m, 2h (capped by support.max_window)",
    )
    o.add_argument("--ticket", help="the support ticket the vendor must name")
    o.add_argument(
        "--service",
        dest="services",
        action="extend",
        nargs="+",
        metavar="NAME",
        help="services the vendor may reach (default: every one in support.services)",
    )
    o.add_argument("--json", action="store_true", help="machine-readable output")
    c = actions.add_parser("close", help="end the window and any tunnel now (admin)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    s = actions.add_parser("status", help="the window, the live session, channels, logins")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    k = actions.add_parser(
        "authorized-keys", help="for sshd's AuthorizedKeysCommand: the one-time vendor key, if any"
    )
    k.add_argument("user", help="the user sshd asks about (%%u)")
    actions.add_parser("key", help="print this box's public key for the vendor's bastion")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the action."""
    action: str = args.action
    if action == "open":
        return _open(args)
    if action == "close":
        return _close(args)
    if action == "status":
        return _status(args)
    if action == "authorized-keys":
        return _authorized_keys(args)
    return _key(args)


def _open(args: argparse.Namespace) -> int:
    from agent import control
    from agent.confreader import format_duration, parse_duration
    from agent.errors import ConfigError, DaemonNotRunning

    seconds = parse_duration(args.duration)
    if seconds is None or seconds <= 0:
        raise UsageError(f"--for: expected a duration such as 30m or 2h, got {args.duration!r}")
    try:
        support = load_config(args).support
    except ConfigError:
        support = None  # the daemon validates with the configuration it runs
    else:
        if support is None:
            raise UsageError(
                "remote support is not configured on this box (add a support section to "
                f"{args.config})"
            )
        unknown = [s for s in args.services or () if support.service(s) is None]
        if unknown:
            raise UsageError(
                f"unknown service(s) {', '.join(unknown)}; support.services names: "
                f"{', '.join(support.service_names)}"
            )
    paths = load_paths(args)
    try:
        result: dict[str, Any] = control.request(
            paths.control_socket,
            "support-open",
            seconds=seconds,
            ticket=args.ticket,
            services=args.services,
        )
    except DaemonNotRunning as exc:
        raise DaemonNotRunning(
            f"{exc}: start it first (a support window needs the daemon; nothing can "
            "connect without it)"
        ) from None
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    w = result["window"]
    print(
        f"support window open until {when(w['until'])} ({span(w['until'] - w['opened_at'])})"
        f"{', ticket ' + w['ticket'] if w['ticket'] else ''}; services: {', '.join(w['services'])}"
    )
    if result.get("capped"):
        print(f"  capped at {format_duration(result['max_window'])} by support.max_window")
    print(
        "  the vendor may connect only while it is open; `agentctl support close` ends it and "
        "any tunnel, `agentctl uplink off` stops everything"
    )
    return 0


def _close(args: argparse.Namespace) -> int:
    from agent import control, support_window, switch
    from agent.errors import DaemonNotRunning

    paths = load_paths(args)
    try:
        result: dict[str, Any] = control.request(paths.control_socket, "support-close")
        daemon = True
    except DaemonNotRunning:
        daemon = False
        read = support_window.read_window(paths.state_dir)
        w = read.window
        was_open = w is not None and w.state is support_window.WindowState.OPEN
        if w is not None and was_open:
            w = w.closed(
                support_window.CloseReason.CLOSED,
                uid=switch.current_uid(),
                via="agentctl",
                at=_now(),
            )
            support_window.write_window(paths.state_dir, w)
        result = {"was_open": was_open, "window": w.to_json() if w else None}
    if args.json:
        print(json.dumps({"daemon_running": daemon, **result}, indent=2))
        return 0
    if result["was_open"]:
        print("support window closed; no tunnel can run now")
    else:
        print("no support window was open; none is now")
    if not daemon:
        print("  daemon not running: it records the close in the ledger when it starts")
    return 0


def _status(args: argparse.Namespace) -> int:
    from agent import control, support_window
    from agent.errors import DaemonNotRunning

    paths = load_paths(args)
    try:
        result: dict[str, Any] = control.request(paths.control_socket, "support-status")
        daemon = True
    except DaemonNotRunning:
        daemon = False
        read = support_window.read_window(paths.state_dir)
        w = read.window
        result = {
            "window": None if w is None else {**w.to_json(), "open": w.is_open()},
            "window_error": read.error,
            "session": None,
        }
    if args.json:
        print(json.dumps({"daemon_running": daemon, **result}, indent=2))
        return 0
    print_status(result, daemon=daemon)
    return 0


def print_status(st: dict[str, Any], *, daemon: bool = True) -> None:
    """The human view of a support status reply."""
    out = sys.stdout
    if daemon and not st.get("configured", True):
        out.write("remote support: not configured on this box (no support section)\n")
        return
    w = st.get("window")
    if st.get("window_error"):
        out.write(f"warning: {st['window_error']}\n")
    if w is None:
        out.write("support window: none has been opened\n")
    elif w["open"]:
        left = span(w["until"] - _now())
        out.write(
            f"support window: OPEN until {when(w['until'])} ({left} left)"
            f"{', ticket ' + w['ticket'] if w['ticket'] else ''}; services: "
            f"{', '.join(w['services'])}; opened by {user(w['opened_by'])} at "
            f"{when(w['opened_at'])}\n"
        )
    else:
        how = w.get("close_reason") or "expired"
        by = f" by {user(w['closed_by'])}" if w.get("closed_by") is not None else ""
        out.write(
            f"support window: closed ({how}{by} at {when(w.get('closed_at') or w['until'])}); "
            f"it was open from {when(w['opened_at'])}\n"
        )
    if not daemon:
        out.write("daemon not running: no tunnel can run\n")
        return
    if st.get("bastion"):
        out.write(f"bastion: {st['bastion']}\n")
    s = st.get("session")
    if s is None:
        out.write("tunnel: none (the NOC has not connected)\n")
        return
    live = "live" if s.get("live") else f"ended {when(s['ended_at'])}: {s['end_reason']}"
    out.write(
        f"session {s['id']} ({live}){', ticket ' + s['ticket'] if s['ticket'] else ''}: "
        f"tunnel {s['state']}"
    )
    if s.get("up_since"):
        out.write(f" since {when(s['up_since'])}")
    out.write(f", {s['connects']} connection(s)\n")
    if s.get("last_error"):
        out.write(f"  last error: {s['last_error']}\n")
    services = st.get("services", {})
    for name, port in s["ports"].items():
        out.write(f"  {name:<10} bastion 127.0.0.1:{port} -> {services.get(name, '?')}\n")
    out.write(
        f"  bytes: {size(s['bytes_to_vendor'])} to the vendor, {size(s['bytes_from_vendor'])} "
        f"from the vendor; channels: {s['channels_open']} open, {s['channels_total']} in all\n"
    )
    for ch in s["channels"][-20:]:
        state = "open" if ch.get("open") else f"closed {when(ch['closed_at'])}"
        err = f" ({ch['error']})" if ch.get("error") else ""
        out.write(
            f"    {ch['service']:<10} opened {when(ch['opened_at'])}  "
            f"to vendor {size(ch['bytes_to_vendor'])}, from vendor "
            f"{size(ch['bytes_from_vendor'])}  {state}{err}\n"
        )
    if s.get("vendor_key"):
        out.write(f"  vendor login key: {s['vendor_key']} (valid only while this session runs)\n")
    for login in s["logins"]:
        out.write(
            f"  vendor login: {login['user']} at {when(login['seen_at'])} "
            f"({login['family']} {login['fingerprint']})\n"
        )


def _authorized_keys(args: argparse.Namespace) -> int:
    """For sshd: print the keys (maybe none) and nothing else on standard output."""
    from agent import control
    from agent.errors import DaemonNotRunning

    paths = load_paths(args)
    try:
        result = control.request(paths.control_socket, "support-keys", user=args.user, timeout=5)
    except DaemonNotRunning:
        return 0  # no daemon, no window: no key
    for line in result.get("keys", []):
        print(line)
    return 0


def _key(args: argparse.Namespace) -> int:
    from agent import control, sshkeys
    from agent.errors import DaemonNotRunning, StateError

    paths = load_paths(args)
    try:
        result: dict[str, Any] = control.request(paths.control_socket, "support-key")
    except DaemonNotRunning:
        support = load_config(args).support
        if support is None:
            raise UsageError("remote support is not configured on this box") from None
        public = sshkeys.read_public_key_file(support.key_file)
        if public is None:
            raise StateError(
                f"no support key at {support.key_file} yet: the daemon makes it; start it and "
                "run this again"
            ) from None
        print(public.line(f"pbx-agent@{load_config(args).device_id}"))
        return 0
    print(result["public_key"])
    if os.isatty(sys.stdout.fileno()):
        print(f"# {result['fingerprint']}, private key {result['file']} (never leaves this box)")
    return 0


def _now() -> float:
    import time

    return time.time()
