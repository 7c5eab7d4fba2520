"""The single switch: the customer's way to sever the uplink, honoured with or without a daemon.

The state is one small JSON file in the state directory, replaced atomically.
It is read before any connection is made. A missing file means the default
(on: the secure connection is on by default, as the privacy policy says). A
file that cannot be read or parsed means *off*: when in doubt, nothing leaves.
Each flip is kept in the file's history with who (uid) and when.

The daemon never waits on this file to sever: ``uplink off`` takes effect in
memory and closes the connection first, then writes the file; a write that
fails (a full disk) leaves the daemon off, says so, and is retried until it
succeeds. ``uplink on`` is written first and refused if it cannot be: an
``on`` the file does not hold would silently become ``off`` at the next start.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

from agent.errors import StateError, StatePermissionDenied
from agent.fsutil import atomic_write

SWITCH_FILE = "uplink-switch.json"
HISTORY_KEPT = 50


class Flip(NamedTuple):
    """One change of the switch."""

    state: str  # "on" or "off"
    at: float
    uid: int
    via: str  # "agentctl" (direct file write) or "daemon" (over the control socket)


class SwitchState(NamedTuple):
    """The switch as read from disk."""

    on: bool
    history: tuple[Flip, ...] = ()
    error: str | None = None  # why the file could not be trusted (then on is False)
    unpersisted: str | None = None  # in force in the daemon, but the file says otherwise: why

    @property
    def word(self) -> str:
        """``"on"`` or ``"off"``."""
        return "on" if self.on else "off"

    @property
    def shown(self) -> str:
        """The word, with ``(not persisted: why)`` when the file does not say it yet."""
        return f"{self.word} (not persisted: {self.unpersisted})" if self.unpersisted else self.word

    def to_json(self) -> dict[str, Any]:
        """A JSON-able view for status replies."""
        last = self.history[-1] if self.history else None
        return {
            "state": self.word,
            "changed_at": last.at if last else None,
            "changed_by_uid": last.uid if last else None,
            "error": self.error,
            "persisted": self.unpersisted is None,
            "not_persisted": self.unpersisted,
            "history": [f._asdict() for f in self.history[-10:]],
        }


def switch_path(state_dir: Path) -> Path:
    """Where the switch file lives."""
    return state_dir / SWITCH_FILE


def read_switch(state_dir: Path) -> SwitchState:
    """Read the switch; absent means on, unreadable or corrupt means off."""
    path = switch_path(state_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return SwitchState(on=True)
    except OSError as exc:
        return SwitchState(on=False, error=f"{path}: cannot read ({exc.strerror}); treated as off")
    try:
        data = json.loads(raw)
        state = data["state"]
        if state not in ("on", "off"):
            raise ValueError(f"state {state!r}")
        history = tuple(
            Flip(state=str(h["state"]), at=float(h["at"]), uid=int(h["uid"]), via=str(h["via"]))
            for h in data.get("history", [])
        )
    except (ValueError, KeyError, TypeError) as exc:
        return SwitchState(on=False, error=f"{path}: corrupt ({exc}); treated as off")
    return SwitchState(on=state == "on", history=history)


def write_switch(
    state_dir: Path, on: bool, *, uid: int, via: str, at: float | None = None
) -> SwitchState:
    """Set the switch, keeping the flip (made at ``at``, default now) in its history.

    Setting it to the state it already has records no flip. Durable when this returns;
    raises :class:`StateError` when it cannot be written (:class:`StatePermissionDenied`,
    exit 77, when this user may not).
    """
    current = read_switch(state_dir)
    flip = Flip(state="on" if on else "off", at=time.time() if at is None else at, uid=uid, via=via)
    history = current.history
    if current.on != on or current.error is not None:
        history = (*current.history, flip)[-HISTORY_KEPT:]
    # else idempotent: `uplink off` twice is one flip; the file is still written, so that
    # the default (no file) becomes explicit and a full disk is still noticed.
    payload = {"state": flip.state, "history": [f._asdict() for f in history]}
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(switch_path(state_dir), json.dumps(payload, indent=1).encode(), 0o644)
    except PermissionError as exc:
        raise StatePermissionDenied(
            f"cannot write the switch file {switch_path(state_dir)}: permission denied; "
            "run agentctl as root or as a member of the admin group"
        ) from exc
    except OSError as exc:
        raise StateError(f"cannot write the switch file {switch_path(state_dir)}: {exc}") from exc
    return SwitchState(on=on, history=history)


def current_uid() -> int:
    """The caller's real uid (the person, not a setuid identity)."""
    return os.getuid()
