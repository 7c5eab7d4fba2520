"""Remote support: the customer's window, the NOC's ``support.connect``, the tunnel.

Two locks, both on the box:

1. the **window**, opened locally by the customer (``agentctl support open --for
   2h [--ticket T] [--service NAME…]``; :mod:`agent.support_window`);
2. the NOC's **support.connect**, accepted only inside an open window, naming the
   window's ticket when it has one, for services the window lists, with the
   switch on. The bastion, its pinned host key and the local address of each
   service come from the local configuration; the command only picks, per
   service, the port on the bastion's loopback that the NOC assigned (and may
   carry a one-time public key for vendor logins).

A refused command is answered and ledgered. An accepted one starts a *session*:
the tunnel (:mod:`agent.uplink.sshlink`, the paramiko boundary, driven from a
small thread pool of the session's own) comes up, is watched with keepalives
that have a reply deadline, is brought back with backoff inside the window if
the bastion drops, and ends when the window ends or is closed, on
``support.disconnect``, after ``support.idle_timeout`` without traffic, at once
when the switch goes off (which also closes the window), and when the daemon
stops. Everything the customer may want to know is in the ledger (kind
``support``: window open/close, refusals, session start/end with bytes each way,
tunnel up/down, each channel with its service and bytes, each vendor login) and
in ``agentctl support status``.

Vendor logins: sshd's ``AuthorizedKeysCommand`` asks (``agentctl support
authorized-keys USER``) and gets the session's one-time key, restricted to
logins from the tunnel's end (``from=``), expiring at the window's end, with a
terminal and nothing else (``restrict,pty``); outside a session, nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import secrets
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from agent import control, support_window
from agent.aio import backoff, cancel_and_wait
from agent.errors import (
    AgentError,
    CommandRefused,
    HostKeyMismatch,
    KeyFormatError,
    RequestRefused,
    StateError,
    SupportError,
)
from agent.sshkeys import PublicKey, ensure_box_key, parse_public_key
from agent.support_window import CloseReason, Window, WindowState
from agent.uplink.sshd_log import LogFollower, Login
from agent.uplink.sshlink import ChannelStats, Forward, SshLink

if TYPE_CHECKING:
    from agent.ledger import Ledger
    from agent.sections import SupportConfig

log = structlog.get_logger(__name__)

T = TypeVar("T")

LEDGER_KIND = "support"
SSH_SERVICE = "ssh"
CONNECT_ARGS = frozenset({"ticket", "ports", "key"})
LOGIN_POLL = 0.5
STOP_BUDGET = 2.0
RECENT_CHANNELS = 50
COMMANDS = ("support.connect", "support.disconnect")


class TunnelState(StrEnum):
    """Where a support session's tunnel is."""

    CONNECTING = "connecting"
    UP = "up"
    RETRYING = "retrying"  # lost or not reached; trying again inside the window
    ENDED = "ended"


@dataclass(frozen=True, slots=True)
class Grant:
    """An accepted ``support.connect``: what the NOC may reach, and for how long."""

    session: str
    ticket: str | None
    ports: dict[str, int]  # service → port on the bastion's loopback
    vendor_key: PublicKey | None
    command_id: str | None
    granted_at: float


@dataclass
class _Session:
    """The live state of one grant (across reconnects)."""

    grant: Grant
    window_id: str
    state: TunnelState = TunnelState.CONNECTING
    started_at: float = field(default_factory=time.time)
    up_since: float | None = None
    connects: int = 0
    last_error: str | None = None
    link: SshLink | None = None
    link_up: bool = False
    task: asyncio.Task[None] | None = None
    stop_reason: str | None = None
    ended_at: float | None = None
    bytes_done: list[int] = field(default_factory=lambda: [0, 0])  # links that have ended
    channels_total: int = 0
    recent: deque[ChannelStats] = field(default_factory=lambda: deque(maxlen=RECENT_CHANNELS))
    logins: list[Login] = field(default_factory=list)
    follower: LogFollower | None = None
    watcher: asyncio.Task[None] | None = None
    pool: ThreadPoolExecutor | None = None
    ledgered_error: str | None = None

    def bytes_total(self) -> tuple[int, int]:
        """(to vendor, from vendor) over the whole session."""
        up, down = self.bytes_done
        if self.link is not None and self.link_up:
            lu, ld = self.link.bytes_total()
            up, down = up + lu, down + ld
        return up, down

    def to_json(self, now: float) -> dict[str, Any]:
        """For ``support status``."""
        up, down = self.bytes_total()
        open_now = self.link.open_channels() if self.link is not None and self.link_up else []
        open_ids = {c.id for c in open_now}
        channels = [c.to_json() for c in self.recent if c.id not in open_ids]
        channels += [{**c.to_json(), "open": True} for c in open_now]
        channels.sort(key=lambda c: c["opened_at"])
        return {
            "id": self.grant.session,
            "ticket": self.grant.ticket,
            "state": self.state.value,
            "started_at": self.started_at,
            "up_since": self.up_since,
            "ended_at": self.ended_at,
            "end_reason": self.stop_reason if self.ended_at else None,
            "connects": self.connects,
            "last_error": self.last_error,
            "ports": dict(self.grant.ports),
            "vendor_key": self.grant.vendor_key.fingerprint if self.grant.vendor_key else None,
            "channels_open": len(open_now),
            "channels_total": self.channels_total,
            "channels": channels,
            "bytes_to_vendor": up,
            "bytes_from_vendor": down,
            "logins": [x.to_json() for x in self.logins],
        }


