"""The layer contracts of .importlinter are enforced, and cover every module of the agent.

`make lint` runs lint-imports; these tests prove the configuration has teeth: a
deliberate violation (the gate importing the command line) makes it fail, and
no module of agent/ escapes the layers by not being named in them.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _layers() -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / ".importlinter")
    text = cfg["importlinter:contract:layers"]["layers"]
    names: list[str] = []
    for line in text.split("\n"):
        for part in line.replace("|", ":").split(":"):
            if part.strip():
                names.append(part.strip())
    return names


def _run(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / ".importlinter"), "--no-cache"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_module_of_the_agent_has_a_layer() -> None:
    """Each top-level module and package under agent/ is placed in the layers contract."""
    placed = set(_layers())
    present = {
        p.stem if p.is_file() else p.name
        for p in (REPO / "agent").iterdir()
        if (p.suffix == ".py" and p.stem != "__init__")
        or (p.is_dir() and (p / "__init__.py").exists())
    }
    assert sorted(present - placed) == []
    assert sorted(placed - present) == []


def test_a_layer_violation_fails_the_lint(tmp_path: Path) -> None:
    """The gate importing the command line breaks the contract; the tree as it is keeps it."""
    shutil.copytree(
        REPO / "agent", tmp_path / "agent", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    clean = _run(tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    gate = tmp_path / "agent" / "policy" / "gate.py"
    gate.write_text(gate.read_text() + "\nfrom agent.cli import common  # noqa\n")
    broken = _run(tmp_path)
    assert broken.returncode != 0
    assert "agent.policy.gate -> agent.cli.common" in broken.stdout
