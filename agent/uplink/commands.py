"""Commands from the NOC: parsed, checked and answered; never trusted.

A command arrives on ``pbx/<device>/cmd`` as ``{"v":1,"id","ts","exp","device","cmd",
"args","key","sig"}``, signed by a command key the vendor's root certified
(:mod:`agent.uplink.signing`); an unsigned, wrongly signed, expired or
cross-device command is refused before its meaning is looked at, and its id is
not spent (a forgery cannot burn the id of a real command). Only the commands
in :data:`ALLOWED` run, and none of them can widen what is
sent or turn the switch on: ``narrow`` only removes classes, and the switch is
not reachable from here at all.

Whatever arrives gets exactly one reply and one ledger entry, and
:meth:`CommandHandler.handle` never raises: a payload that is too large, not
strict JSON (:mod:`agent.strictjson`: UTF-8, no duplicate keys, no NaN, no lone
surrogates, bounded depth and integers), of the wrong shape, too old, from the
future, or replayed (an id already seen) is refused; so is one that trips an
exception nobody foresaw, whatever its type. The ledger entry (and the id
remembered against replays) is committed *before* the command takes effect: a
command whose entry cannot be written does not run, and its reply says so.
Work per command is bounded by the 16 KiB cap, checked before parsing.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import structlog

from agent import strictjson
from agent.errors import CommandRefused, MalformedJSON
from agent.ledger import Ledger
from agent.logs import Throttle
from agent.policy.classes import DataClass
from agent.policy.gate import Gate
from agent.store import transaction
from agent.strictjson import printable
from agent.uplink.signing import CommandVerifier

log = structlog.get_logger(__name__)

MAX_COMMAND_BYTES = 16 * 1024
MAX_ID_LENGTH = 64
MAX_DEPTH = 8  # a command is two levels deep (message, args); room to grow, not to recurse
FUTURE_SKEW = 60.0  # seconds a command's ts may be ahead of our clock
ALLOWED = (
    "ping",
    "collect",
    "policy",
    "narrow",
    "support.connect",
    "support.disconnect",
    "update.check",
)

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


@runtime_checkable
class UpdateRequester(Protocol):
    """A host that can ask the update unit for a check (the daemon; test hosts need not)."""

    def update_setting(self) -> str:
        """The customer's ``updates:`` setting."""
        ...

    def request_update_check(self) -> None:
        """Ask for a check; the update unit decides, under the setting and the switch."""
        ...


@dataclass(frozen=True, slots=True)
class Reply:
    """What to publish on the reply topic, and what the ledger records."""

    id: str | None
    ok: bool
    cmd: str | None
    result: Any = None
    error: str | None = None

    def payload(self) -> bytes:
        """The reply as sent: ``{"v":1,"id","ok","result"|"error"}``; never raises."""
        body: dict[str, Any] = {"v": 1, "id": self.id, "ok": self.ok}
        if self.ok:
            body["result"] = self.result
        else:
            body["error"] = self.error
        try:
            return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError, RecursionError):
            fallback = {"v": 1, "id": None, "ok": False, "error": "the reply could not be encoded"}
            return json.dumps(fallback, separators=(",", ":")).encode()


@dataclass(slots=True)
class _Known:
    """What has been learned of a command so far: named in its reply even when refused."""

    id: str | None = None
    cmd: str | None = None
    spent: bool = False  # passed the envelope checks: its id may not be used again


@dataclass(frozen=True, slots=True)
class _Plan:
    """A checked command: its result, and its effect on the daemon (run once recorded)."""

    result: Any
    effect: Callable[[], None] = field(default=lambda: None)


def _valid_id(value: object) -> str | None:
    if (
        isinstance(value, str)
        and 0 < len(value) <= MAX_ID_LENGTH
        and value.isprintable()  # no control characters, no lone surrogates
    ):
        return value
    return None


def _parse_ts(value: object) -> float:
    if isinstance(value, bool):
        raise CommandRefused('"ts" must be a time')
    if isinstance(value, int | float):
        try:
            ts = float(value)
        except OverflowError:
            raise CommandRefused('"ts" must be a finite time') from None
        if not math.isfinite(ts):
            raise CommandRefused('"ts" must be a finite time')
        return ts
    if isinstance(value, str) and len(value) <= 64:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except (ValueError, OverflowError, OSError):
            pass  # e.g. year 9999 with a negative offset: out of the platform's range
    raise CommandRefused('"ts" must be an ISO 8601 time or seconds since the epoch')


