"""``agentctl status``: is the daemon up, is the uplink on, what did each collector do."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from agent.cli.cmd_uplink import switch_word
from agent.cli.common import ago, load_paths, size, span, user, when
from agent.errors import EX_UNAVAILABLE, DaemonNotRunning


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``status`` subcommand."""
    p = sub.add_parser("status", help="show the daemon's state")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Ask the daemon; when it is down, say so and show the switch from its file."""
    from agent import control, switch

    paths = load_paths(args)
    try:
        result = control.request(paths.control_socket, "status")
    except DaemonNotRunning as exc:
        sw = switch.read_switch(paths.state_dir)
        if args.json:
            print(json.dumps({"running": False, "error": str(exc), "switch": sw.to_json()}))
        else:
            print(f"daemon: not running (nothing listens on {paths.control_socket})")
            print(f"uplink switch: {sw.word}" + (f" ({sw.error})" if sw.error else ""))
        return EX_UNAVAILABLE
    if args.json:
        print(json.dumps({"running": True, **result}, indent=2))
    else:
        print_status(result)
    return 0


def print_identity(ident: dict[str, Any] | None) -> None:
    """The uplink certificate and its renewal; warnings and failures name what to do."""
    if not ident or ident.get("configured") is False:
        return
    out = sys.stdout
    cert = ident.get("certificate") or {}
    if cert.get("error"):
        out.write(f"  certificate: {cert['error']}\n")
    elif cert:
        line = (
            f"  certificate: {cert['subject']}, issued by {cert['issuer']}, expires "
            f"{when(cert['not_after'])} ({cert['days_left']:.0f} days left)"
        )
        if cert.get("warning"):
            line += f" WARNING: {cert['warning']}"
        out.write(line + "\n")
    if ident.get("next_renewal"):
        out.write(f"  renewal: next at {when(ident['next_renewal'])}, {ident['renewals']} done\n")
    if ident.get("last_error"):
        out.write(f"  renewal failed: {ident['last_error']}\n")


def print_signing(sig: dict[str, Any] | None) -> None:
    """How NOC commands are checked: the pinned root, or why every command is refused."""
    if not sig:
        return
    out = sys.stdout
    if not sig.get("accepting"):
        out.write(f"  NOC commands: all refused ({sig.get('problem')})\n")
        return
    line = f"  NOC commands: signed by a key of root {sig['root_fingerprint']} ({sig['root']})"
    key = sig.get("command_key")
    if key:
        left = (key["expires"] - time.time()) / 86400
        line += f"; command key {key['kid']} expires {key['expires_utc']} ({left:.0f} days)"
        if left < 14:
            line += " WARNING: under 14 days"
    out.write(line + "\n")


def print_status(s: dict[str, Any]) -> None:
    """The human view of a status reply."""
    d = s["daemon"]
    out = sys.stdout
    out.write(
        f"pbx-agent {s['versions']['pbx-agent']} on {s['device_id']}: running "
        f"(pid {d['pid']}, up {span(d['uptime'])})\n"
    )
    if d.get("last_reload_error"):
        out.write(f"  last reload rejected: {d['last_reload_error']}\n")
    sw = s["switch"]
    by = f" by {user(sw['changed_by_uid'])} at {when(sw['changed_at'])}" if sw["changed_at"] else ""
    out.write(f"uplink switch: {switch_word(sw)}{by}\n")
    up = s["uplink"]
    local = not up.get("configured", True)
    if local:
        out.write(
            "uplink: not configured (local only): nothing leaves this box; records are "
            "kept locally, none is queued for sending\n"
        )
    else:
        line = f"uplink: {up.get('state', '?')} {up.get('broker', '')}"
        if up.get("last_error"):
            line += f" (last error: {up['last_error']})"
        out.write(line + "\n")
        if up.get("paused"):
            out.write(f"  deliveries paused: {up['paused']}\n")
        print_identity(s.get("identity"))
        print_signing((up.get("commands") or {}).get("signing"))
    sup = s.get("support") or {}
    if sup.get("configured"):
        w = sup.get("window")
        sess = sup.get("session")
        opened = f"open until {when(w['until'])}" if w and w["open"] else "closed"
        line = f"support: window {opened}"
        if sess and sess.get("live"):
            line += f", tunnel {sess['state']} ({sess['channels_open']} channel(s) open)"
        out.write(line + " (agentctl support status)\n")
    ob = s["outbox"]
    out.write(
        f"outbox: {ob['queued']} queued ({size(ob['bytes'])} of {size(ob['max_bytes'])}), "
        f"{ob['delivered']} delivered, {ob['dropped']} dropped (outbox full), "
        f"{ob.get('unstored', 0)} dropped (could not be stored)\n"
    )
    if ob.get("store_error"):
        out.write(f"  cannot store: {ob['store_error']}\n")
    out.write(f"policy: sends {', '.join(s['policy']['effective']) or 'nothing'}\n")
    out.write("collectors:\n")
    for name, c in s["collectors"].items():
        if c.get("start_error"):
            state = f"cannot start (attempt {c['start_attempts']}): {c['start_error']}"
        elif c.get("last_error"):
            state = "error: " + c["last_error"]
        else:
            state = f"ok {ago(c['last_ok'])}"
        fate = (
            f"{c['refused']} kept locally (no uplink)"
            if local
            else f"{c['records']} sent to outbox, {c['refused']} refused"
        )
        out.write(f"  {name:<10} every {span(c['interval']):<6} {state}; {fate}\n")
    health = s["collectors"].get("health") or {}
    print_pbx(health.get("pbx"))
    ctl = s.get("control")
    if ctl and (ctl["refused"] or ctl["accept_pauses"] or ctl["failed_requests"]):
        refused = ", ".join(f"{n} {why}" for why, n in sorted(ctl["refused"].items())) or "none"
        out.write(
            f"control socket: {ctl['connections']} connections; refused: {refused}; "
            f"{ctl['timed_out']} idle closed, {ctl['accept_pauses']} accept pauses, "
            f"{ctl['failed_requests']} failed requests\n"
        )
    bad = {n: c for n, c in s["components"].items() if c["restarts"]}
    for name, c in bad.items():
        out.write(f"  component {name}: {c['restarts']} restarts, last error {c['last_error']}\n")


def print_pbx(pbx: dict[str, Any] | None) -> None:
    """The PBX section: Asterisk over AMI, as the last health record saw it."""
    out = sys.stdout
    if not pbx or pbx.get("ami") is None:
        out.write("pbx: AMI not configured (collectors.health.pbx.ami); processes only\n")
        return
    ami = pbx["ami"]
    state = pbx.get("state") or "not asked yet"
    line = f"pbx: {state}"
    if pbx.get("reason"):
        line += f" ({pbx['reason']}: {pbx.get('detail') or ''})".replace(": )", ")")
    if ami.get("retry_in"):
        line += f"; next try in {span(ami['retry_in'])}"
    out.write(line + "\n")
    out.write(
        f"  AMI {ami['address']} as {ami['username']}: {ami['state']}, "
        f"{ami['connects']} connects, {ami['drops']} drops\n"
    )
    if pbx.get("version") is None and pbx.get("uptime") is None:
        return
    up = span(pbx["uptime"]) if pbx.get("uptime") is not None else "?"
    reload = span(pbx["since_reload"]) if pbx.get("since_reload") is not None else "?"
    out.write(f"  Asterisk {pbx.get('version') or '?'}, up {up}, reloaded {reload} ago\n")
    out.write(f"  calls up: {pbx.get('calls_up')}, channels: {pbx.get('channels')}\n")
    down = pbx.get("trunks_down") or []
    out.write(
        f"  trunks: {pbx.get('trunks_up', 0)} up, {len(down)} down"
        + (f" ({', '.join(down)})" if down else "")
        + "\n"
    )
    ep = pbx.get("endpoints")
    if ep:
        out.write(
            f"  endpoints: {ep['registered']} registered, {ep['unregistered']} unregistered, "
            f"{ep['unavailable']} unavailable\n"
        )
    out.write(f"  queues: {pbx.get('queues', 0)}\n")
    for name, why in (pbx.get("sections") or {}).items():
        if why != "not_loaded":
            out.write(f"  {name}: {why}\n")
