"""Sending an allow-listed command to a box and matching its reply by command id.

``noc send`` and the dashboard's command form both call :func:`send`: the
command is recorded (who sent it, when, what) before it is published on
``pbx/<device>/cmd``; the reply with the same id on ``pbx/<device>/reply`` is
recorded when it comes (here, and by the ingest workers, whichever is first),
or the call ends with :class:`CommandError` after the timeout. Every command is
signed with the command key in ``signing.key_file`` (:mod:`noc.signing`),
bound to the device and valid ``signing.lifetime``: a box runs nothing else.
The agent runs only its own allow-list and can only narrow what it sends; this list is the
NOC's side of it, so that a typo is refused here rather than by the box.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from noc import mqtt, signing
from noc.config import NocConfig
from noc.errors import CommandError, UsageError
from noc.store import DEVICE_ID

#: Each command and the arguments it takes: name -> the kind of value (``str``, or
#: ``ports``: ``NAME:PORT[,NAME:PORT…]`` on the command line, an object on the wire).
#: Required arguments are the first listed for ``collect`` and ``narrow``; for
#: ``support.connect`` ``ports`` is required and ``ticket``/``key`` are optional.
ALLOWED: dict[str, dict[str, str]] = {
    "ping": {},
    "policy": {},
    "collect": {"collector": "str"},
    "narrow": {"class": "str"},
    "support.connect": {"ports": "ports", "ticket": "str", "key": "str"},
    "support.disconnect": {},
    # Asks the box's update unit for a check; the box's setting and switch decide.
    "update.check": {},
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "collect": ("collector",),
    "narrow": ("class",),
    "support.connect": ("ports",),
}
#: The one argument the dashboard's form asks for, per command (None: none).
FORM_ARGUMENT: dict[str, str | None] = {c: (_REQUIRED.get(c) or (None,))[0] for c in ALLOWED}


@dataclass(frozen=True)
class Sent:
    """A command as sent, and its reply if one came in time."""

    command: dict[str, Any]
    reply: dict[str, Any] | None
    seconds: float


def new_id(now: float | None = None) -> str:
    """A unique id that sorts by time: milliseconds in hex, then 64 random bits."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:012x}{secrets.token_hex(8)}"


def make_command(cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """A wire-protocol v1 command; UsageError for a command or argument not allowed."""
    if cmd not in ALLOWED:
        raise UsageError(f"command {cmd!r} is not allowed (allowed: {', '.join(ALLOWED)})")
    kinds = ALLOWED[cmd]
    args = {k: _value(cmd, k, kinds.get(k), v) for k, v in (args or {}).items()}
    missing = [k for k in _REQUIRED.get(cmd, ()) if k not in args]
    if missing:
        raise UsageError(f"{cmd}: needs {', '.join(f'{k}=…' for k in missing)}")
    now = time.time()
    ts = dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="milliseconds")
    return {"v": 1, "id": new_id(now), "ts": ts.replace("+00:00", "Z"), "cmd": cmd, "args": args}


def _value(cmd: str, key: str, kind: str | None, value: Any) -> Any:
    if kind is None:
        raise UsageError(f"{cmd}: unexpected argument {key!r}")
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise UsageError(f"{cmd}: {key} must be a non-empty text")
        return value
    # ports: a mapping of service name to a port on the bastion's loopback
    if isinstance(value, str):
        pairs = [p.partition(":") for p in value.split(",") if p]
        if not pairs or any(not name or not sep for name, sep, _ in pairs):
            raise UsageError(f"{cmd}: {key} must be NAME:PORT[,NAME:PORT…]")
        try:
            value = {name: int(port) for name, _, port in pairs}
        except ValueError:
            raise UsageError(f"{cmd}: {key}: a port is not a number") from None
    if not isinstance(value, dict) or not value:
        raise UsageError(f"{cmd}: {key} must name at least one service")
    for name, port in value.items():
        if not isinstance(name, str) or type(port) is not int or not 0 < port < 65536:
            raise UsageError(f"{cmd}: {key}: {name!r} needs a port from 1 to 65535")
    return dict(value)


def parse_args(words: list[str]) -> dict[str, Any]:
    """``key=value`` words as a dict; UsageError for anything else."""
    out: dict[str, Any] = {}
    for w in words:
        key, sep, value = w.partition("=")
        if not sep or not key:
            raise UsageError(f"argument {w!r}: expected key=value")
        out[key] = value
    return out


def send(
    config: NocConfig,
    pool: ConnectionPool,
    device: str,
    cmd: str,
    args: dict[str, Any] | None = None,
    *,
    sent_by: str,
    timeout: float | None = None,
) -> Sent:
    """Record, publish and wait for the reply (None if none within ``timeout``)."""
    if not DEVICE_ID.match(device):
        raise UsageError(f"device {device!r}: not a device id")
    signer = signing.CommandSigner.load(config.signing.key_file)
    command = signer.sign(make_command(cmd, args), device, lifetime=config.signing.lifetime)
    wait = config.command_timeout if timeout is None else timeout
    with pool.connection() as conn:
        conn.execute(
            "INSERT INTO commands (id, device_id, cmd, args, sent_by) VALUES (%s, %s, %s, %s, %s)",
            (command["id"], device, cmd, Jsonb(command["args"]), sent_by),
        )
    t0 = time.monotonic()
    reply = _publish_and_wait(config, device, command, wait)
    seconds = time.monotonic() - t0
    if reply is not None:
        with pool.connection() as conn:
            record_reply(conn, device, reply)
    return Sent(command, reply, seconds)


def record_reply(conn: psycopg.Connection[Any], device: str, reply: dict[str, Any]) -> None:
    """Fill in the command's reply unless the ingest workers did already."""
    error = reply.get("error")
    conn.execute(
        "UPDATE commands SET reply_at = now(), ok = %s, result = %s, error = %s"
        " WHERE id = %s AND device_id = %s AND reply_at IS NULL",
        (
            reply.get("ok") if isinstance(reply.get("ok"), bool) else None,
            Jsonb(reply.get("result")),
            None if error is None else str(error)[:2000],
            reply.get("id"),
            device,
        ),
    )


def _publish_and_wait(
    config: NocConfig, device: str, command: dict[str, Any], wait: float
) -> dict[str, Any] | None:
    def pick(reply: Any) -> dict[str, Any] | None:
        return reply if isinstance(reply, dict) and reply.get("id") == command["id"] else None

    with mqtt.listening(
        config.broker,
        client_id=f"noc-send-{secrets.token_hex(4)}",
        topic=f"pbx/{device}/reply",
        pick=pick,
        confirm=5,
        unconfirmed="the broker did not confirm the reply subscription within 5 s",
    ) as (c, answer):
        info = c.publish(f"pbx/{device}/cmd", json.dumps(command).encode(), qos=1)
        info.wait_for_publish(5)
        if not info.is_published():
            raise CommandError(f"the broker did not take the command for {device} within 5 s")
        return answer.wait(wait)
