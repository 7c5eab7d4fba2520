"""Local redaction rules (collectors.config.redact.extra) and `agentctl snapshot --explain`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent import config
from agent.collectors.pbxconfig import parts
from agent.collectors.pbxconfig.collector import SnapshotCollector
from agent.collectors.pbxconfig.settings import SnapshotSettings
from agent.errors import ConfigError
from agent.policy.classes import Record

REPO = Path(__file__).resolve().parents[1]
GOOD = "device_id: pbx-0001\n"
CONF = Path("/etc/pbx-agent/agent.yaml")


def problems(text: str) -> list[str]:
    """The problems the loader reports for ``text``."""
    with pytest.raises(ConfigError) as info:
        config.loads(text, CONF)
    return [str(p) for p in info.value.problems]


def test_local_rules_load_and_compile() -> None:
    """keys, values and arguments are read into rules that mask what they name."""
    cfg = config.loads(
        GOOD + "collectors:\n  config:\n    redact:\n      extra:\n"
        "        keys: ['^crm_', 'license']\n"
        "        values: ['ACME-[0-9]{6}']\n"
        "        arguments: {CheckCode: [2], MyAgi: 1}\n"
    )
    rules = cfg.collectors.config.redact.extra.rules()
    assert rules.key_matches("CRM_LOGIN") and rules.key_matches("LicenseNumber")
    assert rules.secret_arguments("checkcode") == frozenset({2})
    assert rules.secret_arguments("myagi") == frozenset({1})
    assert [m.rule for m in rules.value_masks("id ACME-123456 here")] == ["local-value"]


def test_bad_regex_is_named_by_file_key_and_line() -> None:
    """A pattern that does not compile is an error naming file, key path and line."""
    (p,) = problems(
        GOOD + "collectors:\n  config:\n    redact:\n      extra:\n"
        "        keys: ['ok', '(unclosed']\n"
    )
    assert p.startswith(f"{CONF}:6: collectors.config.redact.extra.keys[1]: not a valid regular")


def test_patterns_that_match_everything_are_refused() -> None:
    """An empty pattern, or one matching the empty string, would mask every line: refused."""
    found = problems(
        GOOD + "collectors:\n  config:\n    redact:\n      extra:\n        values: ['', 'x*']\n"
    )
    assert len(found) == 2 and all("extra.values[" in p and ":6:" in p for p in found)


def test_bad_arguments_are_named() -> None:
    """Positions must be numbers from 1, names must be application names."""
    found = problems(
        GOOD + "collectors:\n  config:\n    redact:\n      extra:\n        arguments:\n"
        "          Good: [1]\n          Zero: [0]\n          Words: [first]\n"
        "          'not an app': [1]\n"
    )
    text = " | ".join(found)
    assert len(found) == 3
    assert f"{CONF}:8: collectors.config.redact.extra.arguments.Zero" in text
    assert f"{CONF}:9: collectors.config.redact.extra.arguments.Words" in text
    assert "arguments.not an app: is not an application or function name" in text


def test_there_is_no_key_to_remove_a_built_in_rule() -> None:
    """Only keys, values and arguments exist: 'remove', 'disable' or 'allow' are unknown keys."""
    found = problems(
        GOOD + "collectors:\n  config:\n    redact:\n      extra:\n        allow: [secret]\n"
        "      disable: [secret-key]\n"
    )
    assert len(found) == 2 and all("unknown key" in p for p in found)


def test_shipped_agent_yaml_documents_the_local_rules() -> None:
    """etc/agent.yaml shows redact.extra and still loads."""
    text = (REPO / "etc" / "agent.yaml").read_text()
    assert "redact:" in text and "extra:" in text
    extra = config.load(REPO / "etc" / "agent.yaml").collectors.config.redact.extra
    assert extra.keys == () and extra.values == () and extra.arguments == ()


def _tree(base: Path) -> Path:
    etc = base / "etc" / "asterisk"
    etc.mkdir(parents=True)
    (etc / "extensions_custom.conf").write_text(
        "[keep]\nexten => 1,1,Authenticate(Ex1Planted)\n same => n,CheckCode(1,Ex2Planted)\n"
        " same => n,Set(CRM_LOGIN=Ex3Planted)\n same => n,NoOp(ACME-123456)\n"
    )
    (etc / "sip.conf").write_text("[general]\nregister => u:Ex4Planted@h.example.com\n")
    return etc


def test_new_local_rules_redo_cached_results(tmp_path: Path) -> None:
    """Adding a local rule makes the next scan read the files again and mask what it names."""
    etc = _tree(tmp_path)
    sent: list[dict[str, Any]] = []

    def emit(r: Record) -> bool:
        sent.append(dict(r.body))
        return True

    plain = SnapshotSettings(roots=(etc,), exclude=())
    asyncio.run(SnapshotCollector(plain, tmp_path / "state").collect(emit, reason="command"))
    first = json.dumps(parts.reassemble(sent).texts)
    assert "Ex1Planted" not in first and "Ex2Planted" in first and "Ex3Planted" in first
    rules = config.loads(
        GOOD + "collectors:\n  config:\n    redact:\n      extra:\n"
        "        keys: ['^crm_']\n        arguments: {CheckCode: [2]}\n"
    ).collectors.config.redact
    stricter = SnapshotSettings(roots=(etc,), exclude=(), redact=rules)
    c = SnapshotCollector(stricter, tmp_path / "state")
    sent.clear()
    asyncio.run(c.collect(emit, reason="schedule"))
    assert c.status()["files_read"] == 2  # the cached results were made under other rules
    after = json.dumps(parts.reassemble(sent).texts)
    assert "Ex2Planted" not in after and "Ex3Planted" not in after


def _agentctl(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "-c", str(cfg), "snapshot", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_cli_explain_names_rule_and_line_never_the_value(tmp_path: Path) -> None:
    """--dry-run --explain lists, per file, each rule with its line, and no planted value."""
    etc = _tree(tmp_path)
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        GOOD + f"paths: {{state_dir: {tmp_path / 'state'}, runtime_dir: /tmp/pbxagent-rt}}\n"
        f"collectors:\n  config:\n    roots: [{etc}]\n    exclude: []\n"
        "    redact:\n      extra:\n        values: ['ACME-[0-9]{6}']\n"
    )
    r = _agentctl(cfg, "--dry-run", "--explain", "--no-content")
    assert r.returncode == 0, r.stderr
    report = r.stdout.split("# explain:", 1)[1]
    ext = report.split(str(etc / "extensions_custom.conf"), 1)[1].split("\n\n", 1)[0]
    assert "line 2: secret-argument (Authenticate argument 1)" in ext
    assert "line 5: local-value (value rule 1)" in ext
    assert "line 2: register-line (register)" in report.split(str(etc / "sip.conf"), 1)[1]
    for planted in ("Ex1Planted", "Ex4Planted", "123456"):
        assert planted not in r.stdout + r.stderr
