"""packaging/check-python: the service's interpreter is Debian's, and its user can run it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "packaging" / "check-python"
DEBIAN = Path("/usr/bin/python3.11")


@pytest.mark.skipif(not DEBIAN.exists(), reason="Debian's python3.11 is not installed")
def test_debians_interpreter_passes() -> None:
    """/usr/bin/python3.11 passes (as the user nobody too, when we are root to check that)."""
    user = ["nobody"] if os.geteuid() == 0 else []
    out = subprocess.run([str(SCRIPT), str(DEBIAN), *user], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "/usr/bin/python3.11"


def test_a_shim_in_a_private_home_is_refused(tmp_path: Path) -> None:
    """A pyenv-style shim (a script under a 0700 home, first on PATH) is named and refused."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    shim = home / "python3"
    shim.write_text('#!/bin/sh\nexec /usr/bin/python3.11 "$@"\n')
    shim.chmod(0o755)
    out = subprocess.run([str(SCRIPT), str(shim)], capture_output=True, text=True)
    assert out.returncode == 1
    assert f"{shim} resolves to {shim}; use Debian's interpreter" in out.stderr
