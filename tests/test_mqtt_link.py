"""The MQTT boundary against a real mosquitto with mutual TLS: what the uplink relies on.

PUBACK reason codes reach the caller (an ACL refusal is visible), a closed link
sends no further byte (also when closed in the middle of its TLS handshake),
DISCONNECT keeps the will from being published, keepalive pings flow, and a
flood of incoming messages is held back instead of growing the process.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from agent.errors import BrokerRefused, UplinkError
from agent.uplink import mqtt
from agent.uplink.mqtt import LinkSettings, LinkState, MqttLink, Will
from agent.uplink.tls import client_context
from tests.support.mosquitto import Mosquitto
from tests.support.pki import PKI, Creds
from tests.support.relay import Relay

pytestmark = pytest.mark.integration

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one scenario with an overall deadline, so a hang fails instead of blocking."""

    async def bounded() -> T:
        async with asyncio.timeout(30):
            return await coro

    return asyncio.run(bounded())


def link_for(
    pki: PKI,
    creds: Creds,
    host: str,
    port: int,
    *,
    keepalive: float = 60.0,
    will: Will | None = None,
    connect_timeout: float = 5.0,
    ca_file: Any = None,
) -> MqttLink:
    """A link for ``creds`` with a unique client id and a fresh context."""
    ctx = client_context(ca_file or pki.ca_file, creds.cert, creds.key)
    settings = LinkSettings(
        host=host,
        port=port,
        client_id=f"{creds.cn}-{uuid.uuid4().hex[:8]}",
        keepalive=keepalive,
        will=will,
        connect_timeout=connect_timeout,
    )
    return MqttLink(settings, ctx)


def test_publish_acks_carry_reason_codes(pki: PKI, broker: Mosquitto) -> None:
    """A publish inside the device's subtree is acked with success, one outside with 135."""

    async def scenario() -> list[mqtt.Ack]:
        link = link_for(pki, pki.device("pbx-test-1"), broker.host, broker.port)
        await link.connect()
        woke = asyncio.Event()
        link.on_ack(woke.set)
        mine = link.publish("pbx/pbx-test-1/up/health", b"{}")
        theirs = link.publish("pbx/pbx-test-2/up/health", b"{}")
        acks: list[mqtt.Ack] = []
        while len(acks) < 2:
            await woke.wait()
            woke.clear()
            acks.extend(link.take_acks())
        await link.disconnect()
        assert {a.mid for a in acks} == {mine, theirs}
        return sorted(acks, key=lambda a: a.mid == theirs)

    ok, refused = run(scenario())
    assert ok.ok and ok.reason in (0, 16)  # 16: accepted, no subscriber yet
    assert not refused.ok and refused.reason == 135


def test_messages_and_subscribe(pki: PKI, broker: Mosquitto) -> None:
    """A subscriber receives what the NOC publishes on its command topic, in order."""

    async def scenario() -> list[bytes]:
        dev = link_for(pki, pki.device("pbx-test-1"), broker.host, broker.port)
        noc = link_for(pki, pki.device("noc"), broker.host, broker.port)
        await dev.connect()
        await noc.connect()
        granted = await dev.subscribe("pbx/pbx-test-1/cmd")
        assert granted == 1
        for i in range(5):
            await noc.publish_wait("pbx/pbx-test-1/cmd", f"c{i}".encode())
        got = [(await dev.next_message()).payload for _ in range(5)]
        await dev.disconnect()
        await noc.disconnect()
        return got

    assert run(scenario()) == [b"c0", b"c1", b"c2", b"c3", b"c4"]


def test_disconnect_keeps_the_will_back_and_close_now_lets_it_out(
    pki: PKI, broker: Mosquitto
) -> None:
    """An orderly DISCONNECT suppresses the will; a dropped connection makes the broker send it."""

    async def scenario() -> list[bytes]:
        device = pki.device("pbx-test-1")
        noc = link_for(pki, pki.device("noc"), broker.host, broker.port)
        await noc.connect()
        await noc.subscribe("pbx/pbx-test-1/will-test")
        polite = link_for(
            pki,
            device,
            broker.host,
            broker.port,
            will=Will("pbx/pbx-test-1/will-test", b"polite", retain=False),
        )
        await polite.connect()
        await polite.disconnect()
        rude = link_for(
            pki,
            device,
            broker.host,
            broker.port,
            will=Will("pbx/pbx-test-1/will-test", b"rude", retain=False),
        )
        await rude.connect()
        rude.close_now("test")
        async with asyncio.timeout(5):
            first = await noc.next_message()
        # A marker published after both proves nothing else was queued before it.
        marker = link_for(pki, device, broker.host, broker.port)
        await marker.connect()
        assert (await marker.publish_wait("pbx/pbx-test-1/will-test", b"marker")).ok
        await marker.disconnect()
        async with asyncio.timeout(5):
            second = await noc.next_message()
        await noc.disconnect()
        return [first.payload, second.payload]

    assert run(scenario()) == [b"rude", b"marker"]