def _best_effort_id(payload: bytes) -> str | None:
    """The id of a payload the strict parser refused, so the NOC can match the refusal."""
    try:
        msg = json.loads(payload)
    except Exception:  # anything at all: the refusal is already decided
        return None
    return _valid_id(msg.get("id")) if isinstance(msg, dict) else None


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
        verifier: CommandVerifier,
    ) -> None:
        self.conn = conn
        self.verifier = verifier
        self.ledger = ledger
        self.host = host
        self.max_age = max_age
        self.switch_word = switch_word
        conn.execute(_SEEN_SCHEMA)
        self.handled = 0
        self.refused = 0
        self.unexpected = 0  # refused after an exception nobody foresaw (a bug to report)
        self.not_ledgered = 0  # refused because the ledger could not be written
        self._quiet = Throttle()

    def stats(self) -> dict[str, int]:
        """Counters for status."""
        return {
            "handled": self.handled,
            "refused": self.refused,
            "unexpected": self.unexpected,
            "not_ledgered": self.not_ledgered,
        }

    def handle(self, payload: bytes, now: float | None = None) -> Reply:
        """Answer one command payload, recording it in the ledger; never raises."""
        try:
            return self._handle(payload, time.time() if now is None else now)
        except Exception as exc:  # the last line: the command loop must live
            self.refused += 1
            self.unexpected += 1
            self._log_refusal("noc_command_failed", None, None, type(exc).__name__)
            return Reply(None, False, None, error=_could_not(exc))

    def _handle(self, payload: bytes, now: float) -> Reply:
        known = _Known()
        plan: _Plan | None = None
        try:
            plan = self._check(payload, now, known)
            reply = Reply(known.id, True, known.cmd, result=plan.result)
        except CommandRefused as exc:
            reply = Reply(known.id, False, known.cmd, error=str(exc))
        except Exception as exc:  # any type: a payload found an unforeseen path
            self.unexpected += 1
            reply = Reply(known.id, False, known.cmd, error=_could_not(exc))
        try:
            reply = self._record(reply, len(payload), now, known)
        except Exception as exc:  # sqlite, a full disk, an encoding: all alike
            self.refused += 1
            self.not_ledgered += 1
            reason = printable(f"{type(exc).__name__}: {exc}", 120)
            self._log_refusal("noc_command_not_ledgered", known.id, known.cmd, reason)
            return Reply(
                known.id,
                False,
                known.cmd,
                error=f"command not run: the ledger could not be written ({reason})",
            )
        if reply.ok and plan is not None:
            plan.effect()
            self.handled += 1
            held = self._quiet.admit(f"accepted:{reply.cmd}")
            if held is not None:
                log.info("noc_command", id=reply.id, cmd=reply.cmd, not_logged_since_last=held)
        else:
            self.refused += 1
            self._log_refusal("noc_command_refused", reply.id, reply.cmd, reply.error)
        return reply

    def _check(self, payload: bytes, now: float, known: _Known) -> _Plan:
        if len(payload) > MAX_COMMAND_BYTES:
            raise CommandRefused(
                f"command too large ({len(payload)} bytes; limit {MAX_COMMAND_BYTES})"
            )
        try:
            msg = strictjson.loads(payload, max_depth=MAX_DEPTH)
        except MalformedJSON as exc:
            known.id = _best_effort_id(payload)
            raise CommandRefused(f"command is not acceptable JSON: {exc}") from None
        if not isinstance(msg, dict):
            raise CommandRefused("command must be a JSON object")
        known.id = _valid_id(msg.get("id"))
        if known.id is None:
            raise CommandRefused(
                f'"id" must be a string of 1 to {MAX_ID_LENGTH} printable characters'
            )
        version = msg.get("v")
        if type(version) is not int or version != 1:  # JSON true == 1 in Python
            raise CommandRefused('unsupported protocol version (expected "v": 1)')
        raw_cmd = msg.get("cmd")
        if not isinstance(raw_cmd, str):
            raise CommandRefused('"cmd" must be a string')
        known.cmd = printable(raw_cmd)
        self.verifier.check(msg, now)
        ts = _parse_ts(msg.get("ts"))
        if now - ts > self.max_age:
            raise CommandRefused(f"command too old ({now - ts:.0f} s; limit {self.max_age:.0f} s)")
        if ts - now > FUTURE_SKEW:
            raise CommandRefused(f"command from the future ({ts - now:.0f} s ahead of this box)")
        args = msg.get("args", {})
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise CommandRefused('"args" must be an object')
        if raw_cmd not in ALLOWED:
            raise CommandRefused(
                f"command '{known.cmd}' is not allowed (allowed: {', '.join(ALLOWED)})"
            )
        known.spent = True
        return self._plan(raw_cmd, args, known.id)

    def _record(self, reply: Reply, size: int, now: float, known: _Known) -> Reply:
        """Remember the id and append the ledger entry in one transaction; a replay is refused."""
        with transaction(self.conn, "recording a NOC command", follows=self.ledger) as c:
            if known.spent and known.id is not None:
                c.execute("DELETE FROM seen_commands WHERE ts < ?", (now - 2 * self.max_age - 60,))
                try:
                    c.execute("INSERT INTO seen_commands VALUES (?, ?)", (known.id, now))
                except sqlite3.IntegrityError:
                    reply = Reply(
                        known.id,
                        False,
                        known.cmd,
                        error=f"command id {known.id!r} was already handled (replay)",
                    )
            entry: dict[str, Any] = {
                "id": reply.id,
                "cmd": reply.cmd,
                "ok": reply.ok,
                "size": size,
            }
            if reply.error:
                entry["error"] = reply.error
            self.ledger.append("command", entry)
        return reply

    def _plan(self, cmd: str, args: dict[str, Any], cmd_id: str | None = None) -> _Plan:
        if cmd.startswith("support."):
            # Remote support checks its own locks (window, ticket, switch): agent.uplink.support.
            from agent.uplink.support import plan_command

            return _Plan(*plan_command(self.host, cmd, args, cmd_id))
        gate = self.host.gate
        if cmd == "ping":
            return _Plan({"pong": time.time()})
        if cmd == "policy":
            return _Plan(
                {
                    "send": sorted(c.value for c in gate.policy.send),
                    "effective": gate.effective(),
                    "narrowed": sorted(gate.narrowed),
                    "switch": self.switch_word(),
                }
            )
        if cmd == "collect":
            name = args.get("collector")
            known = self.host.collectors_known()
            if not isinstance(name, str) or name not in known:
                raise CommandRefused(
                    f"unknown collector {_quote(name)} (known: {', '.join(known)})"
                )
            collector: str = name
            return _Plan({"collecting": collector}, lambda: self.host.collect_now(collector))
        if cmd == "narrow":
            name = args.get("class")
            try:
                data_class = DataClass(name) if isinstance(name, str) else None
            except ValueError:
                data_class = None
            if data_class is None:
                raise CommandRefused(f"unknown data class {_quote(name)}")
            after = sorted(c.value for c in gate.policy.send - gate.narrowed - {data_class})
            return _Plan(
                {"narrowed": data_class.value, "effective": after},
                lambda: gate.narrow(data_class),
            )
        if cmd == "update.check":
            host = self.host
            if not isinstance(host, UpdateRequester):
                raise CommandRefused("update checks are not available on this box")
            setting = host.update_setting()
            if setting == "off":
                raise CommandRefused("the customer turned updates off on this box (updates: off)")
            # A request: the update unit still reads the switch and the setting itself.
            return _Plan({"requested": "check", "updates": setting}, host.request_update_check)
        raise CommandRefused(f"command {cmd!r} is not allowed")  # unreachable: ALLOWED is checked

    def _log_refusal(self, event: str, cmd_id: str | None, cmd: str | None, error: Any) -> None:
        # Every command is in the ledger; the log says so once per interval and kind, with a
        # count, so that a NOC cannot flood the journal.
        held = self._quiet.admit(event)
        if held is not None:
            log.warning(event, id=cmd_id, cmd=cmd, error=error, not_logged_since_last=held)


def _quote(value: object) -> str:
    """An untrusted argument, quoted for an error message: printable and short."""
    if isinstance(value, str):
        return repr(printable(value))
    return f"of type {type(value).__name__}"


def _could_not(exc: BaseException) -> str:
    return f"command refused: it could not be handled ({type(exc).__name__})"
