"""Versions: the agent's own, and those of the libraries that shape its behaviour.

In core, because the daemon reports them in status and ``agentctl version``
prints them; neither should import the other for it.
"""

from __future__ import annotations

#: The libraries whose versions change what the agent does on the wire or on disk.
REPORTED = ("paho-mqtt", "cryptography", "structlog", "PyYAML", "psutil", "paramiko")


def versions() -> dict[str, str]:
    """``{"pbx-agent": …, "python": …, library: version or "not installed"}``."""
    import platform
    from importlib import metadata  # 30+ ms to import: only when versions are asked for

    from agent import __version__

    out = {"pbx-agent": __version__, "python": platform.python_version()}
    for dist in REPORTED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
