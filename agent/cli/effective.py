"""The effective configuration as ``agent.yaml`` text that validates when fed back.

``agentctl config check`` prints it. It is written in the file's own terms,
not the parsed objects': the key names of the configuration reference
(``collectors.health.pbx.ami``, ``callstats.source.csv``,
``uplink.broker``, ``support.bastion``), durations as ``30s``/``5m``/``1h``
and sizes as ``64KiB``/``1MiB``, mappings where the file has mappings. Every
value is present, defaults included, so it shows what takes effect. The one
change is a database password, masked (``***``): the text still validates, and
``tests/test_config_roundtrip.py`` checks that fed back it gives the same
configuration.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.confreader import format_duration

if TYPE_CHECKING:
    from agent.config import AgentConfig

#: Integer settings that are sizes (written 64KiB), by their key name; others are counts.
SIZE_KEYS = frozenset({"max_request", "max_file", "max_total", "max_bytes"})


def format_size(n: int) -> str:
    """The inverse of :func:`agent.confreader.parse_size` for display: 65536 → ``'64KiB'``."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def _plain(key: str, value: Any) -> Any:
    """A value as the file writes it (``key`` decides durations against counts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float):  # every float setting is a duration
        return format_duration(value)
    if isinstance(value, int):
        written = format_size(value) if key in SIZE_KEYS else str(value)
        return value if written.isdigit() else written
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, frozenset | set):
        return sorted(_plain(key, v) for v in value)
    if isinstance(value, tuple | list):
        return [_plain(key, v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(k, v) for k, v in value.items()}
    return value


def effective(config: AgentConfig) -> dict[str, Any]:
    """The configuration as a mapping in ``agent.yaml``'s own keys and forms."""
    from agent.logs import mask_secrets

    out: dict[str, Any] = {
        "device_id": config.device_id,
        "paths": _plain("paths", config.paths),
        "control": {
            k: (False if v is None else v)  # a disabled group is written `false`
            for k, v in _plain("control", config.control).items()
        },
        "log_level": config.log_level,
    }
    collectors = _plain("collectors", config.collectors)
    health = collectors["health"]
    ami = health.pop("ami")
    if ami is not None:
        health["pbx"] = {"ami": ami}
    extra = collectors["config"]["redact"]["extra"]
    extra["arguments"] = {
        name: list(pos) for name, pos in config.collectors.config.redact.extra.arguments
    }
    cs = collectors["callstats"]
    source: dict[str, Any] = {}
    csv, mariadb, table = cs.pop("csv"), cs.pop("mariadb"), cs.pop("table")
    if mariadb is not None:
        source = {"mariadb": mask_secrets(None, "", {"v": mariadb})["v"], "table": table}
    elif csv is not None:
        source = {"csv": csv}
    cs_out = {k: v for k, v in cs.items() if k not in ("directions",)}
    cs_out["source"] = source
    cs_out["directions"] = [
        {k: v for k, v in rule.items() if v is not None} for rule in cs["directions"]
    ]
    collectors["callstats"] = cs_out
    out["collectors"] = collectors
    out["policy"] = _plain("policy", config.policy)
    out["outbox"] = _plain("outbox", config.outbox)
    if config.uplink is not None:
        up = _plain("uplink", config.uplink)
        host, port = up.pop("host"), up.pop("port")
        out["uplink"] = {"broker": f"mqtts://{host}:{port}", **up}
    if config.support is not None:
        s = config.support
        pin = s.host_key
        key_text = pin.key.line()
        if pin.hosts:
            key_text = f"{','.join(pin.hosts)} {key_text}"
        sup = _plain("support", s)
        for k in ("bastion_host", "bastion_port", "bastion_user", "host_key", "services"):
            sup.pop(k)
        out["support"] = {
            "bastion": {
                "host": s.bastion_host,
                "port": s.bastion_port,
                "user": s.bastion_user,
                "host_key": key_text,
            },
            "services": {svc.name: f"{svc.host}:{svc.port}" for svc in s.services},
            **sup,
        }
    return out


def to_yaml(config: AgentConfig) -> str:
    """:func:`effective` as YAML text, in the reference's order."""
    import yaml

    return yaml.safe_dump(
        effective(config), sort_keys=False, default_flow_style=False, allow_unicode=True
    )