class SupportController:
    """Owns the support window, the NOC's grants and the tunnel; one per daemon."""

    def __init__(
        self,
        *,
        config: SupportConfig | None,
        device_id: str,
        state_dir: Path,
        ledger: Ledger,
        switch_on: Callable[[], bool],
    ) -> None:
        self.config = config
        self.device_id = device_id
        self.state_dir = state_dir
        self.ledger = ledger
        self.switch_on = switch_on
        self.window: Window | None = None
        self.window_error: str | None = None
        self.key_queries = 0
        self._session: _Session | None = None
        self._last_session: _Session | None = None
        self._pending: Grant | None = None
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._server: control.ControlServer | None = None
        self._load_window()

    # -- wiring ----------------------------------------------------------------------------

    def register(self, server: control.ControlServer) -> None:
        """Add the ``support-*`` control commands."""
        server.route("support-open", self._open_request, admin=True)
        server.route("support-close", self._close_request, admin=True)
        server.route("support-status", self._status_request, admin=False)
        server.route("support-keys", self._keys_request, admin=False)
        server.route("support-key", self._key_request, admin=False)
        self._server = server

    def reconfigure(self, config: SupportConfig | None) -> None:
        """A reloaded configuration: a session on the old bastion or services ends."""
        if config != self.config:
            self.config = config
            self._end_session("configuration reloaded")
            self._wake.set()

    async def run(self) -> None:
        """Enforce the window's end and run sessions, until cancelled (daemon stop)."""
        self._loop = asyncio.get_running_loop()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                while True:
                    self._wake.clear()
                    await self._enforce()
                    await self._sleep()
        finally:
            self._tg = None

    async def sever(self) -> None:
        """The customer's switch went off: close the window and the tunnel, now."""
        self._pending = None
        self._end_session("uplink switch off")
        if self.window is not None and self.window.state is WindowState.OPEN:
            self._close_window(CloseReason.SWITCH, uid=None)
        await self._await_session_end()
        self._wake.set()

    async def shutdown(self) -> None:
        """The daemon is stopping: end the session (the window stays open for the next start)."""
        self._pending = None
        self._end_session("daemon stopping")
        await self._await_session_end()

    # -- the NOC's commands (from agent.uplink.commands, on the loop's thread) ---------------

    def plan_connect(
        self, args: dict[str, Any], command_id: str | None
    ) -> tuple[dict[str, Any], Callable[[], None]]:
        """``support.connect``: check both locks now; the session starts once it is ledgered."""
        try:
            grant = self._check_grant(args, command_id)
        except SupportError as exc:
            ticket = args.get("ticket")
            self._safe_record(
                "connect_refused",
                {
                    "command": command_id,
                    "ticket": ticket[:64] if isinstance(ticket, str) else None,
                    "reason": str(exc),
                },
            )
            log.warning("support_connect_refused", command=command_id, reason=str(exc))
            raise
        assert self.config is not None and self.window is not None
        result = {
            "session": grant.session,
            "state": TunnelState.CONNECTING.value,
            "bastion": self.config.bastion,
            "ports": grant.ports,
            "window_until": self.window.until,
        }
        return result, lambda: self._accept(grant)

    def _accept(self, grant: Grant) -> None:
        self._pending = grant
        self._wake.set()
        log.info("support_connect_accepted", session=grant.session, ports=grant.ports)

    def plan_disconnect(self, args: dict[str, Any]) -> tuple[dict[str, Any], Callable[[], None]]:
        """``support.disconnect``: end the session (the window stays as the customer left it)."""
        unknown = sorted(str(k)[:32] for k in set(args) - {"session"})
        if unknown:
            raise SupportError(f"support.disconnect: unknown argument(s) {', '.join(unknown[:5])}")
        wanted = args.get("session")
        s = self._session
        target = None
        if s is not None and (wanted is None or wanted == s.grant.session):
            target = s.grant.session
        return {"disconnected": target}, lambda: self._disconnect(target)

    def _disconnect(self, session: str | None) -> None:
        self._pending = None  # a support.connect not yet started is withdrawn too
        s = self._session
        if s is not None and session is not None and s.grant.session == session:
            self._end_session("support.disconnect from the NOC")
        self._wake.set()

    def _check_grant(self, args: dict[str, Any], command_id: str | None) -> Grant:
        cfg = self.config
        if cfg is None:
            raise SupportError("remote support is not configured on this box")
        unknown = sorted(str(k)[:32] for k in set(args) - CONNECT_ARGS)
        if unknown:
            raise SupportError(
                f"support.connect: unknown argument(s) {', '.join(unknown[:5])}; the bastion and "
                "the services' addresses come from this box's configuration, never from a command"
            )
        if not self.switch_on():
            raise SupportError("the customer's uplink switch is off")
        now = time.time()
        w = self.window
        if w is None or not w.is_open(now):
            raise SupportError(
                "no support window is open on this box (the customer opens one with "
                "`agentctl support open`)"
            )
        ticket = args.get("ticket")
        if ticket is not None and not isinstance(ticket, str):
            raise SupportError('"ticket" must be a string')
        if w.ticket is not None and ticket != w.ticket:
            raise SupportError("the ticket does not match the customer's support window")
        ports = args.get("ports")
        if not isinstance(ports, dict) or not ports:
            raise SupportError('"ports" must map each service to its port on the bastion')
        checked: dict[str, int] = {}
        for name, port in ports.items():
            if name not in w.services or cfg.service(name) is None:
                raise SupportError(
                    f"service {str(name)[:32]!r} is not in the customer's window "
                    f"(open to: {', '.join(w.services)})"
                )
            if type(port) is not int or not 1 <= port <= 65535:
                raise SupportError(f"the bastion port for {name!r} must be a number 1 to 65535")
            if port in checked.values():
                raise SupportError(f"bastion port {port} is named twice")
            checked[name] = port
        key: PublicKey | None = None
        if args.get("key") is not None:
            if SSH_SERVICE not in checked:
                raise SupportError(f'a login key needs the "{SSH_SERVICE}" service')
            try:
                key = parse_public_key(args["key"])
            except KeyFormatError as exc:
                raise SupportError(f'"key" is not a usable public key: {exc}') from None
        return Grant(
            session=f"s-{int(now)}-{secrets.token_hex(3)}",
            ticket=ticket if isinstance(ticket, str) else None,
            ports=checked,
            vendor_key=key,
            command_id=command_id,
            granted_at=now,
        )

    # -- window ----------------------------------------------------------------------------

    def _load_window(self) -> None:
        read = support_window.read_window(self.state_dir)
        self.window, self.window_error = read.window, read.error
        if read.error:
            log.error("support_window_untrusted", error=read.error)
        w = self.window
        if w is None:
            return
        if w.state is WindowState.OPEN:
            if not self.switch_on():
                self._close_window(CloseReason.SWITCH, uid=None)
            elif not w.is_open():
                self._close_window(CloseReason.EXPIRED, uid=None)
            return
        # Closed with agentctl while the daemon was down: the ledger has not heard of it.
        seen = any(
            e.data.get("event") == "window_close" and e.data.get("window") == w.id
            for e in _ledger_since(self.ledger, w.opened_at - 1)
        )
        if not seen:
            self._safe_record(
                "window_close",
                {
                    "window": w.id,
                    "reason": (w.close_reason or CloseReason.CLOSED).value,
                    "uid": w.closed_by,
                    "via": w.closed_via,
                    "at": w.closed_at,
                },
            )

    def _close_window(self, reason: CloseReason, *, uid: int | None) -> None:
        w = self.window
        if w is None or w.state is not WindowState.OPEN:
            return
        now = time.time()
        closed = w.closed(reason, uid=uid, via="daemon", at=now)
        try:
            support_window.write_window(self.state_dir, closed)
        except StateError as exc:
            # The window is closed in memory whatever the disk says: nothing can connect.
            log.error("support_window_write_failed", error=str(exc))
        self.window = closed
        self._safe_record(
            "window_close", {"window": w.id, "reason": reason.value, "uid": uid, "via": "daemon"}
        )
        log.warning("support_window_closed", window=w.id, reason=reason.value, uid=uid)
        self._end_session(_WINDOW_END_REASONS[reason])

    async def _open_request(self, req: dict[str, Any], peer: control.Peer) -> dict[str, Any]:
        cfg = self._config_or_refuse()
        if not self.switch_on():
            raise SupportError(  # exit 69: unavailable while the switch is off
                "the uplink switch is off, and it stops remote support too: "
                "turn it on first (agentctl uplink on)"
            )
        seconds = req.get("seconds")
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not math.isfinite(seconds)
            or seconds <= 0
        ):
            raise RequestRefused('support-open: "seconds" must be a positive number')
        ticket = req.get("ticket")
        if ticket is not None and (
            not isinstance(ticket, str)
            or re.fullmatch(support_window.TICKET_PATTERN, ticket) is None
        ):
            raise RequestRefused(
                "a ticket is 1 to 64 letters, digits and . _ : # / - (starting with a letter "
                "or digit)"
            )
        services = self._services_or_refuse(req.get("services"), cfg)
        capped = seconds > cfg.max_window
        seconds = min(float(seconds), cfg.max_window)
        now = time.time()
        old = self.window
        w = support_window.new_window(
            uid=peer.uid, seconds=seconds, ticket=ticket, services=services, now=now
        )
        support_window.write_window(self.state_dir, w)  # StateError: exit 73, nothing opened
        try:
            if old is not None and old.is_open(now):
                self._record("window_close", window=old.id, reason="replaced", uid=peer.uid)
            self._record(
                "window_open",
                window=w.id,
                uid=peer.uid,
                until=w.until,
                seconds=seconds,
                ticket=ticket,
                services=list(services),
            )
        except StateError:
            # A window the customer could not find in the account does not open.
            unledgered = w.closed(CloseReason.UNLEDGERED, uid=peer.uid, via="daemon", at=now)
            with contextlib.suppress(StateError):
                support_window.write_window(self.state_dir, unledgered)
            self.window = unledgered
            self._end_session("support window could not be ledgered")
            raise
        self.window = w
        log.warning("support_window_opened", window=w.id, uid=peer.uid, until=w.until)
        self._wake.set()  # a session from a replaced window is re-checked against this one
        return {"window": w.to_json(), "capped": capped, "max_window": cfg.max_window}

    def _services_or_refuse(self, value: object, cfg: SupportConfig) -> tuple[str, ...]:
        if value is None:
            return cfg.service_names
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise RequestRefused('support-open: "services" must be a list of names')
        unknown = [v for v in value if cfg.service(v) is None]
        if unknown:
            raise RequestRefused(
                f"unknown service(s) {', '.join(repr(u[:32]) for u in unknown[:5])} "
                f"(configured in support.services: {', '.join(cfg.service_names)})"
            )
        return tuple(dict.fromkeys(value))

    async def _close_request(self, req: dict[str, Any], peer: control.Peer) -> dict[str, Any]:
        was_open = self.window is not None and self.window.is_open()
        self._pending = None
        self._close_window(CloseReason.CLOSED, uid=peer.uid)
        self._end_session(f"window closed by uid {peer.uid}")
        await self._await_session_end()
        self._wake.set()
        return {"was_open": was_open, "window": self.window.to_json() if self.window else None}

    # -- status, keys ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What ``support status`` and ``status`` show."""
        now = time.time()
        cfg = self.config
        w = self.window
        s = self._session or self._last_session
        return {
            "configured": cfg is not None,
            "bastion": cfg.bastion if cfg else None,
            "services": {x.name: x.address for x in cfg.services} if cfg else {},
            "max_window": cfg.max_window if cfg else None,
            "window": None if w is None else {**w.to_json(), "open": w.is_open(now)},
            "window_error": self.window_error,
            "session": None if s is None else {**s.to_json(now), "live": s is self._session},
            "key_queries": self.key_queries,
            # The SSH library is loaded only once a tunnel has come up in this process.
            "paramiko_loaded": "paramiko" in sys.modules,
        }

    async def _status_request(self, req: dict[str, Any], peer: control.Peer) -> dict[str, Any]:
        return self.status()

    def authorized_keys(self, user: str) -> list[str]:
        """The lines sshd's AuthorizedKeysCommand may use for ``user``: the one-time key or none."""
        self.key_queries += 1
        cfg, w, s = self.config, self.window, self._session
        if cfg is None or user != cfg.account or w is None or not w.is_open():
            return []
        if s is None or s.grant.vendor_key is None or SSH_SERVICE not in s.grant.ports:
            return []
        if s.window_id != w.id or s.stop_reason is not None:
            return []
        svc = cfg.service(SSH_SERVICE)
        source = "::1" if svc is not None and svc.host == "::1" else "127.0.0.1"
        # Whole minutes (sshd's finest unit is a second, but a minute is what people read),
        # rounded up; the agent itself stops answering at the window's exact end.
        end = datetime.fromtimestamp(math.ceil(w.until / 60) * 60, UTC)
        options = f'restrict,pty,from="{source}",expiry-time="{end:%Y%m%d%H%M}Z"'
        return [f"{options} {s.grant.vendor_key.line('pbx-support-' + s.grant.session)}"]

    async def _keys_request(self, req: dict[str, Any], peer: control.Peer) -> dict[str, Any]:
        user = req.get("user")
        if not isinstance(user, str) or len(user) > 64:
            raise RequestRefused('support-keys: "user" must be a user name')
        keys = self.authorized_keys(user)
        if keys:
            log.info("support_key_given", user=user, pid=peer.pid, uid=peer.uid)
        return {"keys": keys}

    async def _key_request(self, req: dict[str, Any], peer: control.Peer) -> dict[str, Any]:
        cfg = self._config_or_refuse()
        may_make = self._server is not None and self._server.may_change(peer)
        if not may_make and not cfg.key_file.exists():
            raise RequestRefused(
                "this box has no support key yet; an administrator makes it with "
                "`agentctl support key`",
                "permission",
            )
        public, made = await asyncio.to_thread(  # StateError: exit 73
            ensure_box_key, cfg.key_file, f"pbx-agent@{self.device_id}"
        )
        if made:
            self._safe_record(
                "key_made", {"file": str(cfg.key_file), "fingerprint": public.fingerprint}
            )
        return {
            "public_key": public.line(f"pbx-agent@{self.device_id}"),
            "fingerprint": public.fingerprint,
            "file": str(cfg.key_file),
            "made": made,
        }

    def _config_or_refuse(self) -> SupportConfig:
        if self.config is None:
            raise SupportError(  # exit 69: the service is not available here
                "remote support is not configured on this box (no support section in "
                "the configuration)"
            )
        return self.config

    # -- the session loop ------------------------------------------------------------------

    async def _enforce(self) -> None:
        w = self.window
        if w is not None and w.state is WindowState.OPEN and not w.is_open():
            self._close_window(CloseReason.EXPIRED, uid=None)
        s = self._session
        if s is not None and s.stop_reason is None:
            if not self.switch_on():
                self._end_session("uplink switch off")
            elif self.window is None or not self.window.is_open():
                self._end_session("support window closed")
            elif not self._covers(s.grant):
                self._end_session("the new support window does not cover this session")
            elif s.window_id != self.window.id:
                s.window_id = self.window.id  # the customer extended or changed the window
        grant, self._pending = self._pending, None
        if grant is None:
            return
        if self._session is not None:
            self._end_session(f"replaced by session {grant.session}")
            await self._await_session_end()
        if self.switch_on() and self.window is not None and self.window.is_open():
            self._start_session(grant, self.window)

    def _covers(self, grant: Grant) -> bool:
        w = self.window
        if w is None or self.config is None:
            return False
        if w.ticket is not None and grant.ticket != w.ticket:
            return False
        return all(n in w.services and self.config.service(n) for n in grant.ports)

    async def _sleep(self) -> None:
        w = self.window
        timeout = None
        if w is not None and w.state is WindowState.OPEN:
            # Exactly to the window's end when near it; otherwise check the clock each minute.
            timeout = max(0.0, min(w.until - time.time(), 60.0))
        try:
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        except TimeoutError:
            pass

    def _start_session(self, grant: Grant, window: Window) -> None:
        assert self._tg is not None and self.config is not None
        s = _Session(grant=grant, window_id=window.id)
        if grant.vendor_key is not None and self.config.sshd_log is not None:
            s.follower = LogFollower(self.config.sshd_log)
        self._session = s
        self._safe_record(
            "session_start",
            {
                "session": grant.session,
                "window": window.id,
                "ticket": grant.ticket,
                "command": grant.command_id,
                "bastion": self.config.bastion,
                "ports": grant.ports,
                "vendor_key": grant.vendor_key.fingerprint if grant.vendor_key else None,
            },
        )
        s.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="support-ssh")
        if s.follower is not None:
            s.watcher = self._tg.create_task(self._watch_logins(s), name="support-logins")
        s.task = self._tg.create_task(self._run_session(s), name=f"support-{grant.session}")
        s.task.add_done_callback(lambda task: self._session_done(s, task))

    def _end_session(self, reason: str) -> None:
        """Stop the running session now (never blocks): the tunnel is cut before this returns."""
        s = self._session
        if s is None or s.task is None or s.task.done():
            return
        if s.stop_reason is None:
            s.stop_reason = reason
        if s.link is not None:
            s.link.abort()
        if s.task is not asyncio.current_task():
            s.task.cancel()

    async def _await_session_end(self) -> None:
        s = self._session
        if s is not None and s.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(cancel_and_wait(s.task, STOP_BUDGET))

    async def _run_session(self, s: _Session) -> None:
        cfg = self.config
        assert cfg is not None and s.pool is not None
        pool = s.pool
        attempt = 0
        try:
            while s.stop_reason is None:  # set from inside too (the ledger failed)
                link = self._new_link(s, cfg)
                s.link = link
                try:
                    await self._in_pool(pool, link, lambda: self._box_key(cfg), cfg.connect_timeout)
                    await self._in_pool(pool, link, link.open, cfg.connect_timeout * 4)
                except HostKeyMismatch as exc:
                    s.last_error = str(exc)
                    self._safe_record(
                        "tunnel_failed", {"session": s.grant.session, "error": str(exc)}
                    )
                    log.error("support_host_key_mismatch", error=str(exc))
                    s.stop_reason = "the bastion's host key is not the pinned one"
                    return
                except StateError as exc:  # the box's own key is unusable: retrying cannot help
                    s.last_error = str(exc)
                    self._safe_record(
                        "tunnel_failed", {"session": s.grant.session, "error": str(exc)}
                    )
                    s.stop_reason = str(exc)
                    return
                except SupportError as exc:
                    pool.submit(link.close)
                    self._failed(s, str(exc))
                    await self._retry_pause(s, attempt, cfg)
                    attempt += 1
                    continue
                attempt = 0
                s.connects += 1
                s.state, s.up_since, s.link_up = TunnelState.UP, time.time(), True
                s.last_error = None
                s.ledgered_error = None
                self._safe_record(
                    "tunnel_up",
                    {
                        "session": s.grant.session,
                        "bastion": link.where,
                        "ports": s.grant.ports,
                        "connects": s.connects,
                    },
                )
                log.warning("support_tunnel_up", session=s.grant.session, bastion=link.where)
                reason = await self._while_up(link, pool, cfg)
                self._link_down(s, link, reason)
                if reason.startswith("idle"):
                    s.stop_reason = reason
                    return
                s.last_error = reason  # lost: the bastion dropped or stopped answering
                await self._retry_pause(s, attempt, cfg)
                attempt += 1
        finally:
            # Cut the link before anything else, whatever ended the session (a cancellation
            # too); the rest of the accounting is done by _session_done.
            if s.link is not None:
                s.link.abort()

    def _session_done(self, s: _Session, task: asyncio.Task[None]) -> None:
        """Runs on the loop once a session's task has ended, however it ended (even unstarted)."""
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            s.stop_reason = s.stop_reason or f"internal error: {exc!r}"
            log.error("support_session_crashed", session=s.grant.session, error=repr(exc))
        s.stop_reason = s.stop_reason or "daemon stopping"
        if s.link is not None:
            s.link.abort()
            if s.link_up:
                self._link_down(s, s.link, s.stop_reason)
            else:
                self._close_in_pool(s, s.link)
        if s.pool is not None:
            s.pool.shutdown(wait=False)
        if s.watcher is not None:
            self._scan_logins(s)  # a login sshd logged just before the end
            s.watcher.cancel()
        s.state, s.ended_at = TunnelState.ENDED, time.time()
        up, down = s.bytes_total()
        self._safe_record(
            "session_end",
            {
                "session": s.grant.session,
                "reason": s.stop_reason,
                "bytes_to_vendor": up,
                "bytes_from_vendor": down,
                "channels": s.channels_total,
                "logins": len(s.logins),
                "seconds": round(s.ended_at - s.started_at, 3),
            },
        )
        log.warning("support_session_ended", session=s.grant.session, reason=s.stop_reason)
        if self._session is s:
            self._session = None
        self._last_session = s
        self._wake.set()

    def _close_in_pool(self, s: _Session, link: SshLink) -> None:
        """Release a cut link's threads without waiting for them."""
        if s.pool is not None:
            with contextlib.suppress(RuntimeError):  # the pool is shut: close here, briefly
                s.pool.submit(link.close)
                return
        link.close()

    def _box_key(self, cfg: SupportConfig) -> None:
        public, made = ensure_box_key(cfg.key_file, f"pbx-agent@{self.device_id}")
        if made and self._loop is not None:
            self._loop.call_soon_threadsafe(  # recorded on the loop: the ledger is not shared
                self._safe_record,
                "key_made",
                {"file": str(cfg.key_file), "fingerprint": public.fingerprint},
            )

    def _new_link(self, s: _Session, cfg: SupportConfig) -> SshLink:
        forwards = []
        for name, port in s.grant.ports.items():
            svc = cfg.service(name)
            assert svc is not None  # checked by _covers before the session started
            forwards.append(Forward(name, port, svc.host, svc.port))
        return SshLink(
            host=cfg.bastion_host,
            port=cfg.bastion_port,
            user=cfg.bastion_user,
            key_file=cfg.key_file,
            pin=cfg.host_key,
            forwards=forwards,
            timeout=cfg.connect_timeout,
            max_channels=cfg.max_channels,
            events=_Events(self, s, asyncio.get_running_loop()),
        )

    async def _in_pool(
        self, pool: ThreadPoolExecutor, link: SshLink, fn: Callable[[], T], deadline: float
    ) -> T:
        """Run a blocking link call in the session's pool; a deadline or a cancel cuts the link."""
        fut = asyncio.get_running_loop().run_in_executor(pool, fn)
        try:
            async with asyncio.timeout(deadline):
                return await fut
        except TimeoutError:
            link.abort()
            raise SupportError(
                f"the bastion did not complete the setup within {deadline:g} s"
            ) from None
        except asyncio.CancelledError:
            link.abort()
            raise

    async def _while_up(self, link: SshLink, pool: ThreadPoolExecutor, cfg: SupportConfig) -> str:
        """Watch the link until it must go; return why."""
        loop = asyncio.get_running_loop()

        async def ended() -> str:
            await loop.run_in_executor(pool, link.wait_ended)
            return "the connection to the bastion ended"

        async def keepalive() -> str:
            while True:
                await asyncio.sleep(cfg.keepalive_interval)
                answer = loop.run_in_executor(pool, link.keepalive)
                try:
                    async with asyncio.timeout(cfg.keepalive_deadline):
                        if not await answer:
                            return "the connection to the bastion ended"
                except TimeoutError:
                    return (
                        "the bastion did not answer a keepalive within "
                        f"{cfg.keepalive_deadline:g} s"
                    )

        async def idle() -> str:
            while True:
                since = link.idle_since()
                if since is None:
                    await asyncio.sleep(cfg.idle_timeout)
                    continue
                left = since + cfg.idle_timeout - time.monotonic()
                if left <= 0:
                    return f"idle for {cfg.idle_timeout:g} s (support.idle_timeout)"
                await asyncio.sleep(left)

        tasks = {asyncio.create_task(c) for c in (ended(), keepalive(), idle())}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            return next(iter(done)).result()
        finally:
            for t in tasks:
                t.cancel()

    def _link_down(self, s: _Session, link: SshLink, reason: str) -> None:
        link.abort()
        if not s.link_up:
            return
        up, down = link.bytes_total()
        s.bytes_done[0] += up
        s.bytes_done[1] += down
        s.link_up = False
        s.up_since = None
        s.state = TunnelState.RETRYING
        self._safe_record(
            "tunnel_down",
            {
                "session": s.grant.session,
                "reason": reason,
                "bytes_to_vendor": up,
                "bytes_from_vendor": down,
                "channels": link.channels_total,
            },
        )
        log.warning("support_tunnel_down", session=s.grant.session, reason=reason)
        self._close_in_pool(s, link)

    def _failed(self, s: _Session, error: str) -> None:
        s.last_error = error
        s.state = TunnelState.RETRYING
        log.warning("support_tunnel_failed", session=s.grant.session, error=error)
        if error != s.ledgered_error:  # the same failure again and again is ledgered once
            s.ledgered_error = error
            self._safe_record("tunnel_failed", {"session": s.grant.session, "error": error})

    async def _retry_pause(self, s: _Session, attempt: int, cfg: SupportConfig) -> None:
        s.state = TunnelState.RETRYING
        await asyncio.sleep(backoff(attempt, base=0.5, cap=cfg.reconnect_max))

    # -- channels and logins (events from the link's threads arrive here on the loop) --------

    def channel_opened(self, s: _Session, stats: ChannelStats) -> None:
        """Ledger a channel the vendor opened."""
        s.channels_total += 1
        self._safe_record(
            "channel_open",
            {
                "session": s.grant.session,
                "channel": stats.id,
                "service": stats.service,
                "at": stats.opened_at,
            },
        )

    def channel_closed(self, s: _Session, stats: ChannelStats) -> None:
        """Ledger a channel's end with its bytes each way."""
        s.recent.append(stats)
        self._safe_record(
            "channel_close",
            {
                "session": s.grant.session,
                "channel": stats.id,
                "service": stats.service,
                "bytes_to_vendor": stats.bytes_to_vendor,
                "bytes_from_vendor": stats.bytes_from_vendor,
                "seconds": round((stats.closed_at or time.time()) - stats.opened_at, 3),
                "error": stats.error,
            },
        )

    def channel_refused(self, s: _Session, service: str, reason: str) -> None:
        """Ledger a channel the agent refused."""
        self._safe_record(
            "channel_refused", {"session": s.grant.session, "service": service, "reason": reason}
        )

    async def _watch_logins(self, s: _Session) -> None:
        while True:
            self._scan_logins(s)
            await asyncio.sleep(LOGIN_POLL)

    def _scan_logins(self, s: _Session) -> None:
        key = s.grant.vendor_key
        if s.follower is None or key is None:
            return
        for login in s.follower.logins():
            if login.fingerprint != key.fingerprint:
                continue
            s.logins.append(login)
            self._safe_record("login", {"session": s.grant.session, **login.to_json()})
            log.warning("support_vendor_login", session=s.grant.session, user=login.user)

    # -- the ledger ------------------------------------------------------------------------

    def _record(self, event: str, **data: Any) -> None:
        self.ledger.record(LEDGER_KIND, {"event": event, **data})  # StateError when it cannot

    def _safe_record(self, event: str, data: dict[str, Any]) -> None:
        """Record from a callback; when the account cannot be written, support stops."""
        try:
            self._record(event, **data)
        except StateError as exc:
            log.error("support_ledger_failed", error=str(exc))
            self._end_session("the ledger cannot be written")


