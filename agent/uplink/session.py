"""The MQTT session to the vendor's broker: mutual TLS, QoS 1 delivery, commands, the switch.

One connection at a time, made only while the switch is on. On connect the
retained status becomes ``online`` (the last will says ``offline``); the
outbox is drained with QoS 1 and up to ``max_inflight`` publishes in flight,
an envelope being deleted only when its PUBACK arrives with a success reason
code (aiomqtt 2.x returns from ``publish()`` whatever the PUBACK says, so the
session watches paho's ``on_publish`` itself). A PUBACK with an error code
(e.g. 135, not authorized) leaves the envelope in the outbox, is logged and
counted, and ends the connection so that it is retried after the backoff.

A delivery the outbox cannot record (a full disk) pauses the session instead of
ending it: nothing new is published, the acknowledged envelopes are kept in
memory and their commit retried (within a second of space returning), so a
full disk costs at most one window of duplicates after a restart, never a
reconnect loop that sends the window again and again.

:meth:`UplinkSession.sever` is the switch: it publishes ``severed``, closes
the connection and returns only when the socket is closed.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiomqtt
import paho.mqtt.client as paho_mqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.errors import AgentError, BrokerRefused, StateError, TLSMaterialError, UplinkError
from agent.logs import Throttle
from agent.supervisor import backoff, cancel_and_wait, check_cancelled
from agent.uplink import tls
from agent.uplink.commands import CommandHandler, CommandHost

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.ledger import Ledger
    from agent.outbox import Outbox, Stored

log = structlog.get_logger(__name__)

SEVER_PUBLISH_TIMEOUT = 0.5
DISCONNECT_TIMEOUT = 1.0
# What the NOC can make us hold in memory (MQTT 5 CONNECT properties, honoured by the
# broker): QoS 1 commands not yet answered, and the size of any packet sent to us.
# A command is acknowledged only after its reply is published, so a flood waits at
# the broker, not here. Larger payloads never arrive; those over 16 KiB that do are
# refused by the handler.
COMMAND_RECEIVE_MAXIMUM = 16
MAX_PACKET_FROM_BROKER = 64 * 1024
# QoS 0 commands are not flow-controlled by MQTT; beyond this many waiting they are
# dropped (at most once is what QoS 0 promises) and counted.
MAX_QUEUED_QOS0 = 64


class _CommandQueue(asyncio.Queue[aiomqtt.Message]):
    """aiomqtt's queue of incoming messages, bounded for QoS 0 and never dropping QoS 1.

    A QoS 1 message dropped here would never be acknowledged and would hold a slot
    of the receive window until the connection ends; their number is bounded by
    the window anyway.
    """

    on_drop: Callable[[], None] | None = None

    def put_nowait(self, item: aiomqtt.Message) -> None:
        if item.qos == 0 and self.qsize() >= MAX_QUEUED_QOS0:
            if self.on_drop is not None:
                self.on_drop()
            return
        super().put_nowait(item)


STALL_RETRY_BASE = 0.05  # seconds before retrying a delivery the store refused; doubles ...
STALL_RETRY_MAX = 1.0  # ... up to this, so that recovery follows free space within a second


class _Acks:
    """Collects PUBACKs from paho's callback (which runs on the event loop's thread)."""

    def __init__(self, paho: paho_mqtt.Client, wake: asyncio.Event | None = None) -> None:
        self.paho = paho
        self.wake = wake
        self.ready = asyncio.Event()
        self.done: list[tuple[int, int]] = []
        self._aiomqtt_on_publish: Any = paho.on_publish
        paho.on_publish = self._on_publish

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        self.done.append((mid, int(getattr(rc, "value", 0))))
        self.ready.set()
        if self.wake is not None:
            self.wake.set()
        if self._aiomqtt_on_publish is not None:
            self._aiomqtt_on_publish(client, userdata, mid, rc, props)

    def take(self) -> list[tuple[int, int]]:
        done, self.done = self.done, []
        self.ready.clear()
        return done


class UplinkSession:
    """Keeps the uplink connected while the switch is on; delivers the outbox."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        outbox: Outbox,
        ledger: Ledger,
        switch_on: Callable[[], bool],
        commands: CommandHost,
    ) -> None:
        assert config.uplink is not None
        self.cfg = config.uplink
        self.device_id = config.device_id
        self.outbox = outbox
        self.ledger = ledger
        self.switch_on = switch_on
        self.commands = CommandHandler(
            conn=outbox.conn,
            ledger=ledger,
            host=commands,
            max_age=self.cfg.command_max_age,
            switch_word=lambda: "on" if switch_on() else "off",
        )
        self.prefix = f"pbx/{self.device_id}"
        self.state = "starting"
        self.last_error: str | None = None
        self.connected_since: float | None = None
        self.connects = 0
        self.published = 0
        self.bytes_published = 0
        self.puback_errors = 0
        self.commands_dropped = 0  # QoS 0 commands beyond MAX_QUEUED_QOS0
        self._quiet = Throttle()
        self.paused: str | None = None  # why deliveries are paused (the store refuses them)
        self._wake = asyncio.Event()
        self._new_data = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._session: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._closed.set()
        outbox.listeners.append(self._new_data.set)

    # -- the daemon's interface --------------------------------------------------------

    def wake(self) -> None:
        """Connect now rather than after the current backoff (the switch turned on)."""
        if self.switch_on() and self.state in ("severed", "waiting"):
            self.state = "connecting"
        self._wake.set()

    def status(self) -> dict[str, Any]:
        """For ``agentctl status``."""
        return {
            "configured": True,
            "state": self.state,
            "broker": self.cfg.broker,
            "connected_since": self.connected_since,
            "connects": self.connects,
            "published": self.published,
            "bytes_published": self.bytes_published,
            "puback_errors": self.puback_errors,
            "paused": self.paused,
            "last_error": self.last_error,
            "commands": {**self.commands.stats(), "dropped_qos0": self.commands_dropped},
        }

    async def sever(self) -> None:
        """The customer's switch: say ``severed``, close the connection, return when closed."""
        session, client = self._session, self._client
        if session is None or session.done():
            self.state = "severed"
            return
        if client is not None and self.state == "connected":
            try:
                async with asyncio.timeout(SEVER_PUBLISH_TIMEOUT):
                    await client.publish(f"{self.prefix}/status", b"severed", qos=1, retain=True)
            except (TimeoutError, aiomqtt.MqttError):
                pass  # the customer's word wins over telling the NOC why
        if client is not None:
            await self._disconnect_now(client)
        # Until the session has ended, even if it swallows a cancellation (check_cancelled).
        await cancel_and_wait(session)
        await self._closed.wait()
        self.state = "severed"
        log.warning("uplink_severed_by_customer")

    async def _abandon(self, client: aiomqtt.Client, connect_done: threading.Event) -> None:
        """After a failed or cancelled connect: wait for paho's thread, close what it opened."""
        deadline = time.monotonic() + self.cfg.connect_timeout
        cancelled = False
        # paho offers nothing to await here; poll briefly (a loopback handshake takes ms).
        while not connect_done.is_set() and time.monotonic() < deadline:
            try:
                await asyncio.sleep(0.005)
            except asyncio.CancelledError:
                cancelled = True  # sever() cancels repeatedly; finish closing first
        paho = client._client
        if paho.socket() is not None:
            paho._sock_close()
        if cancelled:
            raise asyncio.CancelledError

    async def _disconnect_now(self, client: aiomqtt.Client) -> None:
        """Send DISCONNECT (so the broker keeps ``severed``, not the will) and close the socket."""
        paho = client._client
        if paho.socket() is not None:
            paho.disconnect()  # queued; paho closes the socket once it is written
            deadline = time.monotonic() + DISCONNECT_TIMEOUT
            # paho offers nothing to await for "written and closed": poll briefly.
            while paho.socket() is not None and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        if paho.socket() is not None:
            paho._sock_close()  # the broker did not take it in time: close regardless

    async def run(self) -> None:
        """Connect, deliver and reconnect with capped, jittered backoff, until cancelled."""
        attempt = 0
        while True:
            if not self.switch_on():
                self.state = "severed"
                self._wake.clear()
                await self._wake.wait()
                attempt = 0
                continue
            self._session = asyncio.create_task(self._connected(), name="uplink-session")
            try:
                await asyncio.wait({self._session})
            except asyncio.CancelledError:
                self._session.cancel()
                # Time to say offline and disconnect (bounded inside _close) ...
                await asyncio.wait({self._session}, timeout=DISCONNECT_TIMEOUT + 1)
                # ... then again until it has ended: a cancellation the session swallowed
                # (see check_cancelled) would otherwise leave this wait, and shutdown, hanging.
                await cancel_and_wait(self._session)
                raise
            exc = None if self._session.cancelled() else self._session.exception()
            self._session = None
            if exc is None or not self.switch_on():
                continue  # severed by the customer: the loop waits for the switch
            if not isinstance(exc, AgentError):
                raise exc  # a bug: the supervisor logs it and restarts us
            self.last_error = str(exc)
            delay = backoff(attempt, base=1.0, cap=self.cfg.reconnect_max)
            if isinstance(exc, TLSMaterialError):
                delay = max(delay, min(60.0, self.cfg.reconnect_max))
            attempt += 1
            self.state = "waiting"
            log.error(
                "uplink_failed", error=str(exc), retry_in=round(delay, 2), kind=type(exc).__name__
            )
            self._wake.clear()
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    # -- one connection ------------------------------------------------------------------

    async def _connected(self) -> None:
        cfg = self.cfg
        tls.check_material(cfg.ca_file, cfg.cert_file, cfg.key_file, device_id=self.device_id)
        ctx = tls.client_context(cfg.ca_file, cfg.cert_file, cfg.key_file)
        limits = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        limits.ReceiveMaximum = COMMAND_RECEIVE_MAXIMUM
        limits.MaximumPacketSize = MAX_PACKET_FROM_BROKER
        client = aiomqtt.Client(
            cfg.host,
            cfg.port,
            identifier=self.device_id,
            tls_context=ctx,
            protocol=aiomqtt.ProtocolVersion.V5,
            keepalive=int(cfg.keepalive),
            will=aiomqtt.Will(f"{self.prefix}/status", b"offline", qos=1, retain=True),
            max_inflight_messages=cfg.max_inflight,
            timeout=cfg.connect_timeout,
            # Without it, pipelined QoS 1 publishes wait on Nagle's algorithm for their turn.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            properties=limits,
            queue_type=_CommandQueue,
        )
        client.pending_calls_threshold = 1_000_000
        client._client.manual_ack_set(True)  # a command is acknowledged once answered
        if isinstance(client._queue, _CommandQueue):
            client._queue.on_drop = self._command_dropped
        self.state = "connecting"
        self._closed.clear()
        # paho's blocking connect (TCP and TLS handshake) runs in a worker thread that a
        # cancellation cannot stop; knowing when it ends lets an abandoned attempt close
        # the socket it opened instead of leaving it to finish behind the switch's back.
        connect_done = threading.Event()
        raw_connect = client._client_connect

        def connect_then_flag() -> None:
            try:
                raw_connect()
            finally:
                connect_done.set()

        client._client_connect = connect_then_flag  # type: ignore[method-assign]
        try:
            await tls.connect_client(
                client,
                host=cfg.host,
                ca_file=cfg.ca_file,
                cert_file=cfg.cert_file,
                connect_timeout=cfg.connect_timeout,
            )
        except BaseException:
            try:
                await self._abandon(client, connect_done)
            finally:
                self._closed.set()
            raise
        self._client = client
        self.connects += 1
        try:
            acks = _Acks(client._client, self._new_data)  # aiomqtt hides PUBACK reason codes
            # paho formats a debug line per packet for aiomqtt's logger: a tenth of the CPU
            # at full rate, for lines nobody reads. Errors still reach us through on_log.
            client._client.disable_logger()
            await client.publish(f"{self.prefix}/status", b"online", qos=1, retain=True)
            await client.subscribe(f"{self.prefix}/cmd", qos=1)
            check_cancelled()
            self.connected_since = time.time()
            self.state = "connected"
            self.last_error = None
            log.info("uplink_connected", broker=cfg.broker, device_id=self.device_id)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._deliver(client, acks), name="uplink-deliver")
                tg.create_task(self._heartbeat(client), name="uplink-heartbeat")
                tg.create_task(self._commands(client), name="uplink-commands")
        except* aiomqtt.MqttError as group:
            raise UplinkError(f"connection to {cfg.broker} lost: {group.exceptions[0]}") from None
        except* AgentError as group:
            raise group.exceptions[0] from None
        finally:
            self._client = None
            self.connected_since = None
            try:
                await self._close(client, offline=not self.switch_on())
            finally:
                self._closed.set()  # even when a second cancellation lands inside _close

    async def _close(self, client: aiomqtt.Client, *, offline: bool) -> None:
        """Disconnect cleanly if we can, and close the socket whatever happens."""
        paho = client._client
        try:
            if offline and paho.is_connected():
                pass  # severed already said so; an orderly stop says offline below
            elif paho.is_connected():
                info = paho.publish(f"{self.prefix}/status", b"offline", qos=0, retain=True)
                del info
            async with asyncio.timeout(DISCONNECT_TIMEOUT):
                await client.__aexit__(None, None, None)
        except (TimeoutError, aiomqtt.MqttError, RuntimeError):
            pass
        finally:
            # Whatever state paho is in, no further byte may go out on this socket. paho's
            # own close also tells aiomqtt to stop watching the descriptor, which a bare
            # close() would not (and a reused descriptor number would then confuse the loop).
            if paho.socket() is not None:
                paho._sock_close()

    async def _heartbeat(self, client: aiomqtt.Client) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat)
            await client.publish(f"{self.prefix}/status", b"online", qos=1, retain=True)
            check_cancelled()

    async def _commands(self, client: aiomqtt.Client) -> None:
        # handle() never raises and payload() never fails: whatever the NOC sends, this
        # loop ends only with the connection. It is the one consumer of the message
        # queue, which holds nothing but commands (the only subscription).
        async for message in client.messages:
            raw = message.payload
            payload = bytes(raw) if isinstance(raw, bytes | bytearray) else b""
            reply = self.commands.handle(payload)
            await client.publish(f"{self.prefix}/reply", reply.payload(), qos=1)
            if message.qos > 0:
                client._client.ack(message.mid, message.qos)
            check_cancelled()

    def _command_dropped(self) -> None:
        self.commands_dropped += 1
        held = self._quiet.admit("dropped")
        if held is not None:
            log.warning(
                "noc_command_dropped",
                reason=f"more than {MAX_QUEUED_QOS0} QoS 0 commands waiting",
                dropped=self.commands_dropped,
            )

    async def _deliver(self, client: aiomqtt.Client, acks: _Acks) -> None:
        paho = client._client
        window = self.cfg.max_inflight
        inflight: dict[int, Stored] = {}
        acked: list[Stored] = []  # acknowledged by the broker, their deletion not committed yet
        last_seq = 0
        retry = 0
        try:
            while True:
                # While a delivery cannot be recorded, nothing new goes out: each envelope
                # sent then would be sent again after a restart, and a reconnect would send
                # the whole window again at every PUBACK. The connection stays up.
                room = 0 if acked else window - len(inflight)
                if room > 0:
                    self._new_data.clear()
                    for item in self.outbox.pending(room, after_seq=last_seq):
                        info = paho.publish(
                            f"{self.prefix}/up/{item.data_class}", item.payload, qos=1
                        )
                        if info.rc != paho_mqtt.MQTT_ERR_SUCCESS:
                            raise UplinkError(f"publish failed: {paho_mqtt.error_string(info.rc)}")
                        inflight[info.mid] = item
                        last_seq = item.seq
                if acked:
                    # Retry the commit after a pause, or sooner when more PUBACKs come in.
                    self._new_data.clear()
                    try:
                        async with asyncio.timeout(
                            min(STALL_RETRY_BASE * 2**retry, STALL_RETRY_MAX)
                        ):
                            await self._new_data.wait()
                    except TimeoutError:
                        pass
                elif not inflight:
                    await self._new_data.wait()
                    continue
                elif not acks.done:
                    # One event for both "a PUBACK came" and "the outbox grew": no futures per
                    # turn. No await since the outbox was read, so clearing here loses nothing.
                    self._new_data.clear()
                    await self._new_data.wait()
                failed: list[tuple[Stored, int]] = []
                for mid, code in acks.take():
                    if mid not in inflight:
                        continue
                    item = inflight.pop(mid)
                    if code >= 0x80:
                        failed.append((item, code))
                    else:
                        acked.append(item)
                if acked:
                    try:
                        self.outbox.delivered(acked)
                    except StateError as exc:
                        retry = min(retry + 1, 30)
                        self._pause(str(exc), len(acked))
                    else:
                        self.published += len(acked)
                        self.bytes_published += sum(len(i.payload) for i in acked)
                        acked = []
                        retry = 0
                        self._resume()
                if failed:
                    self.puback_errors += len(failed)
                    item, code = failed[0]
                    raise BrokerRefused(
                        f"the broker refused envelope seq {item.seq} ({item.data_class}) with "
                        f"reason code {code} ({_reason(code)}); it stays in the outbox. Check "
                        f"that the broker's ACL lets {self.device_id!r} publish under "
                        f"{self.prefix}/#"
                    )
        finally:
            self.paused = None  # the next connection finds out again

    def _pause(self, reason: str, waiting: int) -> None:
        if self.paused is None:
            log.error(
                "uplink_deliveries_paused",
                error=reason,
                acknowledged_not_recorded=waiting,
                note="nothing new is sent until the store is writable again",
            )
        self.paused = f"cannot record deliveries: {reason}"

    def _resume(self) -> None:
        if self.paused is not None:
            log.warning("uplink_deliveries_resumed")
            self.paused = None


def _reason(code: int) -> str:
    names = {
        128: "unspecified error",
        131: "implementation specific error",
        135: "not authorized",
        144: "topic name invalid",
        145: "packet id in use",
        151: "quota exceeded",
        153: "payload format invalid",
    }
    return names.get(code, "error")
