"""Updates the customer controls, end to end: the installed package, a signed repository
served on loopback, apt confined to it, and the update unit's decisions.

The restart step is the update unit's ``--restart-command`` (systemd is not PID 1
here): tests/support/notify_restart.py starts the installed agent as pbx-agent
and waits for READY=1, as ``systemctl restart`` of the Type=notify unit would.
About a minute: ``make test-deb`` runs it; tests/test_updater.py has the same
decisions with apt replaced, in the suite.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import aptrepo, deb
from tests.support.notify_restart import stop

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.environ.get("PBX_AGENT_TEST_DEB") != "1",
        reason="about a minute of apt and dpkg: make test-deb runs it (PBX_AGENT_TEST_DEB=1)",
    ),
    pytest.mark.skipif(deb.unavailable() is not None, reason=str(deb.unavailable())),
    pytest.mark.skipif(
        subprocess.run(["which", "reprepro", "gpg"], capture_output=True).returncode != 0,
        reason="reprepro or gpg is missing (make test installs them)",
    ),
]

REPO = Path(__file__).resolve().parents[1]
V2 = "0.1.0~test2"
V3 = "0.1.0~test3"
CONF = Path("/etc/pbx-agent/agent.yaml")
READY_WITHIN = 8.0


@dataclass
class Rig:
    work: Path
    key: aptrepo.Key
    repo: aptrepo.Repo
    server: aptrepo.Server
    sources: Path
    update_dir: Path
    pidfile: Path
    debs: dict[str, Path]

    def configure(self, updates: str) -> None:
        """A local-only agent (no uplink: nothing to reconnect) with this setting."""
        CONF.write_text(f"device_id: pbx-0001\nupdates: {updates}\n")

    def update(self, *extra: str) -> subprocess.CompletedProcess[str]:
        restart = f"{sys.executable} -m tests.support.notify_restart {self.pidfile} {CONF}"
        return subprocess.run(
            ["/usr/bin/agentctl", "-c", str(CONF), "update", "run", "--json",
             "--dir", str(self.update_dir), "--sources", str(self.sources),
             "--ready-within", str(READY_WITHIN), "--restart-command", restart, *extra],
            capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
        )  # fmt: skip

    def state(self) -> dict[str, object]:
        return dict(json.loads((self.update_dir / "state.json").read_text()))

    def steps(self) -> list[str]:
        conn = sqlite3.connect(self.update_dir / "ledger.db")
        try:
            rows = conn.execute("SELECT data FROM ledger ORDER BY n").fetchall()
        finally:
            conn.close()
        return [json.loads(r[0])["step"] for r in rows]


def never_ready(tree: Path) -> None:
    """A broken build: its agentctl starts and never says READY=1."""
    wrapper = tree / "opt" / "pbx-agent" / "venv" / "bin" / "agentctl"
    wrapper.write_text("#!/bin/sh\n# broken on purpose by the test\nexec sleep 60\n")


@pytest.fixture(scope="module")
def rig(deb_v1: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """v1 installed; versions 2 and 3 (never ready) built; a signed repository with v1 served."""
    work = tmp_path_factory.mktemp("update")
    work.chmod(0o755)  # apt's _apt user reads the keyring below it
    debs = {
        deb.V1: deb_v1,
        V2: deb.rebuild(deb_v1, work, V2),
        V3: deb.rebuild(deb_v1, work, V3, edit=never_ready),
    }
    key = aptrepo.Key(work / "gnupg", "pbx-agent-test")
    repo = aptrepo.Repo(work / "repo", key)
    repo.publish(deb_v1)
    server = aptrepo.Server(repo.root)
    keyring = key.export(work / "vendor.pgp")
    sources = aptrepo.sources(work / "vendor.sources", server.url, keyring)
    done = deb.dpkg("-i", str(deb_v1))
    assert done.returncode == 0, done.stderr
    r = Rig(work, key, repo, server, sources, work / "state", work / "agent.pid", debs)
    try:
        yield r
    finally:
        stop(r.pidfile)
        server.close()
        key.close()
        deb.purge()


def test_off_or_switch_off_touches_nothing(rig: Rig) -> None:
    """updates: off, or the uplink switch off: skipped, and the repository sees no request."""
    rig.configure("auto")
    off = subprocess.run(["/usr/bin/agentctl", "-c", str(CONF), "uplink", "off"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert off.returncode == 0, off.stderr
    try:
        done = rig.update()
        assert done.returncode == 0, done.stderr
        assert rig.state()["outcome"] == "skipped"
        assert "switch is off" in str(rig.state()["detail"])
    finally:
        on = subprocess.run(["/usr/bin/agentctl", "-c", str(CONF), "uplink", "on"],
                            capture_output=True, text=True, check=False)  # fmt: skip
        assert on.returncode == 0, on.stderr
    rig.configure("off")
    done = rig.update()
    assert done.returncode == 0, done.stderr
    assert rig.state()["detail"] == "updates: off"
    assert rig.server.requests == []
    assert deb.version() == deb.V1


def test_another_key_or_an_expired_release_is_refused(rig: Rig, tmp_path: Path) -> None:
    """A repository signed by another key, or a frozen mirror past Valid-Until: check_failed."""
    rig.configure("auto")
    other = aptrepo.Key(tmp_path / "other-gnupg", "someone-else")
    other_repo = aptrepo.Repo(tmp_path / "other-repo", other)
    other_repo.publish(rig.debs[V2])
    other_server = aptrepo.Server(other_repo.root)
    try:
        aptrepo.sources(rig.sources.with_name("other.sources"), other_server.url,
                        rig.sources.with_name("vendor.pgp"))  # fmt: skip
        done = rig.update("--sources", str(rig.sources.with_name("other.sources")))
    finally:
        other_server.close()
        other.close()
    assert done.returncode == 69, done.stdout + done.stderr
    assert rig.state()["outcome"] == "check_failed"
    assert "NO_PUBKEY" in str(rig.state()["detail"]) or "signature" in str(rig.state()["detail"])

    frozen = aptrepo.Repo(tmp_path / "frozen", rig.key)
    frozen.publish(rig.debs[V2])
    frozen.expire()
    frozen_server = aptrepo.Server(frozen.root)
    try:
        aptrepo.sources(rig.sources.with_name("frozen.sources"), frozen_server.url,
                        rig.sources.with_name("vendor.pgp"))  # fmt: skip
        done = rig.update("--sources", str(rig.sources.with_name("frozen.sources")))
    finally:
        frozen_server.close()
    assert done.returncode == 69, done.stdout + done.stderr
    assert "expired" in str(rig.state()["detail"]).lower()
    assert deb.version() == deb.V1


def test_notify_then_auto_applies_and_a_broken_version_is_rolled_back(rig: Rig) -> None:
    """notify only says so; auto installs v2 (ready in time); v3, never ready, goes back to v2."""
    rig.configure("auto")
    done = rig.update()  # v1 is the newest: kept as the way back
    assert done.returncode == 0, done.stderr
    assert rig.state()["outcome"] == "current"
    assert "kept" in rig.steps()

    rig.repo.publish(rig.debs[V2])
    rig.configure("notify")
    done = rig.update()
    assert done.returncode == 0, done.stderr
    assert rig.state()["outcome"] == "available"
    assert rig.state()["available"] == V2
    assert deb.version() == deb.V1
    status = subprocess.run(["/usr/bin/agentctl", "update", "status", "--dir", str(rig.update_dir)],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert f"available {V2}" in status.stdout

    rig.configure("auto")
    done = rig.update()
    assert done.returncode == 0, done.stdout + done.stderr
    assert rig.state()["outcome"] == "applied", rig.state()
    assert deb.version() == V2
    assert CONF.read_text() == "device_id: pbx-0001\nupdates: auto\n", "the edited conffile"

    rig.repo.publish(rig.debs[V3])
    done = rig.update()
    assert done.returncode == 69, done.stdout + done.stderr
    state = rig.state()
    assert state["outcome"] == "rolled_back", state
    assert state["held"] == [V3]
    assert deb.version() == V2
    assert rig.steps()[-5:] == [
        "downloaded",
        "installed",
        "not_ready",
        "reinstalled",
        "rolled_back",
    ]

    again = rig.update()  # the broken version is not tried twice
    assert again.returncode == 0, again.stderr
    assert rig.state()["outcome"] == "available"
    assert deb.version() == V2
    verify = subprocess.run(
        [sys.executable, "-c",
         "import sqlite3,sys; from agent.ledger import verify; "
         f"v = verify(sqlite3.connect('{rig.update_dir / 'ledger.db'}')); print(v)"],
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr
