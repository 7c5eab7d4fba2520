"""The paramiko boundary: one SSH connection to the support bastion, and its relays.

paramiko is thread-based, and this is the only module that imports it, inside
:meth:`SshLink.open` (an idle daemon never loads it). The asyncio side
(:mod:`agent.uplink.support`) calls the blocking methods here in a small thread
pool of its own and awaits them with deadlines; everything paramiko raises is
translated here into :class:`~agent.errors.SupportError`.

Two paramiko behaviours shape this code:

- A reverse forward does not notice a dead server, even with
  ``Transport.set_keepalive`` (paramiko #2326): :meth:`SshLink.keepalive` sends
  ``keepalive@openssh.com`` with want-reply, and the caller decides the
  deadline. Any answer, even a refusal, proves the server alive.
- Each ``request_port_forward`` replaces the transport's one forward handler
  (paramiko #1710): a single handler, :meth:`SshLink._on_channel`, dispatches
  incoming channels by the bastion port they arrived on, and relays each only to
  the local address configured for that port's service.

The handler runs in paramiko's transport thread and must not block: it only
starts a relay thread, which connects to the local service and copies bytes
both ways (with half-closes) until either side ends. :meth:`SshLink.abort` is
instant and thread-safe: it shuts the TCP socket to the bastion (no byte can
follow; the bastion drops its listeners as soon as it reads the end) and the
local sockets, which wakes every blocked call.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.errors import HostKeyMismatch, SupportError
from agent.sshkeys import HostKeyPin, PublicKey

if TYPE_CHECKING:
    import paramiko

RELAY_CHUNK = 64 * 1024
RELAY_JOIN = 1.0
PARAMIKO_LOG = "agent.uplink.paramiko"


@dataclass(frozen=True, slots=True)
class Forward:
    """One remote forward: the bastion's loopback port and the local service behind it."""

    service: str
    bastion_port: int
    local_host: str
    local_port: int


@dataclass(slots=True)
class ChannelStats:
    """One channel the vendor opened through the tunnel (counters written by its relay)."""

    id: int
    service: str
    opened_at: float
    bytes_to_vendor: int = 0
    bytes_from_vendor: int = 0
    closed_at: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """For status replies."""
        return {
            "id": self.id,
            "service": self.service,
            "opened_at": self.opened_at,
            "closed_at": self.closed_at,
            "bytes_to_vendor": self.bytes_to_vendor,
            "bytes_from_vendor": self.bytes_from_vendor,
            "error": self.error,
        }


class LinkEvents(Protocol):
    """What the link reports, from its threads: the receiver must hand over to its own loop."""

    def channel_opened(self, stats: ChannelStats) -> None:
        """The vendor opened a channel (accepted, relay starting)."""
        ...

    def channel_closed(self, stats: ChannelStats) -> None:
        """A channel ended (``stats.error`` says why when it failed)."""
        ...

    def channel_refused(self, service: str, reason: str) -> None:
        """A channel was refused (too many open, unknown port)."""
        ...


@dataclass(slots=True)
class _Relay:
    stats: ChannelStats
    channel: Any
    thread: threading.Thread | None = None
    local: socket.socket | None = None
    ended: threading.Event = field(default_factory=threading.Event)


_ids = itertools.count(1)


class SshLink:
    """One connection to the bastion with its remote forwards; blocking methods, thread-safe."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        user: str,
        key_file: Path,
        pin: HostKeyPin,
        forwards: list[Forward],
        timeout: float,
        max_channels: int,
        events: LinkEvents,
    ) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.key_file = key_file
        self.pin = pin
        self.forwards = {f.bastion_port: f for f in forwards}
        self.timeout = timeout
        self.max_channels = max_channels
        self.events = events
        self.opened_at: float | None = None
        self.last_activity = time.monotonic()
        self._lock = threading.Lock()
        self._closing = False
        self._sock: socket.socket | None = None
        self._transport: paramiko.Transport | None = None
        self._relays: dict[int, _Relay] = {}
        self.channels_total = 0
        self.channels_refused = 0
        self.bytes_to_vendor_closed = 0
        self.bytes_from_vendor_closed = 0

    @property
    def where(self) -> str:
        """``host:port`` of the bastion."""
        return f"{self.host}:{self.port}"

    # -- setting up (blocking) -------------------------------------------------------------

    def open(self) -> None:
        """Connect, check the pinned host key, authenticate, ask for every forward.

        Raises HostKeyMismatch (never retried) or SupportError; :meth:`abort` from
        another thread makes it fail promptly.
        """
        import paramiko  # the tunnel is coming up: only now does the daemon pay for paramiko

        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise SupportError(f"cannot reach the bastion {self.where}: {_why(exc)}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._sock = sock
            if self._closing:
                _shut(sock)
                raise SupportError("support tunnel closed while connecting")
        transport = paramiko.Transport(sock)
        self._transport = transport
        transport.banner_timeout = self.timeout
        transport.handshake_timeout = self.timeout
        transport.auth_timeout = self.timeout
        # paramiko logs tracebacks of its own through the standard library; every failure
        # reaches us as an exception and is logged as one event, so its logger stays quiet.
        transport.set_log_channel(PARAMIKO_LOG)
        logging.getLogger(PARAMIKO_LOG).disabled = True
        # Offer only the pinned key's algorithm, so the server shows exactly that key.
        transport.get_security_options().key_types = self.pin.key_types
        try:
            transport.start_client(timeout=self.timeout)
            if not (transport.is_active() and transport.initial_kex_done):
                # start_client returns at its deadline without raising.
                raise SupportError(
                    f"the bastion {self.where} did not complete the SSH handshake within "
                    f"{self.timeout:g} s"
                )
            self._check_host_key(transport)
            key = paramiko.Ed25519Key(filename=str(self.key_file))
            try:
                rest = transport.auth_publickey(self.user, key)
            except paramiko.AuthenticationException as exc:
                raise SupportError(
                    f"the bastion {self.where} refused this box's key for account "
                    f"{self.user!r} ({exc}); the vendor must install the key that "
                    "`agentctl support key` prints"
                ) from exc
            if rest:
                raise SupportError(
                    f"the bastion {self.where} wants further authentication ({', '.join(rest)})"
                )
            for fwd in self.forwards.values():
                try:
                    transport.request_port_forward("127.0.0.1", fwd.bastion_port, self._on_channel)
                except paramiko.SSHException as exc:
                    raise SupportError(
                        f"the bastion refused to listen on 127.0.0.1:{fwd.bastion_port} for "
                        f"service {fwd.service!r} (is that port in permitlisten for this box's "
                        "key, and free?)"
                    ) from exc
        except (paramiko.SSHException, EOFError, OSError) as exc:
            aborted = self._closing
            self.abort()
            if aborted:
                raise SupportError("support tunnel closed while connecting") from exc
            raise SupportError(f"SSH to the bastion {self.where} failed: {_why(exc)}") from exc
        except SupportError:
            self.abort()
            raise
        self.opened_at = time.time()
        self.last_activity = time.monotonic()

    def _check_host_key(self, transport: paramiko.Transport) -> None:
        key = transport.get_remote_server_key()
        shown = PublicKey(key.get_name(), key.asbytes())
        if shown.blob != self.pin.key.blob:
            raise HostKeyMismatch(
                f"the bastion {self.where} showed host key {shown.type} {shown.fingerprint}, "
                f"not the pinned {self.pin.key.type} {self.pin.key.fingerprint} "
                "(support.bastion.host_key): refusing to log in"
            )

    # -- the running link ------------------------------------------------------------------

    def alive(self) -> bool:
        """Whether the SSH transport still runs."""
        t = self._transport
        return t is not None and t.is_active() and not self._closing

    def keepalive(self) -> bool:
        """Ask the bastion for an answer; True once it answers, False if the link is gone.

        Blocks until the answer comes or the link dies: the caller bounds it and
        calls :meth:`abort` when the deadline passes (a frozen server never answers).
        """
        t = self._transport
        if t is None or not t.is_active():
            return False
        # OpenSSH answers this unknown request with a failure: any answer will do.
        t.global_request("keepalive@openssh.com", wait=True)
        return t.is_active() and not self._closing

    def wait_ended(self) -> None:
        """Block until paramiko's transport thread has ended (the connection is gone)."""
        t = self._transport
        if t is not None:
            t.join()

    def idle_since(self) -> float | None:
        """Monotonic time of the last byte or channel, or None while a channel is open."""
        with self._lock:
            if self._relays:
                return None
        return self.last_activity

    def open_channels(self) -> list[ChannelStats]:
        """The channels open now."""
        with self._lock:
            return [r.stats for r in self._relays.values()]

    def bytes_total(self) -> tuple[int, int]:
        """(to vendor, from vendor) over this connection."""
        with self._lock:
            up = self.bytes_to_vendor_closed + sum(
                r.stats.bytes_to_vendor for r in self._relays.values()
            )
            down = self.bytes_from_vendor_closed + sum(
                r.stats.bytes_from_vendor for r in self._relays.values()
            )
        return up, down

    # -- closing ---------------------------------------------------------------------------

    def abort(self) -> None:
        """Cut the link now (any thread, never blocks): no further byte reaches the bastion."""
        with self._lock:
            self._closing = True
            sock = self._sock
            locals_ = [r.local for r in self._relays.values() if r.local is not None]
        if sock is not None:
            _shut(sock)
        for s in locals_:
            _shut(s)

    def close(self) -> None:
        """Abort, then release everything: paramiko's thread, channels, relay threads."""
        self.abort()
        t = self._transport
        if t is not None:
            with contextlib.suppress(Exception):  # paramiko's close on a dead socket
                t.close()
        with self._lock:
            relays = list(self._relays.values())
        for r in relays:
            with contextlib.suppress(Exception):
                r.channel.close()
        deadline = time.monotonic() + RELAY_JOIN
        for r in relays:
            if r.thread is not None:
                r.thread.join(max(0.0, deadline - time.monotonic()))
        if self._sock is not None:
            self._sock.close()

    # -- channels (paramiko's transport thread, then one relay thread each) -----------------

    def _on_channel(self, channel: Any, origin: tuple[str, int], server: tuple[str, int]) -> None:
        """paramiko's forward handler, in its transport thread: dispatch by port, never block."""
        fwd = self.forwards.get(int(server[1]))
        if fwd is None:
            channel.close()
            self.channels_refused += 1
            self.events.channel_refused("?", f"no forward for bastion port {server[1]}")
            return
        with self._lock:
            if self._closing:
                channel.close()
                return
            if len(self._relays) >= self.max_channels:
                refused = True
            else:
                refused = False
                stats = ChannelStats(id=next(_ids), service=fwd.service, opened_at=time.time())
                relay = _Relay(stats, channel)
                self._relays[stats.id] = relay
                self.channels_total += 1
        if refused:
            channel.close()
            self.channels_refused += 1
            self.events.channel_refused(
                fwd.service, f"{self.max_channels} channels already open (support.max_channels)"
            )
            return
        self.last_activity = time.monotonic()
        relay.thread = threading.Thread(
            target=self._relay, args=(relay, fwd), name=f"support-relay-{stats.id}", daemon=True
        )
        self.events.channel_opened(stats)
        relay.thread.start()

    def _relay(self, relay: _Relay, fwd: Forward) -> None:
        stats, channel = relay.stats, relay.channel
        try:
            try:
                local = socket.create_connection(
                    (fwd.local_host, fwd.local_port), timeout=self.timeout
                )
            except OSError as exc:
                stats.error = f"local service {fwd.service} unreachable: {_why(exc)}"
                return
            local.settimeout(None)
            with self._lock:
                relay.local = local
                closing = self._closing
            if closing:
                _shut(local)
            self._pump(channel, local, stats)
        except (OSError, EOFError) as exc:
            if not self._closing:
                stats.error = _why(exc)
        finally:
            with contextlib.suppress(Exception):
                channel.close()
            if relay.local is not None:
                relay.local.close()
            stats.closed_at = time.time()
            with self._lock:
                self._relays.pop(stats.id, None)
                self.bytes_to_vendor_closed += stats.bytes_to_vendor
                self.bytes_from_vendor_closed += stats.bytes_from_vendor
            self.last_activity = time.monotonic()
            relay.ended.set()
            self.events.channel_closed(stats)

    def _pump(self, channel: Any, local: socket.socket, stats: ChannelStats) -> None:
        """Copy both ways until both sides have ended; pass each end on as a half-close."""
        with selectors.DefaultSelector() as sel:
            sel.register(channel, selectors.EVENT_READ, "vendor")
            sel.register(local, selectors.EVENT_READ, "local")
            open_sides = 2
            while open_sides and not self._closing:
                for key, _ in sel.select(timeout=1.0):
                    if key.data == "local":
                        data = local.recv(RELAY_CHUNK)
                        if data:
                            channel.sendall(data)
                            stats.bytes_to_vendor += len(data)
                        else:
                            sel.unregister(local)
                            open_sides -= 1
                            channel.shutdown_write()
                    else:
                        data = channel.recv(RELAY_CHUNK)
                        if data:
                            local.sendall(data)
                            stats.bytes_from_vendor += len(data)
                        else:
                            sel.unregister(channel)
                            open_sides -= 1
                            with contextlib.suppress(OSError):
                                local.shutdown(socket.SHUT_WR)
                    self.last_activity = time.monotonic()
                if channel.closed and open_sides:
                    return  # the vendor's side is gone for good; nothing more can be sent


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
