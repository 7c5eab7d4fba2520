"""The update unit's decisions, with apt and the restart replaced by recorders.

Fast; the same decisions against real apt, dpkg and a signed repository are in
tests/test_update_e2e.py (make test-deb).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.collectors.health.collector import update_summary
from agent.errors import UpdateError
from agent.ledger import verify
from agent.update_state import Outcome, UpdateMode, read_state
from agent.updater.run import Run


@dataclass
class FakeApt:
    """What VendorApt answers, and what was done to it."""

    installed_version: str = "1.0"
    offered: list[str] = field(default_factory=lambda: ["1.0"])
    refuse: str | None = None
    broken_install: str | None = None  # a version whose dpkg -i fails
    package: str = "pbx-agent"
    copies: set[str] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)

    def installed(self) -> str | None:
        return self.installed_version

    def refresh(self) -> None:
        self.calls.append("refresh")
        if self.refuse:
            raise UpdateError(self.refuse)

    def candidate(self) -> str | None:
        return max(self.offered) if self.offered else None

    def offers(self, version: str) -> bool:
        return version in self.offered

    def kept(self, version: str) -> Path | None:
        return Path(f"pbx-agent_{version}.deb") if version in self.copies else None

    def download(self, version: str) -> Path:
        if version not in self.offered and version not in self.copies:
            raise UpdateError(f"{version} is not offered")
        self.copies.add(version)
        self.calls.append(f"download {version}")
        return Path(f"pbx-agent_{version}.deb")

    def install(self, deb: Path) -> None:
        self.calls.append(f"install {deb.name}")
        if self.broken_install and self.broken_install in deb.name:
            raise UpdateError(f"dpkg -i {deb.name} failed")
        self.installed_version = deb.name.split("_")[1].removesuffix(".deb")

    def prune(self, keep: set[str]) -> None:
        self.copies &= keep


def run(
    tmp_path: Path, apt: FakeApt, mode: UpdateMode, *, switch_on: bool = True, ready: bool = True
) -> tuple[Outcome, list[str]]:
    restarts: list[str] = []

    def restart(within: float) -> str | None:
        restarts.append(apt.installed_version)
        return None if ready or apt.installed_version == "1.0" else "no READY=1"

    one = Run(
        mode=mode,
        switch_on=switch_on,
        apt=apt,  # type: ignore[arg-type]
        update_dir=tmp_path,
        restart=restart,
        ready_within=1.0,
    )
    return Outcome(one().outcome), restarts


def steps(tmp_path: Path) -> list[str]:
    conn = sqlite3.connect(tmp_path / "ledger.db")
    try:
        return [json.loads(r[0])["step"] for r in conn.execute("SELECT data FROM ledger")]
    finally:
        conn.close()


@pytest.mark.parametrize(("mode", "switch_on"), [(UpdateMode.OFF, True), (UpdateMode.AUTO, False)])
def test_off_or_switch_off_never_refreshes(
    tmp_path: Path, mode: UpdateMode, switch_on: bool
) -> None:
    """updates: off, or the switch off: skipped before any network is touched."""
    apt = FakeApt(offered=["1.0", "2.0"])
    outcome, restarts = run(tmp_path, apt, mode, switch_on=switch_on)
    assert outcome is Outcome.SKIPPED
    assert apt.calls == [] and restarts == []
    assert steps(tmp_path) == ["skipped"]


def test_notify_says_available_and_installs_nothing(tmp_path: Path) -> None:
    """notify: the state file names the newer version; nothing is downloaded or installed."""
    apt = FakeApt(offered=["1.0", "2.0"], copies={"1.0"})
    outcome, restarts = run(tmp_path, apt, UpdateMode.NOTIFY)
    assert outcome is Outcome.AVAILABLE
    assert apt.calls == ["refresh"] and restarts == []
    state = read_state(tmp_path)
    assert state is not None and state.available == "2.0" and state.installed == "1.0"
    health = update_summary(tmp_path)  # what the health body's agent.update says
    assert health is not None
    assert (health["setting"], health["outcome"], health["available"]) == (
        "notify",
        "available",
        "2.0",
    )


def test_auto_applies_when_ready(tmp_path: Path) -> None:
    """auto: the way back first, then the new version, restarted and ready: applied."""
    apt = FakeApt(offered=["1.0", "2.0"])
    outcome, restarts = run(tmp_path, apt, UpdateMode.AUTO)
    assert outcome is Outcome.APPLIED
    assert apt.calls == ["refresh", "download 1.0", "download 2.0", "install pbx-agent_2.0.deb"]
    assert restarts == ["2.0"]
    assert steps(tmp_path) == ["check", "available", "downloaded", "installed", "applied"]
    assert verify(sqlite3.connect(tmp_path / "ledger.db")).ok


def test_auto_rolls_back_a_version_that_is_not_ready_and_holds_it(tmp_path: Path) -> None:
    """Not ready in time: the previous version reinstalled and restarted; never tried again."""
    apt = FakeApt(offered=["1.0", "2.0"])
    outcome, restarts = run(tmp_path, apt, UpdateMode.AUTO, ready=False)
    assert outcome is Outcome.ROLLED_BACK
    assert apt.installed_version == "1.0"
    assert restarts == ["2.0", "1.0"]
    assert steps(tmp_path)[-4:] == ["installed", "not_ready", "reinstalled", "rolled_back"]
    state = read_state(tmp_path)
    assert state is not None and state.held == ["2.0"]

    apt.calls.clear()
    outcome, restarts = run(tmp_path, apt, UpdateMode.AUTO, ready=False)
    assert outcome is Outcome.AVAILABLE
    assert apt.calls == ["refresh"] and restarts == []


def test_auto_refuses_without_a_way_back(tmp_path: Path) -> None:
    """No copy of the running version and the vendor no longer offers it: nothing installed."""
    apt = FakeApt(installed_version="1.0", offered=["2.0"])
    outcome, restarts = run(tmp_path, apt, UpdateMode.AUTO)
    assert outcome is Outcome.AVAILABLE
    assert apt.installed_version == "1.0" and restarts == []
    assert steps(tmp_path)[-1] == "refused"


def test_a_refused_source_is_recorded_and_raised(tmp_path: Path) -> None:
    """A signature or Valid-Until refusal: check_failed in the state file and the ledger."""
    apt = FakeApt(refuse="the vendor source was refused: E: Release file expired")
    with pytest.raises(UpdateError, match="expired"):
        run(tmp_path, apt, UpdateMode.AUTO)
    state = read_state(tmp_path)
    assert state is not None and state.outcome == "check_failed"
    assert steps(tmp_path) == ["check", "check_failed"]


def test_a_rollback_that_cannot_install_is_recorded_and_raised(tmp_path: Path) -> None:
    """The previous version will not reinstall either: rollback_failed, ledgered, raised."""
    apt = FakeApt(offered=["1.0", "2.0"], broken_install="_1.0")
    with pytest.raises(UpdateError, match=r"pbx-agent_1\.0"):
        run(tmp_path, apt, UpdateMode.AUTO, ready=False)
    assert steps(tmp_path)[-2:] == ["not_ready", "rollback_failed"]
    state = read_state(tmp_path)
    assert state is not None and state.outcome == "rollback_failed"
