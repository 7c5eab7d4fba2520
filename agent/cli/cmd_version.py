"""``agentctl version``: the agent's and its key dependencies' versions."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``version`` subcommand."""
    p = sub.add_parser("version", help="print versions")
    p.set_defaults(func=run)


def versions() -> dict[str, str]:
    """The agent's version and those of the libraries that shape its behaviour."""
    import platform
    from importlib import metadata  # 30+ ms to import: only when versions are asked for

    from agent import __version__

    out = {"pbx-agent": __version__, "python": platform.python_version()}
    for dist in ("paho-mqtt", "cryptography", "structlog", "PyYAML", "psutil"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def run(args: argparse.Namespace) -> int:
    """Print one ``name version`` line per component."""
    for name, version in versions().items():
        print(f"{name} {version}")
    return 0
