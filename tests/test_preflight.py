"""`config check` catches what would fail at run time; the daemon checks the same at start.

TLS files are real files made by the test CA (tests/support/pki.py), damaged
the way an installation goes wrong: missing, unreadable by the service's
user, a key others can read, a certificate for another box. The daemon is the
real `agentctl run`, started as root and, for the runtime folder it cannot
make, as the unprivileged user nobody.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import REPO, AgentProcess, base_config
from tests.support.pki import PKI

DEVICE = "pbx-test-1"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")


def check(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``agentctl config check CFG ARGS``."""
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "config", "check", str(cfg), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
        timeout=60,
    )


@pytest.fixture
def tls(pki: PKI, tmp_path: Path) -> dict[str, Path]:
    """A private copy of the device's TLS files (the test may damage them)."""
    return copy_tls(pki, tmp_path)


def copy_tls(pki: PKI, where: Path) -> dict[str, Path]:
    """The device's CA, certificate and key (0600) copied into ``where``/tls."""
    folder = where / "tls"
    folder.mkdir()
    out = {
        "ca_file": folder / "vendor-ca.pem",
        "cert_file": folder / "device.crt",
        "key_file": folder / "device.key",
    }
    shutil.copy(pki.ca_file, out["ca_file"])
    shutil.copy(pki.device(DEVICE).cert, out["cert_file"])
    shutil.copy(pki.device(DEVICE).key, out["key_file"])
    os.chmod(out["key_file"], 0o600)
    return out


def write(tmp_path: Path, tls: dict[str, Path]) -> Path:
    """A configuration with an uplink naming ``tls``; the uplink keys sit on lines 5-7."""
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"device_id: {DEVICE}\n"
        f"paths: {{state_dir: {tmp_path}/state, runtime_dir: {tmp_path}/run}}\n"
        "uplink:\n"
        "  broker: mqtts://localhost:8883\n"
        f"  ca_file: {tls['ca_file']}\n"
        f"  cert_file: {tls['cert_file']}\n"
        f"  key_file: {tls['key_file']}\n"
    )
    return cfg


def test_good_material_passes(tmp_path: Path, tls: dict[str, Path]) -> None:
    """Readable files, a private key, a certificate for this device: exit 0."""
    r = check(write(tmp_path, tls))
    assert r.returncode == 0, r.stderr


def test_missing_tls_files_are_named_with_key_and_line(
    tmp_path: Path, tls: dict[str, Path]
) -> None:
    """Each missing file: its key, its line, exit 78 (before, `config check` said ok)."""
    cfg = write(tmp_path, tls)
    tls["cert_file"].unlink()
    tls["key_file"].unlink()
    r = check(cfg)
    assert r.returncode == 78, r.stderr
    assert f"{cfg}:6: uplink.cert_file: {tls['cert_file']}: the certificate file not found" in (
        r.stderr
    )
    assert f"{cfg}:7: uplink.key_file: {tls['key_file']}: the key file not found" in r.stderr
    assert "uplink.ca_file" not in r.stderr
    assert check(cfg, "--syntax-only").returncode == 0


def test_key_readable_by_others_is_refused(tmp_path: Path, tls: dict[str, Path]) -> None:
    """A key file of mode 0644 is refused as ssh refuses one, with the fix."""
    cfg = write(tmp_path, tls)
    os.chmod(tls["key_file"], 0o644)
    r = check(cfg)
    assert r.returncode == 78, r.stderr
    assert f"{cfg}:7: uplink.key_file: {tls['key_file']}: permissions 0644 are too open" in r.stderr
    assert f"chmod 600 {tls['key_file']}" in r.stderr


def test_certificate_for_another_device_is_refused(
    tmp_path: Path, tls: dict[str, Path], pki: PKI
) -> None:
    """A certificate and key of another box: the certificate file is named."""
    cfg = write(tmp_path, tls)
    other = pki.device("pbx-test-2")
    shutil.copy(other.cert, tls["cert_file"])
    shutil.copy(other.key, tls["key_file"])
    r = check(cfg)
    assert r.returncode == 78, r.stderr
    assert (
        f"{cfg}:6: uplink.cert_file: {tls['cert_file']}: the certificate is for 'pbx-test-2'"
        in (r.stderr)
    )


@needs_root
def test_files_the_service_user_cannot_read(open_root: Path, pki: PKI) -> None:
    """Run by root, the check judges for the service's user: root could read them, it cannot."""
    tls = copy_tls(pki, open_root)
    cfg = write(open_root, tls)
    os.chmod(tls["key_file"].parent, 0o755)
    r = check(cfg, "--user", "nobody")
    assert r.returncode == 78
    assert "(run-time checks for user nobody (uid 65534))" in r.stderr
    assert f"uplink.key_file: {tls['key_file']}: the key file user nobody (uid 65534) " in r.stderr
    assert "cannot read it (owner uid 0, group root, mode 0600)" in r.stderr
    os.chmod(tls["key_file"].parent, 0o700)
    r = check(cfg, "--user", "nobody")
    assert r.returncode == 78
    assert f"cannot enter the folder {tls['key_file'].parent} (mode 0700)" in r.stderr
    assert r.stderr.count("cannot enter the folder") == 3  # all three files are in it
    assert check(cfg, "--user", "root").returncode == 0


