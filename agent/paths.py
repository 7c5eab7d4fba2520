"""Where the agent's state and socket are, read cheaply for ``agentctl``.

``agentctl status`` and ``uplink off`` need only the two folders, and must
work while the rest of the file is being edited: reading just ``paths`` keeps
them fast (no full validation, no collector settings imported) and tolerant.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_STATE_DIR = Path("/var/lib/pbx-agent")
DEFAULT_RUNTIME_DIR = Path("/run/pbx-agent")
CONTROL_SOCKET_NAME = "control.sock"


class Paths:
    """The state and runtime folders."""

    __slots__ = ("runtime_dir", "state_dir")

    def __init__(
        self, state_dir: Path = DEFAULT_STATE_DIR, runtime_dir: Path = DEFAULT_RUNTIME_DIR
    ) -> None:
        self.state_dir = state_dir
        self.runtime_dir = runtime_dir

    @property
    def control_socket(self) -> Path:
        """The Unix socket ``agentctl`` talks to."""
        return self.runtime_dir / CONTROL_SOCKET_NAME


def read_paths(config_file: Path) -> tuple[Paths, str | None]:
    """The folders named in ``config_file`` (defaults where absent or unusable), and a warning."""
    import yaml

    try:
        data = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Paths(), f"{config_file}: file not found; using the default folders"
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return Paths(), f"{config_file}: unreadable ({exc}); using the default folders"
    section = data.get("paths") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        section = {}
    found = Paths()
    warning = None
    for key in ("state_dir", "runtime_dir"):
        value = section.get(key)
        if value is None:
            continue
        if isinstance(value, str) and value.startswith("/"):
            setattr(found, key, Path(value))
        else:
            warning = f"{config_file}: paths.{key} is not an absolute path; using the default"
    return found, warning
