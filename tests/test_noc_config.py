"""The NOC's configuration: the shipped default parses to the defaults; bad values are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from noc.config import NocConfig, load, parse
from noc.errors import ConfigError

SHIPPED = Path(__file__).resolve().parents[1] / "etc" / "noc.yaml"


def test_shipped_default_is_the_defaults() -> None:
    """etc/noc.yaml says exactly what the code defaults to (one source of truth, checked)."""
    shipped = load(SHIPPED)
    default = NocConfig()
    for section in (
        "broker",
        "ingest",
        "web",
        "alerts",
        "retention",
        "signing",
        "enroll",
        "revocation",
    ):
        assert getattr(shipped, section) == getattr(default, section), section
    assert shipped.database == default.database
    assert shipped.command_timeout == default.command_timeout


def test_every_problem_is_named_at_once() -> None:
    """Unknown keys, wrong types and a plain-text broker URL are all reported, by key."""
    with pytest.raises(ConfigError) as err:
        parse(
            {
                "broker": {"url": "mqtt://broker", "colour": "blue"},
                "alerts": {"disk_pct": "full", "interval": "soon"},
                "extra": 1,
            },
            "noc.yaml",
        )
    text = str(err.value)
    for key in ("broker.url", "broker.colour", "alerts.disk_pct", "alerts.interval", "extra"):
        assert key in text
    assert text.startswith("noc.yaml: ")
