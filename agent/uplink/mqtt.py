"""The agent's one MQTT boundary: paho-mqtt driven from the asyncio loop, and nothing else.

Why it exists: the uplink needs what MQTT wrappers hide. The reason code of
every PUBACK (under MQTT 5 an ACL refusal is visible only there); a
connection that can be dropped *now*, with no further byte, when the customer
flips the switch; a connect attempt that can be abandoned while its TLS
handshake is still running in a worker thread. paho 2.x offers all of it
through its public API to an application that drives paho's socket itself
(Home Assistant's MQTT integration works this way). This module is the only
place in the agent that imports paho (``tests/test_layout.py``); no other
module sees a paho object, and paho's errors leave here as
:class:`agent.errors.UplinkError` or :class:`agent.errors.BrokerRefused`.

How it drives paho:

- ``connect()`` is paho's blocking TCP connect and TLS handshake, so it runs in
  a worker thread. The TLS socket comes from the link's SSL context with
  :class:`_WatchedSSLSocket` as its socket class, which reports itself to the
  link before its handshake: :meth:`MqttLink.close_now` can then shut it down
  under the handshake, and a socket that appears after ``close_now`` is closed
  before paho writes to it.
- Once the socket is open, the loop calls paho's ``loop_read`` when it is
  readable (and again while TLS holds decrypted bytes), ``loop_write`` while
  paho has bytes queued, and ``loop_misc`` (paho sends PINGREQ from there) from
  one timer set for when the link will have been quiet for 1.2 keepalives:
  traffic pushes it on, so an idle link that sends a record every keepalive
  never pings, and no timer fires every second.
- paho's callbacks run on the loop's thread inside those calls; they only
  append to lists, resolve futures and call the listeners a user registered.
- Incoming messages wait in an inbox whose size the link bounds with the
  broker's help: MQTT 5's Receive Maximum (announced at CONNECT) caps the QoS 1
  messages not yet acknowledged, and with ``manual_ack`` a message is
  acknowledged only when the consumer says so, so a flood waits at the broker;
  QoS 0 messages, which MQTT does not flow-control, are dropped and counted
  past ``max_queued_qos0``.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import socket
import ssl
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.errors import BrokerRefused, UplinkError
from agent.uplink.tls import TLSFailure, classify_tls_error

#: A PUBACK, SUBACK or CONNACK reason code at or above this is a failure (MQTT 5, 2.4).
FAILURE = 0x80
#: PINGREQ after this many keepalives with no packet one way or the other. The broker
#: closes a connection silent for 1.5 keepalives; 1.2 leaves a fifth of one for the
#: timer and the network, and lets a record sent every keepalive stand in for the ping.
PING_AFTER = 1.2

_REASONS = {
    128: "unspecified error",
    131: "implementation specific error",
    135: "not authorized",
    144: "topic name invalid",
    145: "packet identifier in use",
    151: "quota exceeded",
    153: "payload format invalid",
}


def reason_text(code: int) -> str:
    """A short name for an MQTT 5 failure reason code."""
    return _REASONS.get(code, "error")


class LinkState(enum.StrEnum):
    """Where one link is in its life; a link is used once and never reopened."""

    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Will:
    """The message the broker publishes for us if the connection dies without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class Message:
    """A message the broker delivered to us (``mid`` for :meth:`MqttLink.ack`)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int = 0


@dataclass(frozen=True, slots=True)
class Ack:
    """The broker's answer to one QoS 1 publish."""

    mid: int
    reason: int

    @property
    def ok(self) -> bool:
        """Whether the broker accepted the message."""
        return self.reason < FAILURE


@dataclass(frozen=True, kw_only=True)
class LinkSettings:
    """What one connection needs: where, who, how long to wait."""

    host: str
    port: int
    client_id: str
    keepalive: float = 60.0
    connect_timeout: float = 10.0
    #: QoS 1 publishes paho keeps in flight; 0: no limit in paho, the caller keeps its own
    #: window (the uplink does: paho's walks every message in flight at each PUBACK).
    max_inflight: int = 100
    will: Will | None = None
    clean_start: bool = True
    #: MQTT 5 session expiry in seconds (0: the session ends with the connection).
    session_expiry: int = 0
    #: MQTT 5 Receive Maximum: QoS 1 messages the broker may send us unacknowledged.
    receive_maximum: int | None = None
    #: MQTT 5 Maximum Packet Size: the broker drops larger packets instead of sending them.
    max_packet_size: int | None = None
    #: Acknowledge incoming QoS 1 messages only through :meth:`MqttLink.ack`.
    manual_ack: bool = False
    #: QoS 0 messages waiting beyond this are dropped (and counted).
    max_queued_qos0: int = 1000


