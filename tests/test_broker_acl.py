"""Against a real mosquitto: mutual TLS admits only vendor-issued boxes, each in its own topics.

Also proves the device side: it refuses a broker from another CA or naming
another host, and a refused client certificate fails fast with a clear error.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest

from agent.errors import BrokerRefused, UplinkError
from agent.uplink.mqtt import Ack, LinkSettings, Message, MqttLink, Will
from agent.uplink.tls import classify_tls_error, client_context
from tests.support.mosquitto import Mosquitto
from tests.support.pki import PKI, Creds
from tests.support.relay import Relay

pytestmark = pytest.mark.integration

T = TypeVar("T")
FAST = 2.0  # seconds: "quickly", far below a 10 s CONNACK time-out


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one scenario with an overall deadline, so a hang fails instead of blocking."""

    async def bounded() -> T:
        async with asyncio.timeout(20):
            return await coro

    return asyncio.run(bounded())


def link_to(
    host: str, port: int, ctx: ssl.SSLContext, cn: str, *, will: Will | None = None
) -> MqttLink:
    """An MQTT 5 link through the agent's boundary, with a unique client id."""
    return MqttLink(
        LinkSettings(
            host=host,
            port=port,
            client_id=f"{cn}-{uuid.uuid4().hex[:8]}",
            will=will,
            connect_timeout=5,
        ),
        ctx,
    )


@asynccontextmanager
async def session(
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    cn: str,
    *,
    will: Will | None = None,
) -> AsyncIterator[MqttLink]:
    """A connected link, disconnected cleanly afterwards."""
    link = link_to(host, port, ctx, cn, will=will)
    await link.connect()
    try:
        yield link
    finally:
        await link.disconnect()


async def connect_only(host: str, port: int, ctx: ssl.SSLContext, cn: str) -> None:
    """Connect, and disconnect at once (for tests where the connect itself must fail)."""
    async with session(host, port, ctx, cn):
        pass


