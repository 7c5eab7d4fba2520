"""The ``noc`` command line: what an operator types, and the exit codes (sysexits)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import yaml

from tests.support.nocservice import REPO
from tests.support.pki import PKI


def noc(config: Path, *args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if password is not None:
        env["NOC_PASSWORD"] = password
    return subprocess.run(
        [sys.executable, "-m", "noc", "-c", str(config), *args],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=60, check=False,
    )  # fmt: skip


def test_accounts_devices_and_exit_codes(noc_dsn: str, pki: PKI, tmp_path: Path) -> None:
    """migrate is idempotent; org, user and device add work; bad input exits 64 or 78
    with a message naming what is wrong."""
    config = tmp_path / "noc.yaml"
    config.write_text(yaml.safe_dump({"database": noc_dsn}))
    assert "schema up to date" in noc(config, "migrate").stdout
    assert noc(config, "org", "add", "acme", "Acme Dental").returncode == 0
    assert noc(config, "user", "add", "ops", "--staff", password="long enough pw").returncode == 0
    short = noc(config, "user", "add", "alice", "--org", "acme", password="short")
    assert short.returncode == 64 and "at least 10 characters" in short.stderr
    nope = noc(config, "user", "add", "bob", "--org", "nope", password="long enough pw")
    assert nope.returncode == 64 and "no organization 'nope'" in nope.stderr
    cert = str(pki.device("pbx-test-1").cert)
    added = noc(config, "device", "add", "pbx-test-1", "--org", "acme", "--cert", cert)
    assert added.returncode == 0 and "valid until" in added.stdout
    assert "envelopes=0" in noc(config, "prune").stdout
    with psycopg.connect(noc_dsn) as conn:
        row = conn.execute(
            "SELECT o.slug, d.cert_not_after IS NOT NULL FROM devices d JOIN orgs o"
            " ON o.id = d.org_id WHERE d.device_id = 'pbx-test-1'"
        ).fetchone()
        hashed = conn.execute("SELECT password_hash FROM users WHERE username = 'ops'").fetchone()
    assert row == ("acme", True)
    assert hashed is not None and hashed[0].startswith("$argon2id$")
    config.write_text("database: 1\nbroker: {url: 'mqtt://x'}\n")
    bad = noc(config, "migrate")
    assert bad.returncode == 78
    assert "database:" in bad.stderr and "broker.url" in bad.stderr
    assert "usage" in noc(config, "ca", "--help").stdout  # the CA needs no configuration
