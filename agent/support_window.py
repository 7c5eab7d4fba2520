"""The support window: the customer's local permission for remote support, kept on disk.

Remote support needs two locks, and this is the first: a window the customer
opens on the box (``agentctl support open --for 2h``) with, optionally, the
ticket it is for and the services the vendor may reach. The NOC's
``support.connect`` is refused outside it. The window is one small JSON file in
the state directory, replaced atomically (as the switch is), so it survives a
daemon restart; a file that cannot be read or parsed means *no window*: when in
doubt, nobody gets in. The last window stays in the file after it closes, with
who closed it and why, for ``support status``.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

from agent.errors import StateError
from agent.fsutil import atomic_write

WINDOW_FILE = "support-window.json"
TICKET_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:#/-]{0,63}"


class WindowState(StrEnum):
    """Whether the customer's window is open."""

    OPEN = "open"
    CLOSED = "closed"


class CloseReason(StrEnum):
    """Why a window closed."""

    CLOSED = "closed"  # agentctl support close
    EXPIRED = "expired"  # its time ran out
    SWITCH = "switch"  # agentctl uplink off
    REPLACED = "replaced"  # a new window was opened over it
    UNLEDGERED = "unledgered"  # the ledger could not record its opening


@dataclass(frozen=True, slots=True)
class Window:
    """One support window as stored."""

    id: str
    opened_at: float
    opened_by: int
    until: float
    ticket: str | None
    services: tuple[str, ...]
    state: WindowState = WindowState.OPEN
    closed_at: float | None = None
    closed_by: int | None = None
    close_reason: CloseReason | None = None
    closed_via: str | None = None  # "daemon" or "agentctl" (written while the daemon was down)

    def is_open(self, now: float | None = None) -> bool:
        """Open and not yet at its end."""
        now = time.time() if now is None else now
        return self.state is WindowState.OPEN and now < self.until

    def closed(self, reason: CloseReason, *, uid: int | None, via: str, at: float) -> Window:
        """This window, closed."""
        return replace(
            self,
            state=WindowState.CLOSED,
            closed_at=at,
            closed_by=uid,
            close_reason=reason,
            closed_via=via,
        )

    def to_json(self) -> dict[str, Any]:
        """The stored (and shown) form."""
        data = asdict(self)
        data["services"] = list(self.services)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Window:
        """Parse the stored form; raises ValueError, KeyError or TypeError when it is wrong."""
        ticket = data.get("ticket")
        reason = data.get("close_reason")
        closed_at = data.get("closed_at")
        closed_by = data.get("closed_by")
        return cls(
            id=str(data["id"]),
            opened_at=float(data["opened_at"]),
            opened_by=int(data["opened_by"]),
            until=float(data["until"]),
            ticket=None if ticket is None else str(ticket),
            services=tuple(str(s) for s in data["services"]),
            state=WindowState(data["state"]),
            closed_at=None if closed_at is None else float(closed_at),
            closed_by=None if closed_by is None else int(closed_by),
            close_reason=None if reason is None else CloseReason(reason),
            closed_via=data.get("closed_via"),
        )


class WindowRead(NamedTuple):
    """The window file as read: the window (None if there is none) and why it was distrusted."""

    window: Window | None
    error: str | None = None


def window_path(state_dir: Path) -> Path:
    """Where the window file lives."""
    return state_dir / WINDOW_FILE


def new_window(
    *, uid: int, seconds: float, ticket: str | None, services: tuple[str, ...], now: float
) -> Window:
    """A window opened now by ``uid`` for ``seconds``."""
    return Window(
        id=f"w-{int(now)}-{secrets.token_hex(3)}",
        opened_at=now,
        opened_by=uid,
        until=now + seconds,
        ticket=ticket,
        services=services,
    )


def read_window(state_dir: Path) -> WindowRead:
    """Read the window file; absent means no window, unreadable or corrupt means no window."""
    path = window_path(state_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return WindowRead(None)
    except OSError as exc:
        return WindowRead(None, f"{path}: cannot read ({exc.strerror}); no window is open")
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError("not an object")
        return WindowRead(Window.from_json(data))
    except (ValueError, KeyError, TypeError) as exc:
        return WindowRead(None, f"{path}: corrupt ({exc}); no window is open")


def write_window(state_dir: Path, window: Window) -> None:
    """Store ``window``; durable when this returns."""
    path = window_path(state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(window.to_json(), indent=1).encode(), 0o644)
    except PermissionError as exc:
        raise StateError(
            f"cannot write the support window file {path}: permission denied; "
            "run agentctl as root or as a member of the admin group"
        ) from exc
    except OSError as exc:
        raise StateError(f"cannot write the support window file {path}: {exc}") from exc
