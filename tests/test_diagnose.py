"""`agentctl diagnose` against the real mTLS mosquitto: each step ok, or the failing one named.

Faults are real: a name that does not resolve, a port nothing listens on, a
broker certificate from a CA the box does not pin, a certificate for another
device. With the switch off nothing is tried.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import switch
from agent.cli import main
from tests.support.daemon import base_config
from tests.support.mosquitto import Mosquitto
from tests.support.pki import PKI

pytestmark = pytest.mark.integration
DEVICE = "pbx-test-1"


def _run(
    tmp_path: Path, pki: PKI, capsys: pytest.CaptureFixture[str], **uplink: Any
) -> tuple[int, dict[str, dict[str, str]]]:
    creds = pki.device(uplink.pop("device", DEVICE))
    cfg = base_config(tmp_path)
    cfg["device_id"] = creds.cn
    cfg["uplink"] = {
        "ca_file": str(pki.ca_file),
        "cert_file": str(creds.cert),
        "key_file": str(creds.key),
        "connect_timeout": "3s",
        **uplink,
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    code = main(["-c", str(path), "diagnose", "--json", "--user", "root"])
    checks = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return code, {c["check"]: c for c in checks}


def verdicts(checks: dict[str, dict[str, str]], *names: str) -> list[str]:
    """The verdicts of ``names``, in order."""
    return [checks[n]["verdict"] for n in names]


NET = ("dns", "tcp", "tls", "mqtt")


def test_every_step_ok(
    tmp_path: Path, pki: PKI, broker: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole way to the broker works: each step ok, exit 0 (a stopped daemon only warns)."""
    code, checks = _run(tmp_path, pki, capsys, broker=f"mqtts://localhost:{broker.port}")
    assert code == 0, checks
    assert verdicts(checks, "config", "tls-files", "certificate", *NET) == ["ok"] * 7
    assert checks["mqtt"]["detail"].startswith(f"CONNACK: accepted as {DEVICE}")
    assert checks["daemon"]["verdict"] == "warn"
    assert checks["disk"]["verdict"] == "ok"


def test_unresolvable_name_fails_at_dns(
    tmp_path: Path, pki: PKI, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broker name that does not resolve: dns fails, nothing after it is tried, exit 69."""
    code, checks = _run(tmp_path, pki, capsys, broker="mqtts://nosuch.invalid:8883")
    assert code == 69
    assert verdicts(checks, *NET) == ["fail", "skip", "skip", "skip"]
    assert "nosuch.invalid" in checks["dns"]["detail"]


def test_closed_port_fails_at_tcp(
    tmp_path: Path, pki: PKI, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listens: dns ok, tcp fails naming host and port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, checks = _run(tmp_path, pki, capsys, broker=f"mqtts://127.0.0.1:{port}")
    assert code == 69
    assert verdicts(checks, *NET) == ["ok", "fail", "skip", "skip"]
    assert f"127.0.0.1:{port}" in checks["tcp"]["detail"]


def test_broker_from_another_ca_fails_at_tls(
    tmp_path: Path, pki: PKI, broker: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pinning another CA: the broker's certificate is refused at the TLS step."""
    code, checks = _run(
        tmp_path,
        pki,
        capsys,
        broker=f"mqtts://localhost:{broker.port}",
        ca_file=str(pki.rogue_ca_file),
    )
    assert code == 69
    assert verdicts(checks, *NET) == ["ok", "ok", "fail", "skip"]
    assert "not issued by the pinned CA" in checks["tls"]["detail"]


def test_switch_off_connects_nowhere(
    tmp_path: Path, pki: PKI, broker: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the customer's switch off, no network step runs."""
    switch.write_switch(tmp_path / "state", False, uid=0, via="test")
    code, checks = _run(tmp_path, pki, capsys, broker=f"mqtts://localhost:{broker.port}")
    assert code == 0
    assert verdicts(checks, *NET) == ["skip"] * 4
    assert all("switch is off" in checks[n]["detail"] for n in NET)
    assert checks["switch"]["verdict"] == "warn"


def test_bad_configuration_is_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A configuration that does not validate: one failed check, exit 78."""
    bad = tmp_path / "agent.yaml"
    bad.write_text("device_id: x\noutbox: {max_bytes: lots}\n")
    assert main(["-c", str(bad), "diagnose"]) == 78
    assert capsys.readouterr().out.startswith("fail  config")
