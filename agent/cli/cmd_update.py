"""``agentctl update run|status``: the update unit's command, and what it last found.

``run`` is what pbx-agent-update.service (root, on its timer, or when the NOC
asked for a check) executes: it reads the customer's ``updates:`` setting and
the uplink switch first, and touches the network only when both allow it
(agent/updater/run.py). ``status`` prints the last outcome; the daemon's status
shows the same file.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from agent.update_state import DEFAULT_UPDATE_DIR

DEFAULT_READY_WITHIN = 120.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``update`` subcommand."""
    p = sub.add_parser("update", help="check for or apply a pbx-agent update (the update unit)")
    p.add_argument("action", choices=("run", "status"))
    p.add_argument("--dir", type=Path, default=DEFAULT_UPDATE_DIR, help=argparse.SUPPRESS)
    p.add_argument("--sources", type=Path, default=None, help="the vendor's apt sources file")
    p.add_argument(
        "--ready-within",
        type=float,
        default=DEFAULT_READY_WITHIN,
        help="seconds the new version has to report ready and reconnect (default 120)",
    )
    p.add_argument(
        "--restart-command",
        default=None,
        help="restart and wait with this command (exit 0 = ready) instead of systemctl",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _switch_on(cfg: Any) -> bool:
    """The switch as the daemon holds it, or as its file says when no daemon runs."""
    from agent import control, switch
    from agent.errors import ControlError

    try:
        reply = control.request(cfg.paths.runtime_dir / "control.sock", "uplink-status")
        return bool(reply["switch"]["state"] == "on")
    except (ControlError, KeyError, TypeError):
        return switch.read_switch(cfg.paths.state_dir).on


def _reconnected(cfg: Any) -> bool:
    from agent import control
    from agent.errors import ControlError

    try:
        reply = control.request(cfg.paths.runtime_dir / "control.sock", "status")
    except ControlError:
        return False
    return bool(reply.get("uplink", {}).get("state") == "connected")


def run(args: argparse.Namespace) -> int:
    """Run the update unit once, or show what it last found."""
    from agent.errors import EX_UNAVAILABLE
    from agent.update_state import read_state

    if args.action == "status":
        state = read_state(args.dir)
        if args.json:
            print(json.dumps(state.to_json() if state else None, indent=2))
        elif state is None:
            print("update: no check has run yet")
        else:
            print(f"update: {state.outcome} (installed {state.installed}", end="")
            print(f", available {state.available})" if state.available else ")")
            if state.detail:
                print(f"  {state.detail}")
        return 0

    from agent import config
    from agent.update_state import Outcome, UpdateMode
    from agent.updater.apt import DEFAULT_SOURCES, VendorApt
    from agent.updater.run import Run, command_restarter, systemd_restarter

    cfg = config.load(args.config)
    if args.restart_command:
        restart = command_restarter(shlex.split(args.restart_command))
    else:
        uplink = cfg.uplink is not None
        restart = systemd_restarter(
            "pbx-agent.service", (lambda: _reconnected(cfg)) if uplink else None
        )
    one = Run(
        mode=UpdateMode(cfg.updates),
        switch_on=_switch_on(cfg),
        apt=VendorApt(args.sources or DEFAULT_SOURCES, args.dir / "apt"),
        update_dir=args.dir,
        restart=restart,
        ready_within=args.ready_within,
    )
    state = one()
    if args.json:
        print(json.dumps(state.to_json(), indent=2))
    else:
        print(f"update: {state.outcome} (installed {state.installed})")
        if state.detail:
            print(f"  {state.detail}")
    return EX_UNAVAILABLE if state.outcome == Outcome.ROLLED_BACK else 0
