"""packaging/apt-install-quiet: what make test and make demo install starts and enables nothing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import debprobe

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "packaging" / "apt-install-quiet"
POLICY = Path("/usr/sbin/policy-rc.d")


def make_list(name: str) -> list[str]:
    """A package list as make expands it."""
    out = subprocess.run(
        ["make", "-s", "--no-print-directory", f"print-{name}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def readme_row(target: str) -> str:
    m = re.search(rf"^\| `{target}` \|(.*)$", (REPO / "README.md").read_text(), re.MULTILINE)
    assert m is not None, target
    return m.group(1)


def test_readme_lists_exactly_what_each_target_installs() -> None:
    """The README's table names every package of DEMO_PACKAGES and TEST_PACKAGES, and no other."""
    demo, test = make_list("DEMO_PACKAGES"), make_list("TEST_PACKAGES")
    assert set(demo) <= set(test), "the tests run the demo's components too"
    assert re.findall(r"`([a-z0-9.-]+)`", readme_row("make demo").split("(")[0]) == demo
    extra = re.findall(r"`([a-z0-9.-]+)`", readme_row("make test").split("(")[0])
    assert sorted(set(demo) | set(extra)) == sorted(test)
    deb = make_list("DEB_PACKAGES") + make_list("DEB_CHECK_PACKAGES")
    assert re.findall(r"`([a-z0-9.-]+)`", readme_row("make deb").split("(")[0]) == deb
    row = readme_row("make repo`, `make test-deb")
    assert re.findall(r"`([a-z0-9.-]+)`", row.split("(")[0]) == make_list("REPO_PACKAGES")
    assert "openssh-server" not in demo, "nothing in the demo uses an SSH server"


needs_root_skip = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("apt-get") is None,
    reason="installs a package: needs root on Debian",
)


@pytest.fixture(scope="module")
def probe_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The probe package, built once."""
    return debprobe.build(tmp_path_factory.mktemp("probe"))


@pytest.fixture
def machine_policy() -> Iterator[bytes | None]:
    """The machine's policy-rc.d as it was; put back whatever a test does to it."""
    before = POLICY.read_bytes() if POLICY.exists() else None
    mode = POLICY.stat().st_mode if POLICY.exists() else 0o755
    try:
        yield before
    finally:
        debprobe.purge()
        if before is None:
            POLICY.unlink(missing_ok=True)
        else:
            POLICY.write_bytes(before)
            POLICY.chmod(mode)
        Path(f"{POLICY}.pbx-agent-saved").unlink(missing_ok=True)


def installed() -> bool:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", debprobe.NAME], capture_output=True, text=True
    )
    return out.stdout == "install ok installed"


@pytest.mark.integration
@needs_root_skip
def test_the_probe_starts_and_enables_itself_on_a_plain_install(
    probe_deb: Path, machine_policy: bytes | None
) -> None:
    """Control: without a policy-rc.d, dpkg -i leaves the probe enabled (as sshd's does)."""
    POLICY.unlink(missing_ok=True)
    subprocess.run(["dpkg", "-i", str(probe_deb)], check=True, capture_output=True)
    assert installed()
    assert debprobe.POLICY_ANSWER.read_text().strip() == "absent"
    assert debprobe.WANTS_LINK.is_symlink()
    assert debprobe.rc_links() != []


@pytest.mark.integration
@needs_root_skip
def test_quiet_install_starts_and_enables_nothing(
    probe_deb: Path, machine_policy: bytes | None
) -> None:
    """With no policy-rc.d of the machine's own, the wrapper's denies the start, and it disables."""
    POLICY.unlink(missing_ok=True)
    out = subprocess.run([str(SCRIPT), str(probe_deb)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert installed()
    assert debprobe.POLICY_ANSWER.read_text().strip() == "101", "a start was not forbidden"
    assert not debprobe.MARKER.exists()
    assert not debprobe.WANTS_LINK.exists()
    assert debprobe.rc_links() == []
    assert "left disabled" in out.stdout
    assert not POLICY.exists(), "the wrapper's policy-rc.d stayed behind"


@pytest.mark.integration
@needs_root_skip
def test_quiet_install_puts_back_the_administrators_policy(
    probe_deb: Path, machine_policy: bytes | None
) -> None:
    """A policy-rc.d the machine had comes back byte for byte, even when apt fails."""
    mine = b"#!/bin/sh\n# the administrator's own\nexit 0\n"
    POLICY.write_bytes(mine)
    POLICY.chmod(0o755)
    ok = subprocess.run([str(SCRIPT), str(probe_deb)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert debprobe.POLICY_ANSWER.read_text().strip() == "101", "the administrator's exit 0 won"
    assert POLICY.read_bytes() == mine
    bad = subprocess.run(
        [str(SCRIPT), str(probe_deb.with_name("absent.deb"))], capture_output=True, text=True
    )
    assert bad.returncode != 0
    assert POLICY.read_bytes() == mine
