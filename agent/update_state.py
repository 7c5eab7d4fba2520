"""What the update unit last found, for the daemon's status and health to say.

``agentctl update run`` (root, from pbx-agent-update.service) writes it; the
unprivileged daemon and ``agentctl status`` only read it. A small JSON file in
the update unit's own folder, replaced whole, so a reader never sees half of it.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.fsutil import atomic_write

DEFAULT_UPDATE_DIR = Path("/var/lib/pbx-agent-update")
STATE_FILE = "state.json"
# In the daemon's runtime folder: a NOC's "update.check" makes the daemon create it,
# and pbx-agent-update.path starts the update unit, which removes it. A request, never a force.
REQUEST_FILE = "update-request"


class UpdateMode(enum.StrEnum):
    """The customer's ``updates:`` setting."""

    OFF = "off"  # never look
    NOTIFY = "notify"  # look, and say so in status and health
    AUTO = "auto"  # look, install, roll back if the new version does not come up


class Outcome(enum.StrEnum):
    """What the last run of the update unit did."""

    SKIPPED = "skipped"  # setting off, or the switch off: no network touched
    CHECK_FAILED = "check_failed"  # the vendor source refused (signature, Valid-Until, network)
    CURRENT = "current"  # nothing newer
    AVAILABLE = "available"  # newer, not installed (notify, or auto refused to)
    APPLIED = "applied"  # installed, ready and reconnected in time
    ROLLED_BACK = "rolled_back"  # installed, not ready in time, previous version back
    ROLLBACK_FAILED = "rollback_failed"  # ... and the previous version could not be reinstalled


@dataclass(frozen=True, kw_only=True)
class UpdateState:
    """The update unit's last word."""

    at: float
    mode: str
    outcome: str
    installed: str
    available: str | None = None
    detail: str = ""
    # Versions that failed to come up: never installed again automatically.
    held: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able view (status replies, the file)."""
        return asdict(self)


def state_path(update_dir: Path) -> Path:
    """The state file in the update unit's folder."""
    return update_dir / STATE_FILE


def read_state(update_dir: Path) -> UpdateState | None:
    """The last state written, or None when there is none or it cannot be read whole."""
    try:
        data = json.loads(state_path(update_dir).read_text())
        return UpdateState(
            at=float(data["at"]),
            mode=str(data["mode"]),
            outcome=str(data["outcome"]),
            installed=str(data["installed"]),
            available=None if data.get("available") is None else str(data["available"]),
            detail=str(data.get("detail", "")),
            held=[str(v) for v in data.get("held", [])],
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_state(update_dir: Path, state: UpdateState) -> None:
    """Replace the state file (world-readable: it holds versions, no secret)."""
    atomic_write(
        state_path(update_dir), json.dumps(state.to_json(), sort_keys=True).encode(), 0o644
    )
