"""``agentctl diagnose``: what stands between this box and a working agent, one check a line.

Configuration; the daemon and the switch; the TLS material (for the service's
user) and how long the certificate has left; the way to the broker step by
step (DNS → TCP → TLS → MQTT CONNECT, :mod:`agent.uplink.probe`, the failing
step named); the clock (the kernel's own "synchronised" flag: neither TLS 1.3
nor MQTT carries the broker's time, so a skew cannot be measured from it);
free space for the state; the CDR source. Each is ``ok``, ``warn``, ``fail``
or ``skip``.

With the customer's switch off, nothing connects to the vendor: the network
steps are skipped and say so. Exit 0 when nothing failed (warnings may
remain), 78 when the configuration itself fails, 69 when another check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING

from agent.errors import EX_CONFIG, EX_UNAVAILABLE

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.uplink.probe import Step

#: A certificate with less than this left is a warning.
CERT_WARN_DAYS = 30
#: Free space for the state directory below these is a warning / a failure.
DISK_WARN, DISK_FAIL = 256 * 1024**2, 32 * 1024**2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``diagnose`` subcommand."""
    p = sub.add_parser(
        "diagnose",
        help="check configuration, TLS, the way to the broker, clock, disk, CDR source",
        description="Check, one line each (ok, warn, fail, skip): configuration, daemon, "
        "switch, TLS material, DNS, TCP, TLS and MQTT CONNECT to the broker, clock, "
        "disk space, CDR source. Exit 0 with no failure, 78 bad configuration, 69 "
        "another failure. Nothing connects to the vendor while the switch is off.",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per check")
    p.add_argument(
        "--user", metavar="NAME", help="judge file access for this user (as config check)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run every check and print them; the exit status says whether one failed."""
    from agent.config import load
    from agent.errors import ConfigError
    from agent.uplink.probe import Step, Verdict

    steps: list[Step] = []
    try:
        config = load(args.config)
    except ConfigError as exc:
        steps.append(Step("config", Verdict.FAIL, f"{len(exc.problems)} problem(s): {exc}"))
        _print(steps, args.json)
        return EX_CONFIG
    steps.append(Step("config", Verdict.OK, f"{config.source} validates"))
    steps += _local(config, args.user)
    switch_on = next(s for s in steps if s.name == "switch").verdict is Verdict.OK
    steps += _network(config, switch_on)
    steps.append(_clock())
    steps.append(_disk(config))
    steps.append(_cdr(config))
    _print(steps, args.json)
    return EX_UNAVAILABLE if any(s.verdict is Verdict.FAIL for s in steps) else 0


def _local(config: AgentConfig, user_name: str | None) -> list[Step]:
    from agent import control, preflight, switch
    from agent.errors import AgentError
    from agent.uplink.probe import Step, Verdict

    out: list[Step] = []
    try:
        control.request(config.paths.control_socket, "ping", timeout=2.0)
        out.append(Step("daemon", Verdict.OK, "running, answers on its control socket"))
    except AgentError as exc:
        out.append(Step("daemon", Verdict.WARN, str(exc)))
    sw = switch.read_switch(config.paths.state_dir)
    if sw.on:
        out.append(Step("switch", Verdict.OK, "on"))
    else:
        why = f" ({sw.error})" if sw.error else ""
        out.append(Step("switch", Verdict.WARN, f"off{why}: the uplink is severed"))
    up = config.uplink
    if up is None:
        out.append(Step("tls-files", Verdict.SKIP, "no uplink configured (local only)"))
        return out
    try:
        user = preflight.service_user(user_name)
    except AgentError as exc:
        out.append(Step("tls-files", Verdict.FAIL, str(exc)))
        return out
    problems = preflight.check(config, user=user)
    if problems:
        text = "; ".join(f"{p.key}: {p.reason}" for p in problems)
        out.append(Step("tls-files", Verdict.FAIL, f"for {user}: {text}"))
        return out
    from agent.uplink.material import check_material

    info = check_material(up.ca_file, up.cert_file, up.key_file, device_id=config.device_id)
    left = (info.not_after.timestamp() - time.time()) / 86400
    until = info.not_after.strftime("%Y-%m-%d")
    if left < CERT_WARN_DAYS:
        out.append(
            Step("certificate", Verdict.WARN, f"expires in {left:.0f} days ({until}): renew it")
        )
    else:
        out.append(Step("certificate", Verdict.OK, f"CN {info.cn}, valid until {until}"))
    out.append(Step("tls-files", Verdict.OK, f"readable by {user}, key private, matching"))
    return out


def _network(config: AgentConfig, switch_on: bool) -> list[Step]:
    from agent.uplink.probe import Step, Verdict

    names = ("dns", "tcp", "tls", "mqtt")
    if config.uplink is None:
        return [Step(n, Verdict.SKIP, "no uplink configured (local only)") for n in names]
    if not switch_on:
        return [Step(n, Verdict.SKIP, "the switch is off: nothing connects out") for n in names]
    import asyncio

    from agent.uplink.probe import probe

    return asyncio.run(probe(config.uplink, config.device_id))


def _clock() -> Step:
    """The kernel's NTP state (adjtimex): unsynchronised is a warning; skew is not knowable."""
    import ctypes

    from agent.uplink.probe import Step, Verdict

    buf = ctypes.create_string_buffer(512)  # struct timex, zeroed: modes 0 reads only
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        state = libc.adjtimex(buf)
    except (OSError, AttributeError):
        state = -1
    now = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    if state == 5:  # TIME_ERROR: the clock is not synchronised
        return Step(
            "clock",
            Verdict.WARN,
            f"{now}, not synchronised (NTP): certificates and command ages depend on it",
        )
    if state < 0:
        return Step("clock", Verdict.WARN, f"{now}, synchronisation unknown")
    return Step("clock", Verdict.OK, f"{now}, synchronised (the broker's time is not knowable)")


def _disk(config: AgentConfig) -> Step:
    from agent.cli.common import size
    from agent.uplink.probe import Step, Verdict

    where = config.paths.state_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    text = f"{size(free)} free for {config.paths.state_dir}"
    if free < DISK_FAIL:
        return Step("disk", Verdict.FAIL, text + ": the outbox and ledger cannot grow")
    if free < DISK_WARN:
        return Step("disk", Verdict.WARN, text)
    return Step("disk", Verdict.OK, text)


def _cdr(config: AgentConfig) -> Step:
    from agent.cli.common import ago
    from agent.uplink.probe import Step, Verdict

    cs = config.collectors.callstats
    if not cs.enabled:
        return Step("cdr", Verdict.SKIP, "call statistics are off")
    if cs.csv is None:
        return Step("cdr", Verdict.SKIP, f"{cs.source_label()}: see agentctl status")
    try:
        st = cs.csv.stat()
        with cs.csv.open("rb"):
            pass
    except FileNotFoundError:
        return Step("cdr", Verdict.WARN, f"{cs.csv}: not there yet (no call ended since cdr_csv)")
    except OSError as exc:
        return Step("cdr", Verdict.FAIL, f"{cs.csv}: {exc.strerror}")
    return Step("cdr", Verdict.OK, f"{cs.csv}: readable, last written {ago(st.st_mtime)}")


def _print(steps: list[Step], as_json: bool) -> None:
    for s in steps:
        if as_json:
            print(json.dumps({"check": s.name, "verdict": s.verdict.value, "detail": s.detail}))
        else:
            print(f"{s.verdict.value:<5} {s.name:<12} {s.detail}")
    sys.stdout.flush()
