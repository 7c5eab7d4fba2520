"""The Debian package: lintian, install, upgrade with an edited conffile, remove, purge.

systemd is not PID 1 here, so the tests check what the package leaves on disk
(files, owners, modes, the user and groups) and run agentctl as the service's
user; the machine is left as found (purge in every teardown).
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import deb

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(deb.unavailable() is not None, reason=str(deb.unavailable())),
]

V1 = deb.V1
V2 = "0.1.0~test2"
CONF = Path("/etc/pbx-agent/agent.yaml")
AGENTCTL = "/usr/bin/agentctl"


@pytest.fixture(scope="module")
def built(deb_v1: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Version 1 built for real; version 2 the same tree, bumped, its default agent.yaml changed."""
    out = tmp_path_factory.mktemp("deb")
    v2 = deb.rebuild(deb_v1, out, V2, conf_suffix="# shipped with version 2\n")
    return {V1: deb_v1, V2: v2}


@pytest.fixture(scope="module")
def clean_machine() -> Iterator[set[str]]:
    """What the machine had before any test here (compared after the purge)."""
    before = deb.traces()
    try:
        yield before
    finally:
        deb.purge()


def as_user(user: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    """Run a command as ``user`` with that user's groups, as systemd's User= would."""
    return subprocess.run(
        ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *cmd],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip


def owner_mode(path: str) -> tuple[str, str, int]:
    st = os.stat(path)
    import grp

    return (
        pwd.getpwuid(st.st_uid).pw_name,
        grp.getgrgid(st.st_gid).gr_name,
        stat.S_IMODE(st.st_mode),
    )


@pytest.fixture(scope="module")
def lintian(built: dict[str, Path]) -> Iterator[subprocess.Popen[str] | None]:
    """lintian started at once on version 1 (10-20 s), to run beside the install tests."""
    if shutil.which("lintian") is None:
        yield None
        return
    proc = subprocess.Popen(
        ["lintian", "--fail-on", "error", str(built[V1])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_package_contents_are_self_contained(
    built: dict[str, Path], lintian: subprocess.Popen[str] | None
) -> None:
    """The venv runs Debian's python3.11 and holds no pip or byte-code; agent.yaml is a conffile."""
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(built[V1])], capture_output=True, text=True, check=True
    ).stdout
    assert "./opt/pbx-agent/venv/bin/python3.11 -> /usr/bin/python3.11" in listing
    assert "/site-packages/pip/" not in listing
    assert "__pycache__" not in listing
    assert "./lib/systemd/system/pbx-agent.service" in listing
    assert "./usr/lib/sysusers.d/pbx-agent.conf" in listing
    assert "./usr/lib/tmpfiles.d/pbx-agent.conf" in listing
    assert "./usr/share/man/man8/agentctl.8.gz" in listing
    assert "./usr/share/man/man5/agent.yaml.5.gz" in listing
    assert "./usr/share/bash-completion/completions/agentctl" in listing
    conffiles = subprocess.run(
        ["dpkg-deb", "-I", str(built[V1]), "conffiles"], capture_output=True, text=True, check=True
    ).stdout
    assert conffiles.split() == [str(CONF)]
    depends = subprocess.run(
        ["dpkg-deb", "-f", str(built[V1]), "Depends"], capture_output=True, text=True, check=True
    ).stdout
    assert "python3.11" in depends and "libc6 (>=" in depends


def test_install_reinstall_upgrade_remove_purge(
    built: dict[str, Path], clean_machine: set[str]
) -> None:
    """The life of the package on one machine, in order (one install, to stay fast):
    dpkg -i makes the user, groups, owners and modes and config check runs as the user;
    a reinstall changes nothing; an upgrade whose default agent.yaml changed asks and
    keeps the edit; remove keeps configuration and state; purge leaves nothing."""
    try:
        done = deb.dpkg("-i", str(built[V1]))
        assert done.returncode == 0, done.stdout + done.stderr
        check_installed()
        uid = pwd.getpwnam(deb.USER).pw_uid

        again = deb.dpkg("-i", str(built[V1]))  # a reinstall runs every script again
        assert again.returncode == 0, again.stdout + again.stderr
        assert pwd.getpwnam(deb.USER).pw_uid == uid
        assert owner_mode(str(CONF)) == ("root", "pbx-agent", 0o640)

        check_upgrade(built[V2], uid)
        check_remove_then_purge(clean_machine)
    finally:
        deb.purge()


def check_installed() -> None:
    """After dpkg -i: the system user and groups, owners and modes; config check as the user."""
    assert deb.status() == "install ok installed"
    user = pwd.getpwnam(deb.USER)
    assert user.pw_uid < 1000, "not a system user"
    assert user.pw_shell == "/usr/sbin/nologin"
    assert user.pw_dir == "/var/lib/pbx-agent"
    assert deb.groups_present() == list(deb.GROUPS)
    assert owner_mode("/etc/pbx-agent") == ("root", "pbx-agent", 0o750)
    assert owner_mode(str(CONF)) == ("root", "pbx-agent", 0o640)
    assert owner_mode("/etc/pbx-agent/tls") == ("pbx-agent", "pbx-agent", 0o700)
    assert owner_mode("/var/lib/pbx-agent") == ("pbx-agent", "pbx-agent", 0o750)
    assert owner_mode("/run/pbx-agent") == ("pbx-agent", "pbx-agent", 0o755)
    assert os.readlink(AGENTCTL) == "/opt/pbx-agent/venv/bin/agentctl"
    assert Path("/etc/systemd/system/timers.target.wants/pbx-agent-update.timer").is_symlink()
    assert not Path("/etc/systemd/system/multi-user.target.wants/pbx-agent.service").exists()

    syntax = as_user(deb.USER, AGENTCTL, "-c", str(CONF), "config", "check", "--syntax-only")
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr
    full = as_user(deb.USER, AGENTCTL, "-c", str(CONF), "config", "check", "-q")
    # The shipped file names TLS files the vendor has not sent yet: 78, each named,
    # judged for the service's own user.
    assert full.returncode == 78, full.stdout + full.stderr
    assert "user pbx-agent" in full.stdout + full.stderr
    assert "pbx-0001.key: the key file not found" in full.stdout + full.stderr
    stranger = as_user("nobody", AGENTCTL, "-c", str(CONF), "config", "check", "--syntax-only")
    assert stranger.returncode != 0, "a user outside the group read agent.yaml"


def check_upgrade(v2: Path, uid: int) -> None:
    """Upgrading to a build whose default agent.yaml changed: dpkg asks; 'N' keeps the edit."""
    edited = CONF.read_text().replace("device_id: pbx-0001", "device_id: pbx-edited")
    assert edited != CONF.read_text()
    CONF.write_text(edited)
    state = Path("/var/lib/pbx-agent/kept-by-upgrade")
    state.write_text("state")

    up = deb.dpkg("-i", str(v2), stdin="N\n")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "Configuration file '/etc/pbx-agent/agent.yaml'" in up.stdout + up.stderr
    assert deb.version() == V2
    assert CONF.read_text() == edited
    assert Path(f"{CONF}.dpkg-dist").read_text().endswith("# shipped with version 2\n")
    assert owner_mode(str(CONF)) == ("root", "pbx-agent", 0o640)
    assert state.read_text() == "state"
    assert pwd.getpwnam(deb.USER).pw_uid == uid
    check = as_user(deb.USER, AGENTCTL, "-c", str(CONF), "config", "check", "--syntax-only")
    assert check.returncode == 0, check.stdout + check.stderr


def check_remove_then_purge(clean_machine: set[str]) -> None:
    """remove: the venv goes, configuration and state stay; purge: nothing of it is left."""
    Path("/var/lib/pbx-agent/agent.db").write_text("not really")
    removed = deb.dpkg("--remove", deb.PACKAGE)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert not Path("/opt/pbx-agent").exists(), "byte-code or the venv stayed behind"
    assert not Path(AGENTCTL).exists()
    assert CONF.exists()
    assert Path("/var/lib/pbx-agent/agent.db").exists()
    assert deb.user_exists()

    purged = deb.dpkg("--purge", deb.PACKAGE)
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert deb.status() == ""
    assert not deb.user_exists()
    assert deb.groups_present() == []
    assert deb.traces() - clean_machine == set()


def test_failed_install_rolls_back(built: dict[str, Path], clean_machine: set[str]) -> None:
    """A postinst that fails (the state directory is a file) undoes the user and groups it made."""
    blocker = Path("/var/lib/pbx-agent")
    blocker.write_text("an administrator's file where the state directory goes\n")
    try:
        failed = deb.dpkg("-i", str(built[V1]))
        assert failed.returncode != 0
        assert "undoing what this install made" in failed.stderr
        assert not deb.user_exists()
        assert deb.groups_present() == []
        assert not Path("/etc/pbx-agent/tls").exists()
        purged = deb.dpkg("--purge", deb.PACKAGE)
        assert purged.returncode == 0, purged.stdout + purged.stderr
        assert blocker.read_text().startswith("an administrator's file"), "purge removed it"
    finally:
        deb.purge()
        blocker.unlink(missing_ok=True)
    assert deb.traces() - clean_machine == set()


@pytest.mark.skipif(
    shutil.which("lintian") is None, reason="lintian is missing (make test installs it)"
)
def test_lintian_finds_no_errors(lintian: subprocess.Popen[str] | None) -> None:
    """lintian --fail-on error passes (it ran beside the tests above); the only overrides
    are the two packaging/deb/lintian-overrides explains."""
    assert lintian is not None
    out, _ = lintian.communicate(timeout=180)
    assert lintian.returncode == 0, out
    assert "E: " not in out