class _Watch:
    """Shared between a link and the worker thread that connects it (under one lock)."""

    __slots__ = ("abandoned", "handshaking", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False
        self.handshaking: ssl.SSLSocket | None = None


#: The watch of each context a link was given (a context serves one link).
_WATCHES: weakref.WeakKeyDictionary[ssl.SSLContext, _Watch] = weakref.WeakKeyDictionary()


class _WatchedSSLSocket(ssl.SSLSocket):
    """A TLS socket that a link can interrupt during its handshake, and that never leaks.

    paho 2.2 drops a socket whose handshake failed without closing it: one
    descriptor lost per failed attempt for as long as reconnects go on; this
    class closes it. And it tells the link it is handshaking, so that
    :meth:`MqttLink.close_now` on the loop's thread can shut the descriptor
    down under the blocking handshake in the worker thread.
    """

    def do_handshake(self, block: bool = False) -> None:
        watch = _WATCHES.get(self.context)
        if watch is not None:
            with watch.lock:
                if watch.abandoned:
                    self.close()
                    raise ConnectionAbortedError("the connection was closed before its handshake")
                watch.handshaking = self
        try:
            super().do_handshake(block)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # a non-blocking handshake in progress, not a failure
        except OSError:
            self.close()
            raise
        finally:
            if watch is not None:
                with watch.lock:
                    watch.handshaking = None


def _abort(sock: socket.socket) -> None:
    """Shut a socket down from any thread, below TLS (the handshake may be using it)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # not connected yet, or already closed: either way nothing more is sent


class MqttLink:
    """One MQTT 5 connection over TLS. Make a new link for each connection attempt."""

    def __init__(self, settings: LinkSettings, tls_context: ssl.SSLContext) -> None:
        self.settings = settings
        self.state = LinkState.NEW
        self.lost_reason: str | None = None
        self._ctx = tls_context
        self._watch = _Watch()
        tls_context.sslsocket_class = _WatchedSSLSocket
        _WATCHES[tls_context] = self._watch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._sock: socket.socket | None = None
        self._reading = False
        self._writing = False
        self._misc: asyncio.TimerHandle | None = None
        self._last_in = self._last_out = time.monotonic()  # packets either way, for the ping
        self._connack: asyncio.Future[int] | None = None
        self._lost = asyncio.Event()
        self._tracked: set[int] = set()
        self._acks: list[Ack] = []
        self._ack_listeners: list[Callable[[], None]] = []
        self._waiting: dict[int, asyncio.Future[Ack]] = {}
        self._subacks: dict[int, asyncio.Future[list[int]]] = {}
        self._inbox: collections.deque[Message] = collections.deque()
        self._inbox_ready = asyncio.Event()
        self._queued_qos0 = 0
        self._drop_listeners: list[Callable[[], None]] = []
        #: QoS 0 messages dropped because too many were waiting.
        self.dropped_qos0 = 0
        self._errors: list[str] = []  # paho's error log lines while connecting
        self._paho = self._make_client()

    def _make_client(self) -> paho.Client:
        s = self.settings
        c = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=paho.MQTTv5,
            manual_ack=s.manual_ack,
        )
        c.tls_set_context(self._ctx)
        c.connect_timeout = s.connect_timeout
        c.max_inflight_messages_set(s.max_inflight)
        c.max_queued_messages_set(0)  # the session keeps its own window; nothing is dropped
        if s.will is not None:
            c.will_set(s.will.topic, s.will.payload, qos=s.will.qos, retain=s.will.retain)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write
        return c

    # -- connecting ----------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect and wait for the broker's CONNACK, within the connect timeout.

        Raises :class:`BrokerRefused` when the broker refused us (our certificate,
        its CONNACK), :class:`UplinkError` for everything else; the link is then
        closed. A cancelled connect closes the link before it re-raises.
        """
        if self.state is not LinkState.NEW:
            raise UplinkError(f"an MQTT link is used once (this one is {self.state})")
        loop = self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.state = LinkState.CONNECTING
        self._connack = loop.create_future()
        # paho formats every log line for on_log; only connect-time errors are worth it.
        self._paho.on_log = self._on_log
        attempt = loop.run_in_executor(None, self._blocking_connect)
        # If we give up on it, the thread still ends (close_now aborts it): retrieve its result.
        attempt.add_done_callback(_retrieve)
        s = self.settings
        try:
            async with asyncio.timeout(s.connect_timeout):
                try:
                    await attempt
                except (OSError, ValueError) as exc:
                    raise self._failure(exc) from None
                lost: asyncio.Future[Any] = asyncio.ensure_future(self._lost.wait())
                connack: asyncio.Future[Any] = self._connack
                try:
                    await asyncio.wait({connack, lost}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    lost.cancel()
        except TimeoutError:
            self.close_now(f"no CONNACK within {s.connect_timeout:g} s")
            raise UplinkError(
                f"no answer (CONNACK) from the broker {s.host!r} within {s.connect_timeout:g} s"
            ) from None
        except BaseException:
            self.close_now("connect abandoned")
            raise
        finally:
            self._paho.on_log = None
        if not self._connack.done():
            # Dropped after a completed handshake but before CONNACK.
            self.close_now("dropped before CONNACK")
            raise self._dropped_before_connack()
        code = self._connack.result()
        if code >= FAILURE:
            self.close_now(f"CONNACK {code}")
            raise BrokerRefused(
                f"the broker {s.host!r} refused the connection: reason code {code} "
                f"({reason_text(code)})"
            )
        self.state = LinkState.CONNECTED
        self._last_in = self._last_out = time.monotonic()  # CONNECT went, CONNACK came
        self._schedule_misc()

    def _blocking_connect(self) -> None:
        s = self.settings
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if s.session_expiry:
            props.SessionExpiryInterval = s.session_expiry
        if s.receive_maximum is not None:
            props.ReceiveMaximum = s.receive_maximum
        if s.max_packet_size is not None:
            props.MaximumPacketSize = s.max_packet_size
        rc = self._paho.connect(
            s.host,
            s.port,
            keepalive=max(1, round(s.keepalive)),
            clean_start=s.clean_start,
            properties=props,
        )
        if rc != paho.MQTT_ERR_SUCCESS:
            raise ConnectionError(paho.error_string(rc))

    def _failure(self, exc: BaseException) -> UplinkError:
        if isinstance(exc, ConnectionAbortedError) and self._watch.abandoned:
            return UplinkError("connect abandoned: the link was closed")
        if isinstance(exc, socket.gaierror):
            return UplinkError(f"cannot resolve the broker {self.settings.host!r}: {exc.strerror}")
        return self._classify(exc).error()

    def _classify(self, exc: BaseException | str) -> TLSFailure:
        return classify_tls_error(exc, host=self.settings.host)

    def _dropped_before_connack(self) -> UplinkError:
        reason = self._errors[-1] if self._errors else (self.lost_reason or "connection closed")
        failure = self._classify(reason)
        if failure.kind == "other":
            # mosquitto closes the connection of a client it will not admit, without an
            # alert we could read, when TLS 1.3 finished the handshake on our side first.
            failure = TLSFailure(
                "client_refused",
                f"the broker {self.settings.host!r} closed the connection before accepting "
                f"it: it most likely refused this box's client certificate ({reason})",
            )
        return failure.error()

    # -- using the connection ------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the link is up (CONNACK received, not closed)."""
        return self.state is LinkState.CONNECTED

    def _require_connected(self) -> None:
        if self.state is not LinkState.CONNECTED:
            raise UplinkError(f"not connected ({self.lost_reason or self.state})")

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Queue a message; returns its message id. A QoS 1 message's PUBACK becomes an
        :class:`Ack` in :meth:`take_acks` (and wakes the ack listeners)."""
        self._require_connected()
        info = self._paho.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise UplinkError(f"publish on {topic} failed: {paho.error_string(info.rc)}")
        self._last_out = time.monotonic()
        if qos:
            self._tracked.add(info.mid)
        return int(info.mid)

    async def publish_wait(
        self, topic: str, payload: bytes, *, retain: bool = False, within: float = 10.0
    ) -> Ack:
        """Publish at QoS 1 and wait up to ``within`` seconds for its PUBACK."""
        self._require_connected()
        assert self._loop is not None
        info = self._paho.publish(topic, payload, qos=1, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise UplinkError(f"publish on {topic} failed: {paho.error_string(info.rc)}")
        self._last_out = time.monotonic()
        fut: asyncio.Future[Ack] = self._loop.create_future()
        self._waiting[info.mid] = fut
        try:
            async with asyncio.timeout(within):
                return await fut
        except TimeoutError:
            raise UplinkError(f"no PUBACK for {topic} within {within:g} s") from None
        finally:
            self._waiting.pop(info.mid, None)

    def take_acks(self) -> list[Ack]:
        """The PUBACKs received since the last call, in arrival order."""
        acks, self._acks = self._acks, []
        return acks

    @property
    def acks_waiting(self) -> bool:
        """Whether PUBACKs arrived that :meth:`take_acks` has not taken yet."""
        return bool(self._acks)

    def on_ack(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (on the loop's thread) whenever PUBACKs arrive or the link is lost."""
        self._ack_listeners.append(listener)

    def on_drop(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` for each QoS 0 message dropped because too many were waiting."""
        self._drop_listeners.append(listener)

    def ack(self, message: Message) -> None:
        """Acknowledge an incoming QoS 1 message (with ``manual_ack``); the broker may then
        send the next one. Nothing to do once the link is closed."""
        if message.qos > 0 and self.settings.manual_ack and self.connected:
            self._paho.ack(message.mid, message.qos)
            self._last_out = time.monotonic()

    async def subscribe(self, topic: str, *, qos: int = 1, within: float = 10.0) -> int:
        """Subscribe and return the granted QoS; BrokerRefused if the broker refused it."""
        self._require_connected()
        assert self._loop is not None
        rc, mid = self._paho.subscribe(topic, qos=qos)
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            raise UplinkError(f"subscribe to {topic} failed: {paho.error_string(rc)}")
        self._last_out = time.monotonic()
        fut: asyncio.Future[list[int]] = self._loop.create_future()
        self._subacks[mid] = fut
        try:
            async with asyncio.timeout(within):
                codes = await fut
        except TimeoutError:
            raise UplinkError(f"no SUBACK for {topic} within {within:g} s") from None
        finally:
            self._subacks.pop(mid, None)
        code = codes[0] if codes else FAILURE
        if code >= FAILURE:
            raise BrokerRefused(
                f"the broker refused the subscription to {topic}: reason code {code} "
                f"({reason_text(code)})"
            )
        return code

    async def next_message(self) -> Message:
        """The next message delivered to us; UplinkError once the link is lost."""
        while not self._inbox:
            if self.state is LinkState.CLOSED:
                raise UplinkError(f"connection lost: {self.lost_reason}")
            self._inbox_ready.clear()
            await self._inbox_ready.wait()
        message = self._inbox.popleft()
        if message.qos == 0:
            self._queued_qos0 -= 1
        return message

    async def messages(self) -> AsyncIterator[Message]:
        """Messages as they arrive, until the link is lost (then UplinkError)."""
        while True:
            yield await self.next_message()

    async def wait_lost(self) -> str:
        """Wait until the connection is gone; returns why."""
        await self._lost.wait()
        return self.lost_reason or "closed"

    # -- closing -------------------------------------------------------------------------

    async def disconnect(self, within: float = 1.0) -> None:
        """Send DISCONNECT (the broker then drops our will) and close, in ``within`` seconds."""
        try:
            if self.state is LinkState.CONNECTED:
                self._paho.disconnect()
                if self._sock is not None:
                    # Write it now rather than at the loop's next turn: the switch waits on
                    # this, and paho closes the socket as soon as DISCONNECT is out.
                    self._paho.loop_write()
                async with asyncio.timeout(within):
                    await self._lost.wait()  # paho closes the socket once DISCONNECT is written
        except TimeoutError:
            pass
        finally:
            self.close_now("disconnected")  # also when cancelled while waiting

    def close_now(self, reason: str = "closed") -> None:
        """Close the connection at once: when this returns, no further byte is sent.

        Safe to call at any time, from the loop's thread, also while the connect
        is still running in its worker thread (its handshake is shut down under it).
        """
        with self._watch.lock:
            self._watch.abandoned = True
            handshaking, self._watch.handshaking = self._watch.handshaking, None
            sock, self._sock = self._sock, None
        if handshaking is not None:
            _abort(handshaking)
        if sock is not None:
            self._unwatch(sock)
            try:
                sock.close()
            except OSError:
                pass
        self._mark_lost(reason)

    def _mark_lost(self, reason: str) -> None:
        if self.state is LinkState.CLOSED:
            return
        self.state = LinkState.CLOSED
        self.lost_reason = reason
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        self._lost.set()
        self._inbox_ready.set()
        error = UplinkError(f"connection lost: {reason}")
        waiters: list[asyncio.Future[Any]] = [*self._waiting.values(), *self._subacks.values()]
        for fut in waiters:
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # a waiter that already gave up must not leave it unretrieved
        for listener in self._ack_listeners:
            listener()

    # -- driving paho's socket from the loop ---------------------------------------------

    def _watch_read(self) -> None:
        sock = self._sock
        if sock is not None and self._loop is not None and not self._reading:
            self._loop.add_reader(sock, self._readable)
            self._reading = True

    def _unwatch(self, sock: socket.socket) -> None:
        if self._loop is None:
            return
        if self._reading:
            self._loop.remove_reader(sock)
            self._reading = False
        if self._writing:
            self._loop.remove_writer(sock)
            self._writing = False

    def _readable(self) -> None:
        self._last_in = time.monotonic()
        sock = self._sock
        while sock is not None and sock is self._sock:
            rc = self._paho.loop_read()
            if rc != paho.MQTT_ERR_SUCCESS:
                break
            # TLS may hold decrypted bytes the descriptor no longer signals.
            if not isinstance(sock, ssl.SSLSocket) or sock.pending() == 0:
                break

    def _writable(self) -> None:
        if self._sock is not None:
            self._paho.loop_write()

    def _schedule_misc(self, delay: float | None = None) -> None:
        if self._loop is None or self.state is LinkState.CLOSED:
            return
        if delay is None:
            delay = self._ping_due() - time.monotonic()
        self._misc = self._loop.call_later(max(0.25, delay), self._tick)

    def _ping_due(self) -> float:
        # paho sends PINGREQ from loop_misc once keepalive has passed since the last
        # packet either way; anything else that went out and came back (a health record
        # and its PUBACK) makes a ping unnecessary. So the timer is set for when the link
        # has been quiet for PING_AFTER keepalives (the broker waits 1.5), not every few
        # seconds: an idle link with traffic every keepalive wakes for nothing and sends
        # no PINGREQ at all (issue 17).
        return min(self._last_in, self._last_out) + self.settings.keepalive * PING_AFTER

    def _tick(self) -> None:
        self._misc = None
        if self._sock is None:
            return
        now = time.monotonic()
        if now < self._ping_due():
            self._schedule_misc()  # traffic since the timer was set: not due yet
            return
        # Due: paho pings now, or closes the link if the last ping got no answer. Look
        # again one keepalive later, when a missing PINGRESP is what paho checks for.
        self._last_out = now
        self._paho.loop_misc()
        self._schedule_misc(self.settings.keepalive)

    # -- paho's callbacks (the loop's thread, except where noted) ------------------------

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        # In the worker thread that runs connect(), once the handshake is done.
        with self._watch.lock:
            if self._watch.abandoned:
                sock.close()  # paho's CONNECT is only queued: no byte of it was written
                return
            self._sock = sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # pipelined PUBACKs then wait on Nagle's algorithm: slower, still correct
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._attach, sock)

    def _attach(self, sock: Any) -> None:
        if sock is self._sock:
            self._watch_read()

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        # paho closes the socket itself after this (read error, keepalive, DISCONNECT sent).
        with self._watch.lock:
            mine: socket.socket | None = self._sock
            if mine is None or sock is not mine:
                return
            self._sock = None
        self._unwatch(mine)

    def _on_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() != self._loop_thread:
            loop.call_soon_threadsafe(self._start_writing, sock)
        else:
            self._start_writing(sock)

    def _start_writing(self, sock: socket.socket) -> None:
        if sock is self._sock and not self._writing and self._loop is not None:
            self._loop.add_writer(sock, self._writable)
            self._writing = True

    def _on_unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        mine: socket.socket | None = self._sock
        if mine is not None and sock is mine and self._writing and self._loop is not None:
            self._loop.remove_writer(mine)
            self._writing = False

    def _on_log(self, client: Any, userdata: Any, level: int, buf: str) -> None:
        if level == paho.MQTT_LOG_ERR:
            self._errors.append(buf)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(int(rc.value))

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        text = self._errors[-1] if self._errors else f"reason code {int(rc.value)}"
        self._mark_lost(text if int(rc.value) else "disconnected")

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        if mid not in self._tracked:
            waiter = self._waiting.pop(mid, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(Ack(mid, int(rc.value)))
            return
        self._tracked.discard(mid)
        self._acks.append(Ack(mid, int(rc.value)))
        for listener in self._ack_listeners:
            listener()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        fut = self._subacks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result([int(c.value) for c in codes])

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            return  # a broker forwards only UTF-8 topic names; nothing to answer here
        qos = int(msg.qos)
        if qos == 0:
            if self._queued_qos0 >= self.settings.max_queued_qos0:
                # At most once is all QoS 0 promises; unbounded memory is not an option.
                self.dropped_qos0 += 1
                for listener in self._drop_listeners:
                    listener()
                return
            self._queued_qos0 += 1
        self._inbox.append(Message(topic, bytes(msg.payload), qos, bool(msg.retain), int(msg.mid)))
        self._inbox_ready.set()


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
