"""One run of the update unit: look only when allowed, install only when told, undo what fails.

The order is the promise: the customer's ``updates:`` setting and the uplink
switch are read before anything touches the network; ``notify`` stops at saying
an update exists; ``auto`` installs it only when a copy of the running version
is at hand to go back to, then gives the new version ``ready_within`` to report
ready and reconnect, and reinstalls the previous one if it does not. Every step
is an entry in the update ledger (hash-chained like the agent's own).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from agent.errors import UpdateError
from agent.ledger import Ledger
from agent.update_state import Outcome, UpdateMode, UpdateState, read_state, write_state
from agent.updater.apt import VendorApt, newer

log = structlog.get_logger("agent.updater")

#: Restart the service and wait until it is ready (and reconnected, where it has an
#: uplink) within the given seconds: None when it is, else why not.
Restarter = Callable[[float], str | None]

LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    n INTEGER PRIMARY KEY, ts REAL NOT NULL, kind TEXT NOT NULL,
    data TEXT NOT NULL, prev TEXT NOT NULL, hash TEXT NOT NULL
);
"""
LEDGER_FILE = "ledger.db"


def open_ledger(update_dir: Path) -> Ledger:
    """The update ledger (its own database: the daemon's is the daemon's to write)."""
    update_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    conn = sqlite3.connect(update_dir / LEDGER_FILE, isolation_level=None)
    conn.executescript(LEDGER_SCHEMA)
    return Ledger(conn)


class Run:
    """One decision, from setting and switch to applied or rolled back."""

    def __init__(
        self,
        *,
        mode: UpdateMode,
        switch_on: bool,
        apt: VendorApt,
        update_dir: Path,
        restart: Restarter,
        ready_within: float,
    ) -> None:
        self.mode = mode
        self.switch_on = switch_on
        self.apt = apt
        self.update_dir = update_dir
        self.restart = restart
        self.ready_within = ready_within
        self.ledger = open_ledger(update_dir)
        previous = read_state(update_dir)
        self.held: list[str] = list(previous.held) if previous else []

    def step(self, step: str, **data: Any) -> None:
        """One ledger entry and one log event per step."""
        self.ledger.record("update", {"step": step, **data})
        log.info(f"update_{step}", **data)

    def finish(
        self, outcome: Outcome, installed: str, available: str | None = None, detail: str = ""
    ) -> UpdateState:
        state = UpdateState(
            at=time.time(),
            mode=self.mode.value,
            outcome=outcome.value,
            installed=installed,
            available=available,
            detail=detail,
            held=self.held,
        )
        write_state(self.update_dir, state)
        return state

    def __call__(self) -> UpdateState:
        installed = self.apt.installed()
        if installed is None:
            raise UpdateError(f"{self.apt.package} is not installed: nothing to update")
        if self.mode is UpdateMode.OFF:
            self.step("skipped", why="updates: off", installed=installed)
            return self.finish(Outcome.SKIPPED, installed, detail="updates: off")
        if not self.switch_on:
            self.step("skipped", why="the uplink switch is off", installed=installed)
            return self.finish(Outcome.SKIPPED, installed, detail="the uplink switch is off")

        self.step("check", installed=installed, mode=self.mode.value)
        try:
            self.apt.refresh()
        except UpdateError as exc:
            self.step("check_failed", error=exc.message)
            self.finish(Outcome.CHECK_FAILED, installed, detail=exc.message)
            raise
        candidate = self.apt.candidate()
        if candidate is None or not newer(candidate, installed):
            self.step("current", installed=installed, offered=candidate)
            if self.mode is UpdateMode.AUTO and candidate == installed:
                self.keep_current(installed)
            return self.finish(Outcome.CURRENT, installed)
        self.step("available", installed=installed, available=candidate)
        if candidate in self.held:
            detail = f"{candidate} did not come up here before; it is not installed again"
            return self.finish(Outcome.AVAILABLE, installed, candidate, detail)
        if self.mode is UpdateMode.NOTIFY:
            return self.finish(Outcome.AVAILABLE, installed, candidate, "updates: notify")
        return self.apply(installed, candidate)

    def keep_current(self, installed: str) -> None:
        """Keep a copy of the running version while the vendor still offers it: the way
        back from the next one (the repository keeps only the newest)."""
        if self.apt.kept(installed) is not None:
            return
        try:
            kept = self.apt.download(installed)
        except UpdateError as exc:
            self.step("keep_failed", version=installed, error=exc.message)
            return
        self.step("kept", version=installed, file=kept.name)

    def apply(self, installed: str, candidate: str) -> UpdateState:
        # Nothing is installed without the way back at hand.
        previous = self.apt.kept(installed)
        if previous is None and self.apt.offers(installed):
            previous = self.apt.download(installed)
        if previous is None:
            detail = f"no copy of {installed} to roll back to; not installing {candidate}"
            self.step("refused", why=detail)
            return self.finish(Outcome.AVAILABLE, installed, candidate, detail)
        new = self.apt.download(candidate)
        self.step("downloaded", version=candidate, file=new.name, rollback=previous.name)
        try:
            self.apt.install(new)
            self.step("installed", version=candidate)
            why = self.restart(self.ready_within)
        except UpdateError as exc:
            why = exc.message
        if why is None:
            self.step("applied", version=candidate, ready_within=self.ready_within)
            self.apt.prune({candidate, installed})
            return self.finish(Outcome.APPLIED, candidate)

        self.step("not_ready", version=candidate, why=why, ready_within=self.ready_within)
        try:
            self.apt.install(previous)
        except UpdateError as exc:
            self.step("rollback_failed", version=installed, error=exc.message)
            self.finish(Outcome.ROLLBACK_FAILED, candidate, candidate, exc.message)
            raise
        self.step("reinstalled", version=installed)
        again = self.restart(self.ready_within)
        self.held.append(candidate)
        self.step("rolled_back", version=installed, held=candidate, ready=again is None)
        detail = (
            f"{candidate} was not ready within {self.ready_within:g}s ({why}); {installed} back"
        )
        return self.finish(Outcome.ROLLED_BACK, installed, candidate, detail)


