"""`config check` prints agent.yaml: fed back, it gives the same configuration.

Run through ``agentctl config check`` itself (its stdout is the text), over the
shipped ``etc/agent.yaml`` and variants that use every section whose written
form differs from the parsed one: durations and sizes, ``pbx.ami``, the
callstats ``source``, redaction ``arguments``, ``uplink.broker``, ``support``
with a known_hosts line, a disabled group.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from agent.cli import main
from agent.config import AgentConfig, load
from tests.support.sshd import KeyPair

REPO = Path(__file__).resolve().parents[1]


def _shipped(tmp_path: Path) -> str:
    return (REPO / "etc" / "agent.yaml").read_text()


def _everything(tmp_path: Path) -> str:
    secret = tmp_path / "ami.secret"
    secret.write_text("s3cr3t\n")
    secret.chmod(0o600)
    host_key = KeyPair().public_line
    return f"""
device_id: pbx-0042
paths: {{state_dir: {tmp_path}/state, runtime_dir: {tmp_path}/run}}
control: {{read_group: false, admin_group: wheel, max_request: 1500}}
log_level: debug
collectors:
  health:
    interval: 90s
    pbx_processes: [asterisk, "php-fpm.*"]
    pbx: {{ami: {{username: pbx-agent, secret_file: {secret}, timeout: 2.5s,
                  reconnect_max: 0.75h}}}}
  config:
    interval: 30m
    full_every: 2d
    max_file: 512KiB
    max_total: 0.5GiB
    never_read: [/etc/asterisk/private]
    redact: {{extra: {{keys: ["^crm_"], values: ["token=(\\\\w+)"],
                      arguments: {{CheckCode: [2, 3], Auth: [1]}}}}}}
  callstats:
    bucket: 15m
    min_count: 5
    settle: 0.5s
    source: {{mariadb: "mysql://agent:pw@127.0.0.1:3306/asteriskcdrdb", table: cdr2}}
    directions:
      - {{direction: inbound, context: "^from-trunk"}}
      - {{direction: outbound, channel: "^PJSIP/"}}
    default_direction: outbound
    trunks: [siptrunk1]
policy: {{send: [health]}}
outbox: {{max_bytes: 10MiB}}
uplink:
  broker: mqtts://noc.example.com
  ca_file: /etc/pbx-agent/tls/ca.pem
  cert_file: /etc/pbx-agent/tls/pbx-0042.pem
  key_file: /etc/pbx-agent/tls/pbx-0042.key
  keepalive: 45s
  reconnect_max: 2m
support:
  bastion: {{host: bastion.example.com, port: 2222,
             host_key: "[bastion.example.com]:2222 {host_key}"}}
  services: {{ssh: "127.0.0.1:22", web: "127.0.0.1:443"}}
  sshd_log: /var/log/auth.log
  max_window: 2h
"""


def _minimal(tmp_path: Path) -> str:
    return f"device_id: x\ncollectors: {{callstats: {{source: {{csv: {tmp_path}/M.csv}}}}}}\n"


def _same(a: AgentConfig, b: AgentConfig) -> None:
    assert dataclasses.replace(a, source=Path("-")) == dataclasses.replace(b, source=Path("-"))


@pytest.mark.parametrize("variant", [_shipped, _everything, _minimal])
def test_effective_configuration_validates_and_is_the_same(
    tmp_path: Path, variant: object, capsys: pytest.CaptureFixture[str]
) -> None:
    """The printed text is YAML in the file's own keys and forms, and loads to the same."""
    assert callable(variant)
    original = tmp_path / "agent.yaml"
    original.write_text(variant(tmp_path))
    capsys.readouterr()
    assert main(["config", "check", "--syntax-only", str(original)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# effective configuration from")
    printed = yaml.safe_load(text)
    again = tmp_path / "effective.yaml"
    again.write_text(text)
    assert main(["config", "check", "--syntax-only", "-q", str(again)]) == 0, capsys.readouterr()
    first, second = load(original), load(again)
    cs = first.collectors.callstats
    if cs.mariadb is not None:  # the one masked value: compare it masked
        assert printed["collectors"]["callstats"]["source"]["mariadb"].count("***") == 1
        assert "pw@" not in text
        masked = dataclasses.replace(cs, mariadb=second.collectors.callstats.mariadb)
        first = dataclasses.replace(
            first, collectors=dataclasses.replace(first.collectors, callstats=masked)
        )
    _same(first, second)
    # Written forms, not floats and byte counts: what a person would type.
    for line in text.splitlines():
        assert ".0\n" not in line + "\n", line
    assert printed["collectors"]["config"]["max_file"].endswith("iB")
    assert printed["outbox"]["max_bytes"].endswith("iB")


def test_written_forms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Durations, sizes and renamed keys are printed as the configuration reference writes them."""
    original = tmp_path / "agent.yaml"
    original.write_text(_everything(tmp_path))
    assert main(["config", "check", "--syntax-only", str(original)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    health = printed["collectors"]["health"]
    assert health["interval"] == "90s"
    assert health["pbx"]["ami"]["timeout"] == "2.5s"
    assert health["pbx"]["ami"]["reconnect_max"] == "45m"
    assert printed["collectors"]["config"]["max_total"] == "512MiB"
    assert printed["control"] == {"read_group": False, "admin_group": "wheel", "max_request": 1500}
    assert printed["collectors"]["config"]["redact"]["extra"]["arguments"] == {
        "CheckCode": [2, 3],
        "Auth": [1],
    }
    assert printed["uplink"]["broker"] == "mqtts://noc.example.com:8883"
    assert printed["support"]["bastion"]["port"] == 2222
    assert printed["support"]["services"] == {"ssh": "127.0.0.1:22", "web": "127.0.0.1:443"}
    assert "ami" not in health and "csv" not in printed["collectors"]["callstats"]