_WINDOW_END_REASONS = {
    CloseReason.CLOSED: "support window closed",
    CloseReason.EXPIRED: "support window ended",
    CloseReason.SWITCH: "uplink switch off",
    CloseReason.REPLACED: "support window replaced",
    CloseReason.UNLEDGERED: "support window could not be ledgered",
}


class _Events:
    """The link's thread-side callbacks, handed over to the event loop."""

    def __init__(
        self, ctl: SupportController, s: _Session, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.ctl, self.s, self.loop = ctl, s, loop

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: the daemon is gone
            self.loop.call_soon_threadsafe(fn, self.s, *args)

    def channel_opened(self, stats: ChannelStats) -> None:
        self._call(self.ctl.channel_opened, stats)

    def channel_closed(self, stats: ChannelStats) -> None:
        self._call(self.ctl.channel_closed, stats)

    def channel_refused(self, service: str, reason: str) -> None:
        self._call(self.ctl.channel_refused, service, reason)


def _ledger_since(ledger: Ledger, since: float) -> list[Any]:
    from agent import ledger as ledger_module

    return list(ledger_module.read(ledger.conn, since=since, kind=LEDGER_KIND))


def plan_command(
    host: object, cmd: str, args: dict[str, Any], command_id: str | None
) -> tuple[Any, Callable[[], None]]:
    """Check a ``support.*`` NOC command (from :mod:`agent.uplink.commands`): its reply, and
    its effect, which the handler runs only once the command is in the ledger."""

    ctl = getattr(host, "support", None)
    if not isinstance(ctl, SupportController):
        raise CommandRefused("remote support is not available on this box")
    try:
        if cmd == "support.connect":
            return ctl.plan_connect(args, command_id)
        if cmd == "support.disconnect":
            return ctl.plan_disconnect(args)
    except AgentError as exc:  # a lock said no (SupportError), or the state could not be written
        raise CommandRefused(str(exc)) from None
    raise CommandRefused(f"command {cmd!r} is not allowed")