def test_unknown_user_is_a_usage_error(tmp_path: Path, tls: dict[str, Path]) -> None:
    """--user naming no user exits 64 and says so."""
    r = check(write(tmp_path, tls), "--user", "no-such-user-here")
    assert r.returncode == 64 and "no user named 'no-such-user-here'" in r.stderr


def test_config_check_loads_no_mqtt_stack(tmp_path: Path, tls: dict[str, Path]) -> None:
    """Config check loads neither MQTT nor cryptography, with or without an uplink: the TLS
    files are checked with the standard library (issue 17)."""
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"device_id: {DEVICE}\n")
    code = (
        "import sys; from agent.cli import main;"
        "code = main(['config', 'check', '-q', sys.argv[1]]);"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'aiomqtt', 'paho', 'cryptography', 'psutil'}); "
        "print(code, heavy) if 'agent.uplink.material' in sys.modules or "
        "'uplink' not in open(sys.argv[1]).read() else print('not checked')"
    )
    for cfg, expected in ((plain, "0 []"), (write(tmp_path, tls), "0 []")):
        r = subprocess.run(
            [sys.executable, "-c", code, str(cfg)],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
            timeout=60,
        )
        assert r.stdout.strip() == expected, r.stderr


# -- the daemon --------------------------------------------------------------------


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A folder other users can enter (pytest's tmp_path is root's alone)."""
    root = Path(tempfile.mkdtemp(prefix="pbx-agent-preflight-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty read-only filesystem: no one, root included, can make a folder in it."""
    where = tmp_path / "ro"
    where.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path: a socket path must stay under 108 bytes, and pytest's
    own (longer under parallel workers) would make the configuration itself the error."""
    path = Path(tempfile.mkdtemp(prefix="pf", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("obstacle", ["read-only filesystem", "a file in the way"])
def test_runtime_dir_that_cannot_be_made_exits_73(
    tmp_path: Path, short_dir: Path, obstacle: str, request: pytest.FixtureRequest
) -> None:
    """No runtime folder and none can be made: a clear error naming it, exit 73, no traceback.

    (Before: a raw PermissionError traceback and exit 1.)
    """
    if obstacle == "read-only filesystem":
        runtime = request.getfixturevalue("read_only_dir") / "pbx-agent"
        why = "Read-only file system"
    else:
        (short_dir / "plain-file").write_text("")
        runtime = short_dir / "plain-file" / "pbx-agent"
        why = "Not a directory"
    cfg = base_config(tmp_path)
    cfg["paths"]["runtime_dir"] = str(runtime)
    agent = AgentProcess(tmp_path, cfg)
    try:
        agent.start(wait_ready=False)
        assert agent.proc is not None
        assert agent.proc.wait(timeout=20) == 73, agent.log()
    finally:
        agent.close()
    text = agent.log()
    assert f"{runtime}: the runtime directory (paths.runtime_dir) does not exist" in text
    assert why in text and "Traceback" not in text
    events = [e for e in agent.log_events() if e.get("event") == "runtime_dir_unusable"]
    assert len(events) == 1 and events[0]["level"] == "error"
    assert not (agent.state_dir / "agent.db").exists()  # stopped before touching the state


def test_missing_runtime_dir_is_made(tmp_path: Path, short_dir: Path) -> None:
    """A runtime folder that does not exist yet is made, and the daemon serves in it."""
    cfg = base_config(tmp_path)
    cfg["paths"]["runtime_dir"] = str(short_dir / "run" / "deeper" / "pbx-agent")
    agent = AgentProcess(tmp_path, cfg)
    try:
        agent.start()
        assert agent.proc is not None
        sock = short_dir / "run" / "deeper" / "pbx-agent" / "control.sock"
        assert sock.is_socket()
        assert (sock.parent.stat().st_mode & 0o777) == 0o755
        assert agent.status()["daemon"]["pid"] == agent.proc.pid  # answers on that socket
    finally:
        agent.close()


def test_daemon_logs_tls_problems_at_start_and_runs_on(
    tmp_path: Path, tls: dict[str, Path]
) -> None:
    """A key others can read: an error event at start naming the key; the daemon serves."""
    os.chmod(tls["key_file"], 0o640)
    cfg = base_config(tmp_path)
    cfg["device_id"] = DEVICE
    cfg["uplink"] = {
        "broker": "mqtts://localhost:1",
        "ca_file": str(tls["ca_file"]),
        "cert_file": str(tls["cert_file"]),
        "key_file": str(tls["key_file"]),
    }
    agent = AgentProcess(tmp_path, cfg)
    try:
        agent.start()
        found = [e for e in agent.log_events() if e.get("event") == "preflight_problem"]
        assert len(found) == 1 and found[0]["level"] == "error"
        assert (
            found[0]["setting"] == "uplink.key_file" and "0640 are too open" in found[0]["problem"]
        )
        assert agent.status()["switch"]["state"] == "on"
    finally:
        agent.close()
