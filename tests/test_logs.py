"""Logs: key-value JSON under systemd, readable in a terminal, and never a secret."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from agent import logs
from tests.support.daemon import AgentProcess, base_config, wait_for

CANARY = "Pw-CANARY-7f3a9"


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """structlog's configuration is global: put it back after each test."""
    yield
    structlog.reset_defaults()


def test_mask_secret_keys_and_url_passwords() -> None:
    """Secret-named keys and URL passwords are masked; other values pass unchanged."""
    event = logs.mask_secrets(
        None,
        "info",
        {
            "event": "x",
            "password": CANARY,
            "db_secret": CANARY,
            "api_token": CANARY,
            "dsn": f"mysql://agent:{CANARY}@127.0.0.1:3306/asteriskcdrdb",
            "count": 3,
            "path": "/etc/asterisk/pjsip.conf",
        },
    )
    assert CANARY not in json.dumps(event)
    assert event["dsn"] == "mysql://agent:***@127.0.0.1:3306/asteriskcdrdb"
    assert event["count"] == 3
    assert event["path"] == "/etc/asterisk/pjsip.conf"


def test_json_lines_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off a terminal (systemd, pipes) each event is one JSON object with its keys."""
    monkeypatch.delenv("PBX_AGENT_LOG_FORMAT", raising=False)
    out = io.StringIO()
    logs.configure("info", stream=out)
    structlog.get_logger("t").warning("uplink_failed", error="refused", password=CANARY)
    line = json.loads(out.getvalue())
    assert line["event"] == "uplink_failed"
    assert line["level"] == "warning"
    assert line["error"] == "refused"
    assert line["password"] == "***"


def test_level_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    """--log-level warning drops info events."""
    monkeypatch.setenv("PBX_AGENT_LOG_FORMAT", "json")
    out = io.StringIO()
    logs.configure("warning", stream=out)
    structlog.get_logger("t").info("chatty")
    structlog.get_logger("t").error("important")
    events = [json.loads(x)["event"] for x in out.getvalue().splitlines()]
    assert events == ["important"]


@pytest.mark.integration
def test_daemon_never_logs_the_database_password(tmp_path: Path) -> None:
    """A CDR database that refuses us is reported in log and status without its password."""
    cfg = base_config(tmp_path)
    cfg["collectors"]["callstats"] = {
        "interval": "1s",
        "source": {"mariadb": f"mysql://agent:{CANARY}@127.0.0.1:1/asteriskcdrdb"},
    }
    agent = AgentProcess(tmp_path, cfg)
    try:
        agent.start()
        st = wait_for(
            lambda: (s := agent.status())["collectors"]["callstats"]["last_error"] and s,
            timeout=15,
            what="the source error",
        )
        assert CANARY not in json.dumps(st)
        out = agent.ctl("status")
        assert CANARY not in out.stdout + out.stderr
        check = agent.ctl("config", "check")
        assert CANARY not in check.stdout + check.stderr
    finally:
        agent.close()
    assert agent.log()
    assert CANARY not in agent.log()
