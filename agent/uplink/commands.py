"""Commands from the NOC: parsed, checked and answered; never trusted.

A command arrives on ``pbx/<device>/cmd`` as ``{"v":1,"id","ts","cmd","args"}``.
Only the commands in :data:`ALLOWED` run, and none of them can widen what is
sent or turn the switch on: ``narrow`` only removes classes, and the switch is
not reachable from here at all. A payload that is too large, not JSON, of the
wrong shape, too old, from the future, or replayed (an id already seen) gets
an error reply and a ledger entry, and changes nothing.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from agent.ledger import Ledger
from agent.policy.classes import DataClass
from agent.policy.gate import Gate
from agent.store import transaction

MAX_COMMAND_BYTES = 16 * 1024
MAX_ID_LENGTH = 64
FUTURE_SKEW = 60.0  # seconds a command's ts may be ahead of our clock
ALLOWED = ("ping", "collect", "policy", "narrow")

_SEEN_SCHEMA = "CREATE TABLE IF NOT EXISTS seen_commands (id TEXT PRIMARY KEY, ts REAL NOT NULL)"


class CommandHost(Protocol):
    """What commands may touch in the daemon: the gate (to narrow) and the collectors."""

    gate: Gate

    def collectors_known(self) -> list[str]:
        """Names a ``collect`` may name."""
        ...

    def collect_now(self, name: str) -> None:
        """Run a collector at once."""
        ...


class Refused(Exception):
    """A command that gets an error reply."""


@dataclass(frozen=True, slots=True)
class Reply:
    """What to publish on the reply topic, and what the ledger records."""

    id: str | None
    ok: bool
    cmd: str | None
    result: Any = None
    error: str | None = None

    def payload(self) -> bytes:
        """The reply as sent: ``{"v":1,"id","ok","result"|"error"}``."""
        body: dict[str, Any] = {"v": 1, "id": self.id, "ok": self.ok}
        if self.ok:
            body["result"] = self.result
        else:
            body["error"] = self.error
        return json.dumps(body, separators=(",", ":")).encode()


def _parse_ts(value: object) -> float:
    if isinstance(value, bool):
        raise Refused('"ts" must be a time')
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise Refused('"ts" must be a finite time')
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    raise Refused('"ts" must be an ISO 8601 time or seconds since the epoch')


class CommandHandler:
    """Checks and runs NOC commands; remembers ids to refuse replays."""

    def __init__(
        self,
        *,
        conn: sqlite3.Connection,
        ledger: Ledger,
        host: CommandHost,
        max_age: float,
        switch_word: Callable[[], str],
    ) -> None:
        self.conn = conn
        self.ledger = ledger
        self.host = host
        self.max_age = max_age
        self.switch_word = switch_word
        conn.execute(_SEEN_SCHEMA)
        self.handled = 0
        self.refused = 0

    def handle(self, payload: bytes, now: float | None = None) -> Reply:
        """Answer one command payload, recording it in the ledger either way."""
        now = time.time() if now is None else now
        cmd_id: str | None = None
        cmd: str | None = None
        try:
            if len(payload) > MAX_COMMAND_BYTES:
                raise Refused(
                    f"command too large ({len(payload)} bytes; limit {MAX_COMMAND_BYTES})"
                )
            try:
                msg = json.loads(payload)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise Refused(f"command is not JSON: {exc}") from None
            except (ValueError, RecursionError) as exc:
                # Integers past int_max_str_digits, or nesting deeper than the stack.
                raise Refused(f"command is not acceptable JSON: {type(exc).__name__}") from None
            if not isinstance(msg, dict):
                raise Refused("command must be a JSON object")
            raw_id = msg.get("id")
            if isinstance(raw_id, str) and 0 < len(raw_id) <= MAX_ID_LENGTH:
                cmd_id = raw_id
            else:
                raise Refused(f'"id" must be a string of 1 to {MAX_ID_LENGTH} characters')
            version = msg.get("v")
            if type(version) is not int or version != 1:  # JSON true == 1 in Python
                raise Refused('unsupported protocol version (expected "v": 1)')
            raw_cmd = msg.get("cmd")
            if not isinstance(raw_cmd, str):
                raise Refused('"cmd" must be a string')
            cmd = raw_cmd[:64]
            ts = _parse_ts(msg.get("ts"))
            if now - ts > self.max_age:
                raise Refused(f"command too old ({now - ts:.0f} s; limit {self.max_age:.0f} s)")
            if ts - now > FUTURE_SKEW:
                raise Refused(f"command from the future ({ts - now:.0f} s ahead of this box)")
            args = msg.get("args", {})
            if args is None:
                args = {}
            if not isinstance(args, dict):
                raise Refused('"args" must be an object')
            if cmd not in ALLOWED:
                raise Refused(f"command {cmd!r} is not allowed (allowed: {', '.join(ALLOWED)})")
            self._remember(cmd_id, ts, now)
            result = self._run(cmd, args)
            reply = Reply(cmd_id, True, cmd, result=result)
            self.handled += 1
        except Refused as exc:
            reply = Reply(cmd_id, False, cmd, error=str(exc))
            self.refused += 1
        entry: dict[str, Any] = {"id": cmd_id, "cmd": cmd, "ok": reply.ok, "size": len(payload)}
        if reply.error:
            entry["error"] = reply.error
        self.ledger.record("command", entry)
        return reply

    def _remember(self, cmd_id: str, ts: float, now: float) -> None:
        with transaction(self.conn) as c:
            c.execute("DELETE FROM seen_commands WHERE ts < ?", (now - 2 * self.max_age - 60,))
            try:
                c.execute("INSERT INTO seen_commands VALUES (?, ?)", (cmd_id, now))
            except sqlite3.IntegrityError:
                raise Refused(f"command id {cmd_id!r} was already handled (replay)") from None

    def _run(self, cmd: str, args: dict[str, Any]) -> Any:
        gate = self.host.gate
        if cmd == "ping":
            return {"pong": time.time()}
        if cmd == "policy":
            return {
                "send": sorted(c.value for c in gate.policy.send),
                "effective": gate.effective(),
                "narrowed": sorted(gate.narrowed),
                "switch": self.switch_word(),
            }
        if cmd == "collect":
            name = args.get("collector")
            known = self.host.collectors_known()
            if name not in known:
                raise Refused(f"unknown collector {str(name)[:64]!r} (known: {', '.join(known)})")
            self.host.collect_now(str(name))
            return {"collecting": name}
        if cmd == "narrow":
            name = args.get("class")
            try:
                data_class = DataClass(str(name))
            except ValueError:
                raise Refused(f"unknown data class {str(name)[:64]!r}") from None
            gate.narrow(data_class)
            return {"narrowed": data_class.value, "effective": gate.effective()}
        raise Refused(f"command {cmd!r} is not allowed")  # unreachable: ALLOWED is checked
