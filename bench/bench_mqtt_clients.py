"""Which MQTT client the uplink's boundary should drive: the measurements behind the choice.

Three publishers, same broker, same TLS, same payload and window (QoS 1,
MQTT 5), in interleaved rounds of one run:

- ``paho-callback``: bare paho on its own network thread, the window refilled
  from ``on_publish`` (the fairest baseline: no asyncio, no hand-off);
- ``aiomqtt``: aiomqtt 2.x connected as the uplink connected until this
  change, publishing through the paho client inside it and reading PUBACK
  reason codes from a wrapped ``on_publish`` (private attributes: the reason
  the boundary was rewritten);
- ``link``: :class:`agent.uplink.mqtt.MqttLink`, paho driven from the asyncio
  loop with public API only, acknowledgements taken in batches.

Then the idle cost of each asyncio client over ``--idle`` seconds, connected
with a 60 s keepalive and nothing to send: CPU seconds and context switches
of the process (the loop's wake-ups are most of them).

    PYTHONPATH=. python bench/bench_mqtt_clients.py [-n 50000] [--rounds 3] [--idle 60]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.uplink.mqtt import LinkSettings, MqttLink
from agent.uplink.tls import client_context
from tests.support.mosquitto import Mosquitto
from tests.support.pki import PKI, temporary_pki

TOPIC = "pbx/pbx-test-1/up/bench"


def payload_of(size: int) -> bytes:
    """A payload that does not compress: what envelopes look like to TLS."""
    return os.urandom(size // 2).hex().encode()[:size].ljust(size, b"x")


def paho_callback(pki: PKI, broker: Mosquitto, n: int, size: int, window: int) -> float:
    """Bare paho, threaded loop, window refilled from on_publish; seconds for n PUBACKs."""
    dev = pki.device("pbx-test-1")
    payload = payload_of(size)
    done = threading.Event()
    connected = threading.Event()
    state = {"sent": 0, "acked": 0}
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-cb-{uuid.uuid4().hex[:6]}",
        protocol=paho.MQTTv5,
    )

    def send_more(c: paho.Client) -> None:
        while state["sent"] < n and state["sent"] - state["acked"] < window:
            c.publish(TOPIC, payload, qos=1)
            state["sent"] += 1

    def on_connect(c: paho.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
        connected.set()

    def on_publish(c: paho.Client, u: Any, mid: int, rc: Any, p: Any) -> None:
        state["acked"] += 1
        if state["acked"] == n:
            done.set()
        else:
            send_more(c)

    client.tls_set_context(client_context(pki.ca_file, dev.cert, dev.key))
    client.max_inflight_messages_set(window)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect("localhost", broker.port, keepalive=60)
    sock = client.socket()
    import socket

    assert isinstance(sock, socket.socket)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise SystemExit("no CONNACK")
        t0 = time.perf_counter()
        # The first window from here; the rest from on_publish, on paho's thread.
        client.publish(TOPIC, payload, qos=1)
        state["sent"] = 1
        if not done.wait(120):
            raise SystemExit(f"only {state['acked']} of {n} PUBACKs")
        return time.perf_counter() - t0
    finally:
        client.disconnect()
        client.loop_stop()


async def _aiomqtt(pki: PKI, broker: Mosquitto, n: int, size: int, window: int) -> float:
    dev = pki.device("pbx-test-1")
    payload = payload_of(size)
    client = aiomqtt.Client(
        "localhost",
        broker.port,
        identifier=f"bench-aio-{uuid.uuid4().hex[:6]}",
        tls_context=client_context(pki.ca_file, dev.cert, dev.key),
        protocol=aiomqtt.ProtocolVersion.V5,
        max_inflight_messages=window,
        socket_options=[(6, 1, 1)],  # IPPROTO_TCP, TCP_NODELAY
    )
    client.pending_calls_threshold = 1_000_000
    async with client:
        raw = client._client  # the private attribute the old uplink relied on
        wake = asyncio.Event()
        acks: list[int] = []
        inner: Any = raw.on_publish

        def on_publish(c: Any, u: Any, mid: int, rc: Any, p: Any) -> None:
            acks.append(int(rc.value))
            wake.set()
            if inner is not None:
                inner(c, u, mid, rc, p)

        raw.on_publish = on_publish
        sent = acked = 0
        t0 = time.perf_counter()
        while acked < n:
            while sent < n and sent - acked < window:
                raw.publish(TOPIC, payload, qos=1)
                sent += 1
            await wake.wait()
            wake.clear()
            acked += len(acks)
            acks.clear()
        return time.perf_counter() - t0


async def _link(pki: PKI, broker: Mosquitto, n: int, size: int, window: int) -> float:
    dev = pki.device("pbx-test-1")
    payload = payload_of(size)
    link = MqttLink(
        LinkSettings(
            host="localhost",
            port=broker.port,
            client_id=f"bench-link-{uuid.uuid4().hex[:6]}",
            max_inflight=window,
        ),
        client_context(pki.ca_file, dev.cert, dev.key),
    )
    await link.connect()
    wake = asyncio.Event()
    link.on_ack(wake.set)
    sent = acked = 0
    t0 = time.perf_counter()
    while acked < n:
        while sent < n and sent - acked < window:
            link.publish(TOPIC, payload)
            sent += 1
        await wake.wait()
        wake.clear()
        acked += len(link.take_acks())
    seconds = time.perf_counter() - t0
    await link.disconnect()
    return seconds


def run_async(fn: Callable[..., Coroutine[Any, Any, float]], *args: Any) -> float:
    """Run one async publisher in a fresh loop."""
    return asyncio.run(fn(*args))


def _ctx_switches() -> int:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return int(ru.ru_nvcsw + ru.ru_nivcsw)


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return float(ru.ru_utime + ru.ru_stime)


async def _idle_aiomqtt(pki: PKI, broker: Mosquitto, seconds: float) -> tuple[float, int]:
    dev = pki.device("pbx-test-1")
    async with aiomqtt.Client(
        "localhost",
        broker.port,
        identifier=f"bench-idle-{uuid.uuid4().hex[:6]}",
        tls_context=client_context(pki.ca_file, dev.cert, dev.key),
        protocol=aiomqtt.ProtocolVersion.V5,
        keepalive=60,
    ):
        c0, s0 = _cpu(), _ctx_switches()
        await asyncio.sleep(seconds)
        return _cpu() - c0, _ctx_switches() - s0


async def _idle_link(pki: PKI, broker: Mosquitto, seconds: float) -> tuple[float, int]:
    dev = pki.device("pbx-test-1")
    link = MqttLink(
        LinkSettings(
            host="localhost",
            port=broker.port,
            client_id=f"bench-idle-{uuid.uuid4().hex[:6]}",
            keepalive=60,
        ),
        client_context(pki.ca_file, dev.cert, dev.key),
    )
    await link.connect()
    c0, s0 = _cpu(), _ctx_switches()
    await asyncio.sleep(seconds)
    cpu, switches = _cpu() - c0, _ctx_switches() - s0
    await link.disconnect()
    return cpu, switches


async def _idle_none(seconds: float) -> tuple[float, int]:
    c0, s0 = _cpu(), _ctx_switches()
    await asyncio.sleep(seconds)
    return _cpu() - c0, _ctx_switches() - s0


def main() -> int:
    """Interleaved rounds of the three publishers, then the idle cost of the two asyncio ones."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=50_000)
    p.add_argument("--size", type=int, default=310)
    p.add_argument("--window", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--idle", type=float, default=60.0, help="seconds of idle measurement")
    a = p.parse_args()
    rates: dict[str, list[float]] = {"paho-callback": [], "aiomqtt": [], "link": []}
    with temporary_pki() as pki, Mosquitto(pki) as broker:
        for r in range(a.rounds):
            for name in rates:
                if name == "paho-callback":
                    secs = paho_callback(pki, broker, a.n, a.size, a.window)
                elif name == "aiomqtt":
                    secs = run_async(_aiomqtt, pki, broker, a.n, a.size, a.window)
                else:
                    secs = run_async(_link, pki, broker, a.n, a.size, a.window)
                rates[name].append(a.n / secs)
                print(f"round {r + 1} {name:<14} {a.n / secs:>10,.0f} msg/s", flush=True)
        base = statistics.median(rates["paho-callback"])
        print(f"\nQoS 1, {a.size} B, window {a.window}, {a.n} messages, median of {a.rounds}:")
        for name, values in rates.items():
            med = statistics.median(values)
            print(f"  {name:<14} {med:>10,.0f} msg/s   ratio to paho-callback {med / base:.2f}")
        if a.idle > 0:
            print(f"\nidle, connected, keepalive 60 s, {a.idle:g} s each:")
            idlers: list[tuple[str, Coroutine[Any, Any, tuple[float, int]]]] = [
                ("no client", _idle_none(a.idle)),
                ("aiomqtt", _idle_aiomqtt(pki, broker, a.idle)),
                ("link", _idle_link(pki, broker, a.idle)),
            ]
            for name, coro in idlers:
                cpu, switches = asyncio.run(coro)
                per_min = 60.0 / a.idle
                print(
                    f"  {name:<10} CPU {cpu * per_min * 1000:7.1f} ms/min, "
                    f"context switches {switches * per_min:7.1f} /min"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