def ctx_of(pki: PKI, creds: Creds, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """The device-style context for ``creds``, pinning the vendor CA."""
    return client_context(pki.ca_file, creds.cert, creds.key, max_version=max_version)


async def publish(link: MqttLink, topic: str, payload: bytes, *, retain: bool = False) -> Ack:
    """A QoS 1 publish and its PUBACK (reason code included)."""
    return await link.publish_wait(topic, payload, retain=retain, within=5)


async def next_message(link: MqttLink) -> Message:
    """The next message delivered to ``link``, or TimeoutError after 5 s."""
    async with asyncio.timeout(5.0):
        return await link.next_message()


async def received_before_marker(link: MqttLink, marker_topic: str) -> list[str]:
    """Topics delivered to ``link`` up to the marker; the marker proves the wait was enough.

    The broker handles packets in order, so anything it forwarded before the
    marker was published reaches the subscriber before the marker.
    """
    seen: list[str] = []
    while True:
        msg = await next_message(link)
        if msg.topic == marker_topic:
            return seen
        seen.append(msg.topic)


def test_device_round_trip_under_its_own_topic(broker: Mosquitto, pki: PKI) -> None:
    """A box publishes QoS 1 under pbx/<its CN>/ with a success PUBACK; it and the NOC get it."""

    async def scenario() -> None:
        dev, noc = pki.device("pbx-test-1"), pki.device("noc")
        async with (
            session(broker.host, broker.port, ctx_of(pki, dev), dev.cn) as box,
            session(broker.host, broker.port, ctx_of(pki, noc), noc.cn) as nocc,
        ):
            granted = await box.subscribe("pbx/pbx-test-1/#", qos=1)
            await nocc.subscribe("pbx/+/up/#", qos=1)
            assert granted == 1
            rc = await publish(box, "pbx/pbx-test-1/up/health", b'{"v":1}')
            assert rc.ok
            got = await next_message(box)
            while got.retain:
                # A status another test left retained for this device on the shared broker.
                got = await next_message(box)
            assert (got.topic, got.payload) == ("pbx/pbx-test-1/up/health", b'{"v":1}')
            got = await next_message(nocc)
            assert (got.topic, got.payload) == ("pbx/pbx-test-1/up/health", b'{"v":1}')

    run(scenario())


def test_noc_commands_a_box_but_cannot_speak_for_it(broker: Mosquitto, pki: PKI) -> None:
    """The NOC may write pbx/<id>/cmd and read replies, but a publish under up/ gets PUBACK 135."""

    async def scenario() -> None:
        dev, noc = pki.device("pbx-test-1"), pki.device("noc")
        async with (
            session(broker.host, broker.port, ctx_of(pki, dev), dev.cn) as box,
            session(broker.host, broker.port, ctx_of(pki, noc), noc.cn) as nocc,
        ):
            await box.subscribe("pbx/pbx-test-1/cmd", qos=1)
            await nocc.subscribe("pbx/pbx-test-1/reply", qos=1)
            assert (await publish(nocc, "pbx/pbx-test-1/cmd", b"ping")).ok
            assert (await next_message(box)).payload == b"ping"
            assert (await publish(box, "pbx/pbx-test-1/reply", b"pong")).ok
            assert (await next_message(nocc)).payload == b"pong"
            denied = await publish(nocc, "pbx/pbx-test-1/up/health", b"forged")
            assert denied.reason == 135
            assert not denied.ok

    run(scenario())


def test_publish_under_another_devices_topic_is_denied(broker: Mosquitto, pki: PKI) -> None:
    """pbx-test-1 publishing under pbx/pbx-test-2/ gets PUBACK 135; pbx-test-2 receives nothing."""

    async def scenario() -> None:
        one, two = pki.device("pbx-test-1"), pki.device("pbx-test-2")
        marker = f"pbx/pbx-test-2/marker/{uuid.uuid4().hex}"
        async with (
            session(broker.host, broker.port, ctx_of(pki, one), one.cn) as c1,
            session(broker.host, broker.port, ctx_of(pki, two), two.cn) as c2,
        ):
            await c2.subscribe("pbx/pbx-test-2/#", qos=1)
            rc = await publish(c1, "pbx/pbx-test-2/cmd", b"forged")
            assert (rc.reason, rc.ok) == (135, False)
            assert (await publish(c2, marker, b"")).ok
            assert await received_before_marker(c2, marker) == []

    run(scenario())


def test_subscription_to_another_devices_topic_delivers_nothing(
    broker: Mosquitto, pki: PKI
) -> None:
    """pbx-test-1 subscribed to pbx/pbx-test-2/# receives none of pbx-test-2's messages."""

    async def scenario() -> None:
        one, two = pki.device("pbx-test-1"), pki.device("pbx-test-2")
        marker = f"pbx/pbx-test-1/marker/{uuid.uuid4().hex}"
        async with (
            session(broker.host, broker.port, ctx_of(pki, one), one.cn) as c1,
            session(broker.host, broker.port, ctx_of(pki, two), two.cn) as c2,
        ):
            await c1.subscribe("pbx/pbx-test-2/#", qos=1)  # mosquitto grants it, quietly
            await c1.subscribe(marker, qos=1)
            assert (await publish(c2, "pbx/pbx-test-2/up/health", b"x")).ok
            assert (await publish(c1, marker, b"")).ok
            assert await received_before_marker(c1, marker) == []

    run(scenario())


TLS_VERSIONS = [
    pytest.param(None, id="tls1.3"),
    pytest.param(ssl.TLSVersion.TLSv1_2, id="tls1.2"),
]


@pytest.mark.parametrize("max_version", TLS_VERSIONS)
def test_client_without_certificate_is_refused_quickly(
    broker: Mosquitto, pki: PKI, max_version: ssl.TLSVersion | None
) -> None:
    """A client with no certificate is refused with BrokerRefused, well under the connect timeout.

    Under TLS 1.3 the refusal arrives after the client finished its handshake; the
    link notices the dropped connection before CONNACK instead of waiting it out.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca_file)
    if max_version is not None:
        ctx.maximum_version = max_version
    start = time.monotonic()
    with pytest.raises(BrokerRefused, match="refused") as err:
        run(connect_only(broker.host, broker.port, ctx, "anonymous"))
    assert time.monotonic() - start < FAST
    assert "CERTIFICATE_REQUIRED" in str(err.value) or "alert" in str(err.value)


@pytest.mark.parametrize("max_version", TLS_VERSIONS)
def test_certificate_from_rogue_ca_is_refused_quickly(
    broker: Mosquitto, pki: PKI, max_version: ssl.TLSVersion | None
) -> None:
    """A certificate from another CA (same CN) is refused fast, with an error naming the cause."""
    rogue = pki.rogue_clients["pbx-test-1"]
    ctx = client_context(pki.ca_file, rogue.cert, rogue.key, max_version=max_version)
    start = time.monotonic()
    with pytest.raises(BrokerRefused) as err:
        run(connect_only(broker.host, broker.port, ctx, rogue.cn))
    assert time.monotonic() - start < FAST
    assert "UNKNOWN_CA" in str(err.value)
    assert "client certificate" in str(err.value)


def test_device_refuses_broker_from_another_ca(broker: Mosquitto, pki: PKI) -> None:
    """Pinning a CA that did not issue the broker's certificate fails the handshake: wrong_ca."""
    dev = pki.device("pbx-test-1")
    ctx = client_context(pki.rogue_ca_file, dev.cert, dev.key)
    with pytest.raises(UplinkError) as err:
        run(connect_only(broker.host, broker.port, ctx, dev.cn))
    assert not isinstance(err.value, BrokerRefused)
    assert classify_tls_error(str(err.value)).kind == "wrong_ca"
    assert "not issued by the pinned CA" in str(err.value)


def test_device_refuses_broker_naming_another_host(
    broker_factory: Callable[..., Mosquitto], pki: PKI
) -> None:
    """A vendor-signed broker certificate for another host name is refused: wrong_host."""
    cert, key = pki.issue_broker(["noc.elsewhere.example"], stem="elsewhere", loopback=False)
    other = broker_factory(broker_cert=cert, broker_key=key)
    dev = pki.device("pbx-test-1")
    with pytest.raises(UplinkError) as err:
        run(connect_only(other.host, other.port, ctx_of(pki, dev), dev.cn))
    assert "does not name '127.0.0.1'" in str(err.value)
    assert classify_tls_error(str(err.value)).kind == "wrong_host"


def test_last_will_on_a_cut_link_and_none_on_clean_disconnect(
    broker_factory: Callable[..., Mosquitto],
    relay_factory: Callable[[str, int], Relay],
    pki: PKI,
) -> None:
    """Retained ``online``; a cut link publishes the will ``offline``; a clean exit does not."""
    b = broker_factory()
    relay = relay_factory(b.host, b.port)
    dev, noc = pki.device("pbx-test-1"), pki.device("noc")
    status = "pbx/pbx-test-1/status"
    will = Will(status, b"offline", qos=1, retain=True)

    async def scenario() -> None:
        async with session(b.host, b.port, ctx_of(pki, noc), noc.cn) as nocc:
            await nocc.subscribe(status, qos=1)
            box = link_to(relay.host, relay.port, ctx_of(pki, dev), "box", will=will)
            await box.connect()
            await publish(box, status, b"online", retain=True)
            assert (await next_message(nocc)).payload == b"online"
            relay.sever()  # the link dies without a DISCONNECT: the broker sends the will
            assert (await next_message(nocc)).payload == b"offline"
            box.close_now()

            async with session(b.host, b.port, ctx_of(pki, dev), dev.cn, will=will) as box2:
                await publish(box2, status, b"severed", retain=True)
                assert (await next_message(nocc)).payload == b"severed"
            # The clean DISCONNECT (reason 0) discards the will; a marker proves nothing follows.
            marker = "pbx/pbx-test-1/marker"
            await nocc.subscribe(marker, qos=1)
            async with session(b.host, b.port, ctx_of(pki, dev), dev.cn) as box3:
                await publish(box3, marker, b"")
            assert await received_before_marker(nocc, marker) == []

    run(scenario())


def test_broker_restarts_on_the_same_port(
    broker_factory: Callable[..., Mosquitto], pki: PKI
) -> None:
    """The broker fixture can be stopped and started again on its port, and clients reconnect."""
    b = broker_factory()
    dev = pki.device("pbx-test-2")

    async def one_round_trip() -> None:
        async with session(b.host, b.port, ctx_of(pki, dev), dev.cn) as c:
            assert (await publish(c, "pbx/pbx-test-2/x", b"x")).ok

    run(one_round_trip())
    first_pid = b.pid
    b.stop()
    assert not b.running
    with pytest.raises(UplinkError):
        run(connect_only(b.host, b.port, ctx_of(pki, dev), dev.cn))
    b.start()
    assert b.pid != first_pid
    run(one_round_trip())
    assert b.log_text().count("running") == 2


def test_relay_counts_bytes_and_sees_the_close(
    broker: Mosquitto, relay_factory: Callable[[str, int], Relay], pki: PKI
) -> None:
    """Bytes through the relay are counted each way, and it sees the connection close."""
    relay = relay_factory(broker.host, broker.port)
    dev = pki.device("pbx-test-1")

    async def scenario() -> None:
        async with session(relay.host, relay.port, ctx_of(pki, dev), dev.cn) as c:
            assert relay.connections == 1
            before = relay.bytes_up
            await publish(c, "pbx/pbx-test-1/up/health", b"x" * 10_000)
            assert relay.bytes_up >= before + 10_000

    run(scenario())
    assert relay.wait_closed(timeout=2.0)
    counts = relay.counts()
    assert counts.accepted == 1
    assert counts.down > 0
    assert relay.bytes_up == counts.up  # nothing more once closed
