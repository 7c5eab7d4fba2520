"""Configuration: every kind of bad input is named by file, key and line, and exits 78."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent import config
from agent.errors import ConfigError
from agent.policy.classes import DataClass

REPO = Path(__file__).resolve().parents[1]
GOOD = "device_id: pbx-0001\n"


def problems(text: str) -> list[str]:
    """The problems the loader reports for ``text``."""
    with pytest.raises(ConfigError) as info:
        config.loads(text, Path("/etc/pbx-agent/agent.yaml"))
    return [str(p) for p in info.value.problems]


def test_shipped_default_is_valid() -> None:
    """etc/agent.yaml, the documented default, loads without a problem."""
    cfg = config.load(REPO / "etc" / "agent.yaml")
    assert cfg.device_id == "pbx-0001"
    assert cfg.uplink is not None and cfg.uplink.port == 8883
    assert cfg.policy.send == frozenset(DataClass)


def test_minimal_config_gets_defaults() -> None:
    """Only device_id is required; everything else has a documented default."""
    cfg = config.loads(GOOD)
    assert cfg.collectors.health.interval == 60
    assert cfg.paths.control_socket == Path("/run/pbx-agent/control.sock")
    assert cfg.uplink is None


def test_unknown_key_names_path_and_line() -> None:
    """A misspelt key is reported with its dotted path and line, and the known keys."""
    (p,) = problems(GOOD + "collectors:\n  health:\n    intervall: 5s\n")
    assert p.startswith("/etc/pbx-agent/agent.yaml:4: collectors.health.intervall: unknown key")
    assert "interval" in p


def test_wrong_type() -> None:
    """A list where a number is expected names the key and what was expected."""
    (p,) = problems(GOOD + "outbox:\n  max_bytes: [1, 2]\n")
    assert "outbox.max_bytes" in p and "expected a size" in p and ":3:" in p


def test_interval_out_of_range() -> None:
    """An interval below the floor is refused with the limit spelt out."""
    (p,) = problems(GOOD + "collectors:\n  health: {interval: 100ms}\n")
    assert "collectors.health.interval: must be at least 1s" in p


def test_bad_duration() -> None:
    """A duration that is not one says what a duration looks like."""
    (p,) = problems(GOOD + "collectors:\n  callstats: {bucket: soon}\n")
    assert "collectors.callstats.bucket" in p and "30s, 5m or 1h" in p


def test_relative_path_refused() -> None:
    """Paths must be absolute; the relative one is quoted back."""
    (p,) = problems(GOOD + "paths:\n  state_dir: var/lib\n")
    assert "paths.state_dir: must be an absolute path, got 'var/lib'" in p


def test_missing_required() -> None:
    """A missing device_id and missing uplink files are each reported."""
    found = problems("uplink:\n  broker: mqtts://noc.example:8883\n")
    joined = "\n".join(found)
    for key in (
        "device_id: is required",
        "uplink.ca_file: is required",
        "uplink.cert_file: is required",
        "uplink.key_file: is required",
    ):
        assert key in joined


def test_denied_class_is_a_config_error() -> None:
    """Listing voicemail (or any hard-denied class) in policy.send is refused by name."""
    (p,) = problems(GOOD + "policy:\n  send: [health, voicemail]\n")
    assert "policy.send" in p and "'voicemail' never leaves the box" in p


def test_plain_mqtt_refused() -> None:
    """The uplink must be mqtts://: an unencrypted broker URL is refused."""
    found = problems(
        GOOD + "uplink: {broker: 'mqtt://x:1883', ca_file: /a, cert_file: /b, key_file: /c}\n"
    )
    assert any("uplink.broker" in p and "mqtts://" in p for p in found)


def test_all_problems_reported_at_once() -> None:
    """Several mistakes give several problems in one run, not one per attempt."""
    found = problems("device_id: 'bad id!'\noutbox: {max_bytes: 1}\nfoo: 1\n")
    assert len(found) == 3


def test_invalid_yaml_names_line() -> None:
    """A YAML syntax error names the file and line."""
    (p,) = problems("device_id: x\ncollectors: [\n")
    assert p.startswith("/etc/pbx-agent/agent.yaml:") and "invalid YAML" in p


def test_duplicate_key() -> None:
    """A key given twice is an error (YAML would silently keep the last)."""
    (p,) = problems("device_id: a\ndevice_id: b\n")
    assert "duplicate key 'device_id'" in p and ":2" in p


def test_missing_file(tmp_path: Path) -> None:
    """A missing configuration file is named."""
    with pytest.raises(ConfigError, match="file not found"):
        config.load(tmp_path / "nope.yaml")


def test_config_check_cli_exit_codes(tmp_path: Path) -> None:
    """`agentctl config check` exits 0 on a good file and 78 naming the key on a bad one."""
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD + "collectors:\n  health: {interval: 0s}\n")
    cmd = [sys.executable, "-m", "agent.cli", "config", "check"]
    ok = subprocess.run([*cmd, str(good)], capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert "device_id: pbx-0001" in ok.stdout
    ko = subprocess.run([*cmd, str(bad)], capture_output=True, text=True, cwd=REPO)
    assert ko.returncode == 78
    assert f"{bad}:3: collectors.health.interval: must be at least 1s" in ko.stderr


def test_config_check_masks_database_password(tmp_path: Path) -> None:
    """The effective configuration printed by `config check` never shows the DB password."""
    f = tmp_path / "a.yaml"
    f.write_text(
        GOOD + "collectors:\n  callstats:\n    source:\n"
        "      mariadb: 'mysql://agent:s3cr3t-Pw@127.0.0.1/asteriskcdrdb'\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "config", "check", str(f)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert "s3cr3t-Pw" not in out.stdout + out.stderr
    assert "mysql://agent:***@127.0.0.1" in out.stdout