def command_restarter(argv: list[str]) -> Restarter:
    """A restarter that runs a command: exit 0 within the time means ready.

    For machines where systemd is not PID 1 (and the tests). The command gets the
    time it has in ``PBX_AGENT_READY_WITHIN`` (seconds).
    """

    def restart(within: float) -> str | None:
        env = dict(os.environ, PBX_AGENT_READY_WITHIN=f"{within:g}")
        try:
            done = subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=within, check=False
            )
        except subprocess.TimeoutExpired:
            return f"{argv[0]} did not finish within {within:g}s"
        except OSError as exc:
            return f"{argv[0]}: {exc}"
        return None if done.returncode == 0 else f"{argv[0]} exited {done.returncode}"

    return restart


def systemd_restarter(
    unit: str, reconnected: Callable[[], bool] | None, poll: float = 1.0
) -> Restarter:
    """``systemctl restart`` (a Type=notify unit: it returns once READY=1 came), then
    the uplink must say ``connected`` (when ``reconnected`` is given) within the time.

    Made before anything is installed: a service that was not running then (not yet
    configured, or stopped by the administrator) is not started by an update.
    """
    was_active = (
        subprocess.run(["systemctl", "is-active", "--quiet", unit], check=False).returncode == 0
    )

    def restart(within: float) -> str | None:
        if not was_active:
            return None
        deadline = time.monotonic() + within
        try:
            done = subprocess.run(
                ["systemctl", "restart", unit],
                capture_output=True, text=True, timeout=within, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return f"{unit} did not report ready within {within:g}s"
        if done.returncode != 0:
            return f"systemctl restart {unit}: {done.stderr.strip()}"
        while reconnected is not None and not reconnected():
            if time.monotonic() >= deadline:
                return f"{unit} did not reconnect within {within:g}s"
            time.sleep(poll)
        return None

    return restart
