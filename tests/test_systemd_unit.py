"""The shipped unit: valid for systemd, hardened, and keeping the spools out of the agent's view."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "pbx-agent.service"
MAX_EXPOSURE = 2.0

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (make test installs it)",
)


def checkable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at this checkout's agentctl (the real one is absent)."""
    agentctl = Path(sys.executable).with_name("agentctl")
    if not agentctl.exists():
        agentctl = Path("/bin/true")
    text = UNIT.read_text().replace("/opt/pbx-agent/venv/bin/agentctl", str(agentctl))
    out = tmp_path / "pbx-agent.service"
    out.write_text(text)
    return out


def test_verify_prints_nothing(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit without a single warning (misspelt keys warn)."""
    unit = checkable_unit(tmp_path)
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if str(unit) in ln or "Unknown" in ln]
    assert lines == [], "\n".join(lines)


def test_exposure_score(tmp_path: Path) -> None:
    """The offline security analysis scores the unit at 2.0 or better."""
    unit = checkable_unit(tmp_path)
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True, text=True
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", out.stdout + out.stderr)
    assert match, out.stdout + out.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE


def test_unit_shape() -> None:
    """Notify with a watchdog; no restart loop on a bad configuration; the spools hidden."""
    text = UNIT.read_text()
    assert "Type=notify" in text
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    assert re.search(r"^Restart=on-failure$", text, re.M)
    assert re.search(r"^RestartPreventExitStatus=.*\b78\b", text, re.M)
    for spool in ("/var/spool/asterisk/monitor", "/var/spool/asterisk/voicemail"):
        assert re.search(rf"^InaccessiblePaths=-?{re.escape(spool)}$", text, re.M)
    assert re.search(r"^CapabilityBoundingSet=$", text, re.M)
    assert re.search(r"^ProtectSystem=strict$", text, re.M)


def test_descriptor_limit_bounds_the_control_socket() -> None:
    """LimitNOFILE= is set, and the control socket's connection limits sit well below it."""
    from agent.control import Limits

    match = re.search(r"^LimitNOFILE=(\d+)$", UNIT.read_text(), re.M)
    assert match, "LimitNOFILE= must be set (soft and hard as one number)"
    nofile = int(match.group(1))
    limits = Limits.for_descriptors(nofile)
    assert limits.total + limits.reserve <= nofile // 4
    assert limits.reserve > 0 and limits.per_uid < limits.total


def test_update_units_verify_and_wire_together(tmp_path: Path) -> None:
    """The update service, its timer and the NOC-request path unit verify without a warning,
    and the path watches the very file the daemon creates for update.check."""
    from agent.paths import DEFAULT_RUNTIME_DIR
    from agent.update_state import REQUEST_FILE

    agentctl = Path(sys.executable).with_name("agentctl")
    names = ("pbx-agent-update.service", "pbx-agent-update.timer", "pbx-agent-update.path")
    for name in names:
        text = (REPO / "systemd" / name).read_text().replace("/usr/bin/agentctl", str(agentctl))
        (tmp_path / name).write_text(text)
    out = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / n) for n in names)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert [ln for ln in out.stderr.splitlines() if str(tmp_path) in ln] == []
    path_unit = (REPO / "systemd" / "pbx-agent-update.path").read_text()
    assert f"PathExists={DEFAULT_RUNTIME_DIR / REQUEST_FILE}" in path_unit
    service = (REPO / "systemd" / "pbx-agent-update.service").read_text()
    assert "Type=oneshot" in service and "update run" in service
