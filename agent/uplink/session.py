"""The MQTT session to the vendor's broker: mutual TLS, QoS 1 delivery, commands, the switch.

One connection at a time, made only while the switch is on, through the one MQTT
boundary (:mod:`agent.uplink.mqtt`). On connect the retained status becomes
``online`` (the last will says ``offline``); the outbox is drained with QoS 1
and up to ``max_inflight`` publishes in flight, an envelope being deleted only
when its PUBACK arrives with a success reason code. A PUBACK with an error code
(e.g. 135, not authorized) leaves the envelope in the outbox, is logged and
counted, and ends the connection so that it is retried after the backoff.

A delivery the outbox cannot record (a full disk) pauses the session instead of
ending it: nothing new is published, the acknowledged envelopes are kept in
memory and their commit retried (within a second of space returning), so a
full disk costs at most one window of duplicates after a restart, never a
reconnect loop that sends the window again and again.

:meth:`UplinkSession.sever` is the switch: it publishes ``severed``, closes
the connection and returns only when the socket is closed; a connection still
being made is abandoned at once, its TLS handshake shut down under it.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from agent.aio import backoff, cancel_and_wait
from agent.errors import AgentError, BrokerRefused, StateError, TLSMaterialError, UplinkError
from agent.logs import Throttle
from agent.uplink import tls
from agent.uplink.commands import CommandHandler, CommandHost
from agent.uplink.mqtt import LinkSettings, MqttLink, Will, reason_text
from agent.uplink.signing import CommandVerifier

if TYPE_CHECKING:
    from agent.ledger import Ledger
    from agent.outbox import Outbox, Stored
    from agent.sections import UplinkConfig

log = structlog.get_logger(__name__)

DISCONNECT_TIMEOUT = 1.0
#: Bound on the round trips of the session's own messages (status, replies, SUBACK).
ROUND_TRIP_TIMEOUT = 10.0
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

#: `online` is re-published after this many heartbeats with nothing else published: a
#: record sent every heartbeat (health, at the defaults) comes a little late each time
#: (the collection takes a moment) and must still count.
HEARTBEAT_SLACK = 1.25

#: A connection up at least this long resets the reconnect backoff when it ends.
STABLE_FOR = 60.0

STALL_RETRY_BASE = 0.05  # seconds before retrying a delivery the store refused; doubles ...
STALL_RETRY_MAX = 1.0  # ... up to this, so that recovery follows free space within a second


class UplinkState(enum.StrEnum):
    """What ``agentctl status`` says of the connection."""

    STARTING = "starting"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    WAITING = "waiting"  # a failed attempt, waiting out the backoff
    SEVERED = "severed"  # the customer's switch is off


class UplinkSession:
    """Keeps the uplink connected while the switch is on; delivers the outbox."""

    def __init__(
        self,
        *,
        uplink: UplinkConfig,
        device_id: str,
        outbox: Outbox,
        ledger: Ledger,
        switch_on: Callable[[], bool],
        commands: CommandHost,
    ) -> None:
        self.cfg = uplink
        self.device_id = device_id
        self.outbox = outbox
        self.ledger = ledger
        self.switch_on = switch_on
        self.commands = CommandHandler(
            conn=outbox.conn,
            ledger=ledger,
            host=commands,
            max_age=self.cfg.command_max_age,
            switch_word=lambda: "on" if switch_on() else "off",
            verifier=CommandVerifier(self.cfg.command_root, device_id),
        )
        self.prefix = f"pbx/{self.device_id}"
        self.state = UplinkState.STARTING
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
        self._link: MqttLink | None = None
        self._served_since: float | None = None  # when the current connection came up
        self._last_publish = 0.0  # monotonic time of the last publish: the heartbeat's clock
        self._session: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._closed.set()
        self._reconnect_now = False  # a renewed certificate: reconnect without a backoff
        outbox.listeners.append(self._new_data.set)

    # -- the daemon's interface --------------------------------------------------------

    def wake(self) -> None:
        """Connect now rather than after the current backoff (the switch turned on)."""
        if self.switch_on() and self.state in (UplinkState.SEVERED, UplinkState.WAITING):
            self.state = UplinkState.CONNECTING
        self._wake.set()

    @property
    def link(self) -> MqttLink | None:
        """The connection being made or in use; None between connections."""
        return self._link

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
            "commands": {
                **self.commands.stats(),
                "dropped_qos0": self.commands_dropped,
                "signing": self.commands.verifier.status(),
            },
        }

    async def renew_connection(self) -> None:
        """Reconnect at once with the TLS files as they are now (a renewed certificate).

        DISCONNECT is sent (no last will); envelopes not yet acknowledged stay in the
        outbox and go again on the new connection (duplicates within one window).
        """
        self._reconnect_now = True
        link = self._link
        if link is not None and link.connected:
            await link.disconnect(within=DISCONNECT_TIMEOUT)
        elif link is not None:
            link.close_now("reconnecting with a renewed certificate")
        self._wake.set()

    async def sever(self) -> None:
        """The customer's switch: say ``severed``, close the connection, return when closed.

        When this returns no further byte goes to the broker: a connection still being
        made is abandoned (its handshake shut down), an open one gets ``severed`` (retained, QoS 1,
        its PUBACK not awaited) and DISCONNECT, then is closed (bounded).
        """
        session, link = self._session, self._link
        if session is None or session.done():
            self.state = UplinkState.SEVERED
            return
        if link is not None:
            if link.connected:
                try:
                    # Not waiting for its PUBACK: the broker reads the PUBLISH before the
                    # DISCONNECT behind it on the same stream, so "severed" is retained all
                    # the same, and the connection closes a round trip sooner (issue 17).
                    link.publish(f"{self.prefix}/status", b"severed", qos=1, retain=True)
                except UplinkError:
                    pass  # the customer's word wins over telling the NOC why
                await link.disconnect(within=DISCONNECT_TIMEOUT)
            else:
                link.close_now("severed by the customer")
        # Until the session has ended, even if something in it swallows a cancellation.
        await cancel_and_wait(session)
        await self._closed.wait()
        self.state = UplinkState.SEVERED
        log.warning("uplink_severed_by_customer")

    async def run(self) -> None:
        """Connect, deliver and reconnect with capped, jittered backoff, until cancelled."""
        attempt = 0
        while True:
            if not self.switch_on():
                self.state = UplinkState.SEVERED
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
                # ... then again until it has ended, so a swallowed cancellation cannot
                # leave this wait, and shutdown, hanging.
                await cancel_and_wait(self._session)
                raise
            exc = None if self._session.cancelled() else self._session.exception()
            self._session = None
            if self._reconnect_now:
                self._reconnect_now = False
                attempt = 0
                continue
            if exc is None or not self.switch_on():
                continue  # severed by the customer: the loop waits for the switch
            if not isinstance(exc, AgentError):
                raise exc  # a bug: the supervisor logs it and restarts us
            self.last_error = str(exc)
            up = self._served_since
            if up is not None and time.monotonic() - up >= STABLE_FOR:
                # It was up a good while: this is a new outage, not the next failed attempt
                # of the old one, so the first retry comes after about a second again.
                attempt = 0
            self._served_since = None
            delay = backoff(attempt, base=1.0, cap=self.cfg.reconnect_max)
            if isinstance(exc, TLSMaterialError):
                delay = max(delay, min(60.0, self.cfg.reconnect_max))
            attempt += 1
            self.state = UplinkState.WAITING
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
        link = MqttLink(
            LinkSettings(
                host=cfg.host,
                port=cfg.port,
                client_id=self.device_id,
                keepalive=cfg.keepalive,
                connect_timeout=cfg.connect_timeout,
                max_inflight=0,  # _deliver keeps the window; paho would walk it per PUBACK
                will=Will(f"{self.prefix}/status", b"offline", qos=1, retain=True),
                receive_maximum=COMMAND_RECEIVE_MAXIMUM,
                max_packet_size=MAX_PACKET_FROM_BROKER,
                manual_ack=True,  # a command is acknowledged once answered
                max_queued_qos0=MAX_QUEUED_QOS0,
            ),
            tls.client_context(cfg.ca_file, cfg.cert_file, cfg.key_file),
        )
        link.on_ack(self._new_data.set)
        link.on_drop(self._command_dropped)
        self.state = UplinkState.CONNECTING
        self._link = link  # sever() can abandon it from here on
        self._closed.clear()
        try:
            await link.connect()
            self.connects += 1
            # Subscribed before saying online: a NOC that answers "online" with a command
            # must find it heard, not dropped by the broker for want of a subscriber.
            await link.subscribe(f"{self.prefix}/cmd", within=ROUND_TRIP_TIMEOUT)
            await link.publish_wait(
                f"{self.prefix}/status", b"online", retain=True, within=ROUND_TRIP_TIMEOUT
            )
            self._last_publish = time.monotonic()
            self.connected_since = time.time()
            self._served_since = time.monotonic()
            self.state = UplinkState.CONNECTED
            self.last_error = None
            log.info("uplink_connected", broker=cfg.broker, device_id=self.device_id)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._deliver(link), name="uplink-deliver")
                tg.create_task(self._heartbeat(link), name="uplink-heartbeat")
                tg.create_task(self._commands(link), name="uplink-commands")
                tg.create_task(self._watch(link), name="uplink-watch")
        except* AgentError as group:
            raise group.exceptions[0] from None
        finally:
            self._link = None
            self.connected_since = None
            try:
                await self._close(link, severed=not self.switch_on())
            finally:
                link.close_now()  # even when a second cancellation lands inside _close
                self._closed.set()

    async def _close(self, link: MqttLink, *, severed: bool) -> None:
        """Say ``offline`` on an orderly stop (severed already said why), then DISCONNECT."""
        if link.connected and not severed:
            try:
                link.publish(f"{self.prefix}/status", b"offline", qos=0, retain=True)
            except UplinkError:
                pass
        await link.disconnect(within=DISCONNECT_TIMEOUT)

    async def _watch(self, link: MqttLink) -> None:
        reason = await link.wait_lost()
        raise UplinkError(f"connection to {self.cfg.broker} lost: {reason}")

    async def _heartbeat(self, link: MqttLink) -> None:
        # `online` tells a NOC that hears nothing else that the box is alive. Anything the
        # session publishes tells it the same (the NOC counts every envelope and reply as
        # a sign of life), and the MQTT keepalive watches the link itself; so `online` is
        # re-published only after a heartbeat and a quarter of silence. At the defaults a
        # health record goes every minute and it is never re-published (issue 17).
        quiet_for = self.cfg.heartbeat * HEARTBEAT_SLACK
        while True:
            wait = self._last_publish + quiet_for - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            await link.publish_wait(
                f"{self.prefix}/status", b"online", retain=True, within=ROUND_TRIP_TIMEOUT
            )
            self._last_publish = time.monotonic()

    async def _commands(self, link: MqttLink) -> None:
        # handle() never raises and payload() never fails: whatever the NOC sends, this
        # loop ends only with the connection. It is the one consumer of the link's
        # messages, which are nothing but commands (the only subscription).
        while True:
            message = await link.next_message()
            reply = self.commands.handle(message.payload)
            await link.publish_wait(
                f"{self.prefix}/reply", reply.payload(), within=ROUND_TRIP_TIMEOUT
            )
            self._last_publish = time.monotonic()
            link.ack(message)

    def _command_dropped(self) -> None:
        self.commands_dropped += 1
        held = self._quiet.admit("dropped")
        if held is not None:
            log.warning(
                "noc_command_dropped",
                reason=f"more than {MAX_QUEUED_QOS0} QoS 0 commands waiting",
                dropped=self.commands_dropped,
            )

    async def _deliver(self, link: MqttLink) -> None:
        # Group commit: a batch of acknowledgements is committed without waiting for the
        # disk, and its fsync runs in a worker thread while the loop goes on reading
        # PUBACKs and publishing; the PUBACKs that arrive meanwhile wait in memory and
        # are committed together once it is done (Outbox.delivered, durable=False).
        loop = asyncio.get_running_loop()
        window = self.cfg.max_inflight
        inflight: dict[int, Stored] = {}
        acked: list[Stored] = []  # acknowledged by the broker, their deletion not committed yet
        syncing: asyncio.Future[None] | None = None  # the fsync of the last commit
        topics: dict[str, str] = {}  # per data class, built once
        stalled = False  # the store refused the last commit
        last_seq = 0
        retry = 0
        try:
            while True:
                # While a delivery cannot be recorded, nothing new goes out: each envelope
                # sent then would be sent again after a restart, and a reconnect would send
                # the whole window again at every PUBACK. The connection stays up. Waiting
                # commits count against the window: a crash still repeats one window at most.
                room = 0 if stalled else window - len(inflight) - len(acked)
                if room > 0:
                    self._new_data.clear()
                    before = last_seq
                    for item in self.outbox.pending(room, after_seq=last_seq):
                        topic = topics.get(item.data_class)
                        if topic is None:
                            topic = topics[item.data_class] = f"{self.prefix}/up/{item.data_class}"
                        mid = link.publish(topic, item.payload)
                        inflight[mid] = item
                        last_seq = item.seq
                    if last_seq != before:
                        self._last_publish = time.monotonic()
                if stalled:
                    # Retry the commit after a pause, or sooner when more PUBACKs come in.
                    self._new_data.clear()
                    try:
                        async with asyncio.timeout(
                            min(STALL_RETRY_BASE * 2**retry, STALL_RETRY_MAX)
                        ):
                            await self._new_data.wait()
                    except TimeoutError:
                        pass
                elif not inflight and not acked and syncing is None:
                    await self._new_data.wait()
                    continue
                elif not link.acks_waiting and not (syncing is not None and syncing.done()):
                    # One event for "a PUBACK came", "the outbox grew" and "the fsync is
                    # done": no futures per turn. No await since the outbox was read, so
                    # clearing here loses nothing.
                    self._new_data.clear()
                    await self._new_data.wait()
                if syncing is not None and syncing.done():
                    self._synced(syncing)
                    syncing = None
                failed: list[tuple[Stored, int]] = []
                for ack in link.take_acks():
                    item_or_none = inflight.pop(ack.mid, None)
                    if item_or_none is None:
                        continue
                    if ack.ok:
                        acked.append(item_or_none)
                    else:
                        failed.append((item_or_none, ack.reason))
                if acked and syncing is None:
                    try:
                        self.outbox.delivered(acked, durable=False)
                    except StateError as exc:
                        retry = min(retry + 1, 30)
                        stalled = True
                        self._pause(str(exc), len(acked))
                    else:
                        self.published += len(acked)
                        self.bytes_published += sum(len(i.payload) for i in acked)
                        acked = []
                        retry = 0
                        stalled = False
                        self._resume()
                        syncing = loop.run_in_executor(None, self.outbox.sync)
                        syncing.add_done_callback(self._sync_done)
                if failed:
                    self.puback_errors += len(failed)
                    item, code = failed[0]
                    raise BrokerRefused(
                        f"the broker refused envelope seq {item.seq} ({item.data_class}) with "
                        f"reason code {code} ({reason_text(code)}); it stays in the outbox. "
                        f"Check that the broker's ACL lets {self.device_id!r} publish under "
                        f"{self.prefix}/#"
                    )
        finally:
            self.paused = None  # the next connection finds out again

    def _sync_done(self, fut: asyncio.Future[None]) -> None:
        # Wakes the delivery loop; a sync that ends after the loop did is only retrieved.
        self._new_data.set()
        if not fut.cancelled() and fut.exception() is not None:
            log.error("uplink_delivery_sync_failed", error=str(fut.exception()))

    def _synced(self, fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return  # logged by _sync_done; the anchor stays at the last synced head
        self.outbox.synced()

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