def test_close_now_sends_nothing_more(pki: PKI, broker: Mosquitto) -> None:
    """After close_now returns, a byte-counting relay sees no further byte from the client."""
    relay = Relay(broker.host, broker.port)
    try:

        async def scenario() -> tuple[int, int]:
            link = link_for(pki, pki.device("pbx-test-1"), relay.host, relay.port)
            await link.connect()
            for _ in range(50):
                link.publish("pbx/pbx-test-1/up/health", b"x" * 1000)
            link.close_now("switch")
            at_close = relay.counts().up
            with pytest.raises(UplinkError):
                link.publish("pbx/pbx-test-1/up/health", b"late")
            await asyncio.sleep(0)  # let any callback already queued run
            relay.wait_closed(timeout=5)
            return at_close, relay.counts().up

        at_close, after = run(scenario())
        assert after == at_close
    finally:
        relay.close()


class _SilentTLSServer:
    """Accepts TCP and reads, but never answers: a TLS handshake that hangs."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.received = 0
        self.hello = threading.Event()
        self.conns: list[socket.socket] = []
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        self.conns.append(conn)
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                break
            if not data:
                break
            self.received += len(data)
            self.hello.set()
        self.closed.set()

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.sock.close()


def test_close_now_interrupts_a_hanging_handshake(pki: PKI) -> None:
    """close_now during a TLS handshake that never completes ends the connect at once."""
    server = _SilentTLSServer()
    try:

        async def scenario() -> float:
            link = link_for(
                pki, pki.device("pbx-test-1"), "127.0.0.1", server.port, connect_timeout=20
            )
            task = asyncio.create_task(link.connect())
            # Wait until the ClientHello arrived: the handshake is under way in paho's thread.
            assert await asyncio.to_thread(server.hello.wait, 5), "no ClientHello"

            loop = asyncio.get_running_loop()
            t0 = loop.time()
            link.close_now("switch")
            with pytest.raises(UplinkError):
                await task
            assert link.state is LinkState.CLOSED
            return loop.time() - t0

        elapsed = run(scenario())
        assert elapsed < 1.0
        assert server.closed.wait(5), "the abandoned handshake's socket was left open"
    finally:
        server.close()


def test_wrong_ca_is_refused_with_a_clear_error(pki: PKI, broker: Mosquitto) -> None:
    """A broker whose certificate the pinned CA did not issue fails the connect, naming it."""

    async def scenario() -> None:
        link = link_for(
            pki, pki.device("pbx-test-1"), broker.host, broker.port, ca_file=pki.rogue_ca_file
        )
        await link.connect()

    with pytest.raises(UplinkError) as err:
        run(scenario())
    assert "pinned CA" in str(err.value)


def test_rogue_client_certificate_is_refused(pki: PKI, broker: Mosquitto) -> None:
    """A client certificate from another CA is refused by the broker, and said so quickly."""

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        link = link_for(pki, pki.rogue_clients["pbx-test-1"], broker.host, broker.port)
        with pytest.raises(BrokerRefused):
            await link.connect()
        return loop.time() - t0

    assert run(scenario()) < 3.0


def test_keepalive_pings_keep_an_idle_link_up(pki: PKI, broker: Mosquitto) -> None:
    """With a 2 s keepalive and nothing to send, the link stays up past 1.5 keepalives."""

    async def scenario() -> LinkState:
        link = link_for(pki, pki.device("pbx-test-1"), broker.host, broker.port, keepalive=2)
        await link.connect()
        lost = asyncio.ensure_future(link.wait_lost())
        done, _ = await asyncio.wait({lost}, timeout=5.0)
        state = link.state
        lost.cancel()
        await link.disconnect()
        assert not done, f"link lost: {link.lost_reason}"
        return state

    assert run(scenario()) is LinkState.CONNECTED


def _link_with(pki: PKI, creds: Creds, broker: Mosquitto, **settings: Any) -> MqttLink:
    ctx = client_context(pki.ca_file, creds.cert, creds.key)
    return MqttLink(
        LinkSettings(
            host=broker.host,
            port=broker.port,
            client_id=f"{creds.cn}-{uuid.uuid4().hex[:8]}",
            **settings,
        ),
        ctx,
    )


async def _wait_until(predicate: Any, what: str, seconds: float = 10.0) -> None:
    async with asyncio.timeout(seconds):
        while not predicate():  # noqa: ASYNC110 -- counters, no event to await
            await asyncio.sleep(0.02)
    assert predicate(), what


def test_a_flood_of_qos0_messages_is_capped(pki: PKI, broker: Mosquitto) -> None:
    """QoS 0 messages past the cap are dropped and counted; the inbox never holds more."""
    total, cap = 500, 50

    async def scenario() -> tuple[int, int]:
        dev = _link_with(pki, pki.device("pbx-test-1"), broker, max_queued_qos0=cap)
        noc = _link_with(pki, pki.device("noc"), broker)
        await dev.connect()
        await noc.connect()
        await dev.subscribe("pbx/pbx-test-1/cmd", qos=0)
        drops: list[int] = []
        dev.on_drop(lambda: drops.append(1))
        for i in range(total):
            noc.publish("pbx/pbx-test-1/cmd", b"%d" % i, qos=0)
        await _wait_until(
            lambda: dev.dropped_qos0 + len(dev._inbox) == total, "every message accounted for"
        )
        held = len(dev._inbox)
        first = await dev.next_message()
        assert first.payload == b"0"
        await dev.disconnect()
        await noc.disconnect()
        assert len(drops) == dev.dropped_qos0
        return held, dev.dropped_qos0

    held, dropped = run(scenario())
    assert held == cap
    assert dropped == total - cap


def test_manual_acks_and_receive_maximum_hold_a_flood_at_the_broker(
    pki: PKI, broker: Mosquitto
) -> None:
    """With Receive Maximum 4 and manual acks, a fifth QoS 1 message waits for an ack."""

    async def scenario() -> list[bytes]:
        dev = _link_with(pki, pki.device("pbx-test-1"), broker, receive_maximum=4, manual_ack=True)
        noc = _link_with(pki, pki.device("noc"), broker)
        await dev.connect()
        await noc.connect()
        await dev.subscribe("pbx/pbx-test-1/cmd")
        for i in range(10):
            noc.publish("pbx/pbx-test-1/cmd", b"%d" % i)
        got = [await dev.next_message() for _ in range(4)]
        # Nothing more arrives while these four are unacknowledged.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                await dev.next_message()
        for m in got:
            dev.ack(m)
        rest = []
        for _ in range(6):
            async with asyncio.timeout(5):
                m = await dev.next_message()
            dev.ack(m)
            rest.append(m)
        await dev.disconnect()
        await noc.disconnect()
        return [m.payload for m in got + rest]

    assert run(scenario()) == [b"%d" % i for i in range(10)]


def test_packets_over_the_announced_maximum_are_not_sent_to_us(pki: PKI, broker: Mosquitto) -> None:
    """The broker honours Maximum Packet Size: a large message is dropped, a small one arrives."""

    async def scenario() -> bytes:
        dev = _link_with(pki, pki.device("pbx-test-1"), broker, max_packet_size=1024)
        noc = _link_with(pki, pki.device("noc"), broker)
        await dev.connect()
        await noc.connect()
        await dev.subscribe("pbx/pbx-test-1/cmd")
        noc.publish("pbx/pbx-test-1/cmd", b"x" * 4096)
        noc.publish("pbx/pbx-test-1/cmd", b"small")
        async with asyncio.timeout(5):
            m = await dev.next_message()
        await dev.disconnect()
        await noc.disconnect()
        return m.payload

    assert run(scenario()) == b"small"


def test_a_link_is_used_once(pki: PKI, broker: Mosquitto) -> None:
    """Connecting a link twice is refused: each attempt gets a fresh link and context."""

    async def scenario() -> None:
        link = link_for(pki, pki.device("pbx-test-1"), broker.host, broker.port)
        await link.connect()
        try:
            with pytest.raises(UplinkError):
                await link.connect()
        finally:
            await link.disconnect()

    run(scenario())


def test_contexts_get_the_watched_socket_class(pki: PKI) -> None:
    """The link installs its handshake watch on the context it is given."""
    creds = pki.device("pbx-test-1")
    ctx = client_context(pki.ca_file, creds.cert, creds.key)
    MqttLink(LinkSettings(host="localhost", port=1, client_id="x"), ctx)
    assert issubclass(ctx.sslsocket_class, ssl.SSLSocket)
    assert ctx.sslsocket_class is mqtt._WatchedSSLSocket


def test_failed_handshakes_leave_no_descriptor_behind(pki: PKI, broker: Mosquitto) -> None:
    """Twenty refused handshakes (wrong CA pinned) cost no file descriptor: paho drops such a
    socket unclosed, the link's socket class closes it."""
    import os

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def scenario() -> tuple[int, int]:
        async def attempt() -> None:
            link = link_for(
                pki,
                pki.device("pbx-test-1"),
                broker.host,
                broker.port,
                ca_file=pki.rogue_ca_file,
            )
            with pytest.raises(UplinkError):
                await link.connect()

        await attempt()  # the first one opens what stays open anyway (the executor's thread)
        before = fds()
        for _ in range(20):
            await attempt()
        return before, fds()

    before, after = run(scenario())
    assert after <= before
