"""A small asyncio client for Asterisk's Manager Interface (AMI), on this box only.

Why our own and not panoramisk (packaged in Debian, on PyPI): its last release
is 1.4 of 2021; it has no type hints; it reconnects after a fixed delay, bounds
no action in time, and an action whose list was cut by a dropped connection is
neither answered nor failed: its future waits for ever. What we need is
smaller: one long-lived connection, a login, a timeout on every action,
``ActionID`` correlation with lists (``EventList: start`` ... ``Complete``), and
every failure turned into a state the health record can report.

The protocol, as ``main/manager.c`` writes it: on connect a banner line
``Asterisk Call Manager/<version>\\r\\n``, then messages of ``Key: Value\\r\\n``
lines ended by an empty line. A reply names the ``ActionID`` it answers; a list
reply is ``Response: Success`` with ``EventList: start``, one event per item
carrying the same ``ActionID``, and a closing event with ``EventList:
Complete``. Anything else (asynchronous events) is counted and dropped: we log
in with ``Events: off``, but must not be confused by an event that slips in.

The client may only send the read-only actions in :data:`ALLOWED_ACTIONS`:
Asterisk checks actions against the account's *write* classes, and the
``system`` class that ``PJSIPShowContacts`` needs also allows ``Reload``,
``MixMonitor`` or ``Hangup``, so the limit is also kept here, in code.

This module and the CDR database driver are the only places under
``agent/collectors/`` that open a connection (tests/test_layout.py): AMI is a
source on the box, like the CDR database, never the vendor.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import itertools
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import structlog

from agent.collectors.health.settings import AmiSettings, read_secret
from agent.errors import CollectorError, SecretFileError

log = structlog.get_logger(__name__)

#: The only actions this client will send: each reads, none changes anything.
ALLOWED_ACTIONS: Final = frozenset(
    {
        "Login",
        "Logoff",
        "Ping",
        "CoreStatus",
        "CoreSettings",
        "CoreShowChannels",
        "PJSIPShowRegistrationsOutbound",
        "PJSIPShowContacts",
        "PJSIPShowEndpoints",
        "SIPshowregistry",
        "QueueSummary",
    }
)
BANNER: Final = b"Asterisk Call Manager/"
#: One message larger than this is not AMI talking (Asterisk's own are a few KiB).
MAX_MESSAGE: Final = 1024 * 1024
_READ: Final = 256 * 1024
BACKOFF_BASE: Final = 1.0

#: One AMI message: its fields in the order received (a repeated key keeps every value,
#: joined by ``\n``: an endpoint with two AoRs has two ``Contacts`` lines).
Message = dict[str, str]


class AmiState(StrEnum):
    """Where the connection is."""

    DISCONNECTED = "disconnected"
    CONNECTED = "connected"
    CLOSED = "closed"


class AmiFault(StrEnum):
    """Why Asterisk could not be asked: what the health record reports as ``reason``."""

    REFUSED = "refused"  # nothing listens on the port: Asterisk is down or AMI is off
    UNREACHABLE = "unreachable"  # the host or network failed otherwise
    TIMEOUT = "timeout"  # connect, login or an action took longer than the timeout
    AUTH_FAILED = "auth_failed"  # Asterisk refused the username or secret
    CLOSED = "closed"  # Asterisk closed the connection (restart, shutdown, kicked)
    PROTOCOL = "protocol"  # what answered is not AMI, or said something we cannot read
    # The secret file cannot be used (missing, loose permissions); S105: a reason code.
    SECRET_FILE = "secret_file"  # noqa: S105


class AmiError(CollectorError):
    """Asterisk could not be asked; ``fault`` is the reason code, the message says more."""

    def __init__(self, fault: AmiFault, detail: str, retry_in: float | None = None) -> None:
        super().__init__(f"AMI {fault}: {detail}")
        self.fault = fault
        self.detail = detail
        self.retry_in = retry_in


@dataclass(slots=True)
class Reply:
    """What an action got back: the response and, for a list, its events and closing event."""

    response: Message
    events: list[Message] = field(default_factory=list)
    complete: Message | None = None

    @property
    def ok(self) -> bool:
        """``Response: Success`` (a list counts only once it is complete)."""
        return self.response.get("Response") == "Success"

    @property
    def message(self) -> str:
        """The ``Message`` field (for errors: why)."""
        return self.response.get("Message", "")


@dataclass(slots=True)
class _Pending:
    is_list: bool
    done: asyncio.Future[None]
    response: Message | None = None
    events: list[Message] = field(default_factory=list)
    complete: Message | None = None


def parse_message(block: str) -> Message:
    """``Key: Value`` lines into a dict; a line without a colon is kept under ``""``.

    The common message (every line ``Key: Value``, no key twice) is built by one
    ``dict()`` over the split lines: this parse was two thirds of a collection's CPU.
    """
    lines = block.split("\r\n")
    pairs = [line.split(": ", 1) for line in lines]
    try:
        msg: Message = dict(pairs)  # ValueError on a line without ": "
    except ValueError:
        return _parse_lines(lines)
    return msg if len(msg) == len(pairs) else _parse_lines(lines)


def _parse_lines(lines: list[str]) -> Message:
    """The careful parse: repeated keys, ``Key:value`` without a space, stray lines."""
    msg: Message = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if not sep:
            if line:
                msg[""] = f"{msg['']}\n{line}" if "" in msg else line
            continue
        value = value[1:] if value[:1] == " " else value
        if key in msg:
            msg[key] = f"{msg[key]}\n{value}"
        else:
            msg[key] = value
    return msg


def backoff_delay(attempt: int, cap: float, rng: Callable[[float, float], float]) -> float:
    """Seconds to wait after ``attempt`` failures: doubling from 1 s, capped, half of it random.

    Half jitter rather than full: a refused port must be tried less and less
    often (full jitter can draw zero many times in a row), while boxes that lost
    Asterisk together still spread their retries.
    """
    ceiling = min(cap, BACKOFF_BASE * 2.0 ** max(attempt - 1, 0))
    return ceiling / 2 + rng(0.0, ceiling / 2)


class AmiClient:
    """One long-lived, logged-in AMI connection, opened on first use and after a failure.

    Not a context manager on purpose: the health collector keeps it between
    runs and closes it in its own ``aclose()``. Every public call either returns
    a :class:`Reply` or raises :class:`AmiError`; nothing else escapes.
    """

    def __init__(
        self,
        settings: AmiSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._rng = rng
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self._prefix = f"pbx-agent-{os.getpid()}-"
        self._lock = asyncio.Lock()
        self._closing = False
        self.state = AmiState.DISCONNECTED
        self.version: str | None = None  # the AMI protocol version of the banner
        self.failures = 0  # consecutive failed connections: the backoff's exponent
        self.retry_at = 0.0
        self.last_fault: AmiFault | None = None
        self.last_detail: str | None = None
        self.connects = 0
        self.attempts = 0
        self.events_ignored = 0
        self.drops = 0

    # -- public -----------------------------------------------------------------------------

    async def action(self, name: str, **fields: str) -> Reply:
        """Send one action and wait for its response (within the timeout)."""
        return await self._ask(name, fields, is_list=False)

    async def list(self, name: str, **fields: str) -> Reply:
        """Send a list action and wait for its ``EventList: Complete`` (within the timeout)."""
        return await self._ask(name, fields, is_list=True)

    def status(self) -> dict[str, Any]:
        """Connection state and counters for ``agentctl status`` (no secret, no address book)."""
        wait = self.retry_at - self._clock()
        return {
            "state": self.state.value,
            "address": f"{self.settings.host}:{self.settings.port}",
            "username": self.settings.username,
            "ami_version": self.version,
            "connects": self.connects,
            "attempts": self.attempts,
            "drops": self.drops,
            "last_fault": self.last_fault.value if self.last_fault else None,
            "last_detail": self.last_detail,
            "retry_in": round(wait, 1) if self.state != AmiState.CONNECTED and wait > 0 else None,
            "events_ignored": self.events_ignored,
        }

    async def aclose(self) -> None:
        """Log off (briefly) and close; the client can be used again afterwards."""
        async with self._lock:
            self._closing = True
            try:
                if self.state == AmiState.CONNECTED and self._writer is not None:
                    with contextlib.suppress(AmiError, TimeoutError):
                        # The daemon gives a collector 1 s to close: log off within half.
                        async with asyncio.timeout(min(self.settings.timeout, 0.5)):
                            await self._exchange("Logoff", {}, is_list=False)
                await self._disconnect()
                self.state = AmiState.DISCONNECTED
            finally:
                self._closing = False

    # -- connection -------------------------------------------------------------------------

    async def _ask(self, name: str, fields: dict[str, str], *, is_list: bool) -> Reply:
        if name not in ALLOWED_ACTIONS:
            raise CollectorError(f"AMI action {name!r} is not one this agent may send")
        async with self._lock:
            await self._ensure()
            try:
                async with asyncio.timeout(self.settings.timeout):
                    return await self._exchange(name, fields, is_list=is_list)
            except TimeoutError:
                # The answer may still come, or never: a fresh connection is the only clean state.
                await self._fail(
                    AmiFault.TIMEOUT,
                    f"{name} was not answered within {self.settings.timeout:g}s",
                )
            except AmiError as exc:
                await self._fail(exc.fault, f"during {name}: {exc.detail}")
            raise self._error()

    async def _ensure(self) -> None:
        if self.state == AmiState.CONNECTED:
            return
        now = self._clock()
        if now < self.retry_at:
            raise self._error()
        await self._disconnect()  # what a dropped connection left behind
        self.attempts += 1
        try:
            async with asyncio.timeout(self.settings.timeout):
                await self._connect()
        except TimeoutError:
            await self._fail(
                AmiFault.TIMEOUT,
                f"no login within {self.settings.timeout:g}s "
                f"of connecting to {self.settings.host}:{self.settings.port}",
            )
            raise self._error() from None
        except AmiError as exc:
            await self._fail(exc.fault, exc.detail)
            raise self._error() from None
        self.failures = 0
        self.retry_at = 0.0
        self.connects += 1
        log.info(
            "ami_connected",
            address=f"{self.settings.host}:{self.settings.port}",
            ami_version=self.version,
            connects=self.connects,
        )

    async def _connect(self) -> None:
        s = self.settings
        try:
            secret = read_secret(s.secret_file)
        except SecretFileError as exc:
            raise AmiError(AmiFault.SECRET_FILE, str(exc)) from None
        try:
            reader, writer = await asyncio.open_connection(s.host, s.port, limit=MAX_MESSAGE)
        except ConnectionRefusedError:
            raise AmiError(
                AmiFault.REFUSED, f"nothing listens on {s.host}:{s.port} (Asterisk down?)"
            ) from None
        except OSError as exc:
            raise AmiError(
                AmiFault.UNREACHABLE, f"{s.host}:{s.port}: {exc.strerror or exc}"
            ) from None
        self._reader, self._writer = reader, writer
        try:
            banner = await reader.readline()
        except (OSError, ValueError) as exc:
            raise AmiError(AmiFault.CLOSED, f"connection lost before the banner: {exc}") from None
        if not banner:
            raise AmiError(AmiFault.CLOSED, "closed before its banner (AMI session limit?)")
        if not banner.startswith(BANNER):
            raise AmiError(AmiFault.PROTOCOL, f"{s.host}:{s.port} does not speak AMI")
        self.version = banner[len(BANNER) :].decode("ascii", "replace").strip()[:32]
        self._task = asyncio.create_task(self._read_loop(reader), name="ami-reader")
        self.state = AmiState.CONNECTED
        reply = await self._exchange(
            "Login", {"Username": s.username, "Secret": secret, "Events": "off"}, is_list=False
        )
        if not reply.ok:
            # Asterisk answers "Authentication failed" (after a second) and hangs up.
            raise AmiError(
                AmiFault.AUTH_FAILED, f"login as {s.username!r} refused: check the secret file"
            )

    async def _fail(self, fault: AmiFault, detail: str) -> None:
        """Record a failure, close what is open, and schedule the next attempt."""
        was_connected = self.state == AmiState.CONNECTED
        await self._disconnect()
        self.state = AmiState.DISCONNECTED
        self.failures += 1
        delay = backoff_delay(self.failures, self.settings.reconnect_max, self._rng)
        self.retry_at = self._clock() + delay
        if fault != self.last_fault or was_connected:
            log.warning("ami_unavailable", reason=fault.value, detail=detail, retry_in=round(delay))
        self.last_fault, self.last_detail = fault, detail

    def _error(self) -> AmiError:
        fault = self.last_fault or AmiFault.CLOSED
        wait = max(self.retry_at - self._clock(), 0.0)
        return AmiError(fault, self.last_detail or "not connected", retry_in=round(wait, 1))

    async def _disconnect(self) -> None:
        task, self._task = self._task, None
        writer, self._writer = self._writer, None
        self._reader = None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        self._abort_pending(AmiFault.CLOSED, "connection closed")

    def _abort_pending(self, fault: AmiFault, detail: str) -> None:
        for p in self._pending.values():
            if not p.done.done():
                p.done.set_exception(AmiError(fault, detail))
        self._pending.clear()

    # -- messages ---------------------------------------------------------------------------

    async def _exchange(self, name: str, fields: dict[str, str], *, is_list: bool) -> Reply:
        writer = self._writer
        if writer is None or self.state != AmiState.CONNECTED:
            raise AmiError(AmiFault.CLOSED, "not connected")
        action_id = f"{self._prefix}{next(self._ids)}"
        pending = _Pending(is_list, asyncio.get_running_loop().create_future())
        self._pending[action_id] = pending
        lines = [f"Action: {name}", f"ActionID: {action_id}"]
        lines.extend(f"{k}: {v}" for k, v in fields.items())
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            await writer.drain()
            await pending.done
        except (ConnectionError, OSError) as exc:
            raise AmiError(AmiFault.CLOSED, f"connection lost sending {name}: {exc}") from None
        finally:
            self._pending.pop(action_id, None)
            if not pending.done.done():
                pending.done.cancel()
        assert pending.response is not None  # done is set only once a response is in
        return Reply(pending.response, pending.events, pending.complete)

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        """Read messages until the connection ends; hand each to the action it answers."""
        # One incremental decode per chunk, not one per message: a character split
        # across two reads is completed by the next one.
        decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        buffer = ""
        fault, detail = AmiFault.CLOSED, "Asterisk closed the connection"
        try:
            while True:
                chunk = await reader.read(_READ)
                if not chunk:
                    break
                buffer += decode(chunk)
                if "\r\n\r\n" not in buffer:
                    if len(buffer) > MAX_MESSAGE:
                        fault, detail = AmiFault.PROTOCOL, "a message larger than 1 MiB"
                        break
                    continue
                *blocks, buffer = buffer.split("\r\n\r\n")
                for block in blocks:
                    if block:
                        self._dispatch(parse_message(block))
        except (OSError, ValueError) as exc:
            detail = f"connection lost: {exc}"
        # The connection is gone: fail what waits; the next action reconnects.
        if self.state == AmiState.CONNECTED and not self._closing:
            self.state = AmiState.DISCONNECTED
            self.drops += 1
            self.last_fault, self.last_detail = fault, detail
            log.warning("ami_connection_lost", reason=fault.value, detail=detail)
        self._abort_pending(fault, detail)

    def _dispatch(self, msg: Message) -> None:
        pending = self._pending.get(msg.get("ActionID", ""))
        if pending is None or pending.done.done():
            self.events_ignored += 1
            return
        if pending.response is None and "Response" in msg:
            pending.response = msg
            if not pending.is_list or msg.get("EventList") != "start":
                pending.done.set_result(None)
            return
        if msg.get("EventList") == "Complete":
            pending.complete = msg
            if pending.response is not None:
                pending.done.set_result(None)
            return
        pending.events.append(msg)
