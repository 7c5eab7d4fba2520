"""requirements.lock pins every runtime dependency setup.cfg names, each with hashes."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_lock_pins_every_runtime_dependency_with_hashes() -> None:
    """A dependency added to setup.cfg without `make lock` fails here, not in a .deb build."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    wanted = {
        canonical(re.split(r"[<>=!~ ;\[]", line.strip())[0])
        for line in cfg["options"]["install_requires"].splitlines()
        if line.strip()
    }
    lock = (REPO / "requirements.lock").read_text()
    pinned = {canonical(m[1]) for m in re.finditer(r"^([A-Za-z0-9_.-]+)==\S+ \\$", lock, re.M)}
    assert wanted <= pinned, f"not in requirements.lock (make lock): {sorted(wanted - pinned)}"
    for block in re.split(r"\n(?=[A-Za-z0-9])", lock.split("\n", 6)[-1]):
        if "==" in block:
            assert "--hash=sha256:" in block, block.splitlines()[0]
