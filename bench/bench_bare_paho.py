"""Bare paho-mqtt QoS 1 publisher: the yardstick for the agent's outbox → broker throughput.

Publishes N messages of a given size with QoS 1 over mutual TLS, keeping up to
``--window`` publishes in flight (a semaphore released on each PUBACK, and
paho's max_inflight_messages set to the same), and prints messages/s from
the first publish to the last PUBACK. No outbox, no ledger, no JSON: this is
what the agent is compared against.
PUBACKs with a failure reason code (e.g. 135, not authorized) are counted.

    # against a throwaway mosquitto started here (tests/support):
    PYTHONPATH=. python bench/bench_bare_paho.py --start-broker [-n 100000] [--size 300]
    # against a running broker:
    PYTHONPATH=. python bench/bench_bare_paho.py --host localhost --port 8883 \\
        --ca ca.crt --cert dev.crt --key dev.key --topic pbx/pbx-0001/up/bench
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.uplink.tls import client_context


@dataclass(frozen=True)
class Target:
    """Where to publish and as whom."""

    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    topic: str


@dataclass(frozen=True)
class Result:
    """One run's figures."""

    n: int
    size: int
    window: int
    nodelay: bool
    seconds: float
    failed: int

    @property
    def rate(self) -> float:
        """Acknowledged messages per second."""
        return self.n / self.seconds

    def line(self) -> str:
        """The figures, one line."""
        mib = self.n * self.size / self.seconds / (1 << 20)
        return (
            f"bare paho QoS1: {self.n} x {self.size} B, window {self.window}, "
            f"TCP_NODELAY {'on' if self.nodelay else 'off'}: "
            f"{self.seconds:.3f} s, {self.rate:,.0f} msg/s, {mib:.1f} MiB/s, "
            f"{self.failed} failed PUBACKs"
        )


def publish_run(target: Target, *, n: int, size: int, window: int, nodelay: bool = True) -> Result:
    """Connect (MQTT 5, mTLS), publish ``n`` messages, wait for every PUBACK, disconnect."""
    done = threading.Event()
    connected = threading.Event()
    lock = threading.Lock()
    acked = 0
    failed = 0
    # The window is kept here, not only by paho: paho's message ids are 16 bits,
    # so queueing all N at once collides after 65,535 (MQTT_ERR_QUEUE_SIZE).
    slots = threading.BoundedSemaphore(window)

    def on_connect(c: Any, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        if rc.is_failure:
            raise SystemExit(f"broker refused the connection: {rc}")
        connected.set()

    def on_publish(c: Any, u: Any, mid: int, rc: ReasonCode, props: Any) -> None:
        nonlocal acked, failed
        with lock:
            acked += 1
            if rc.is_failure:
                failed += 1
            if acked == n:
                done.set()
        slots.release()

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-paho-{os.getpid()}",
        protocol=mqtt.MQTTv5,
    )
    client.tls_set_context(client_context(target.ca, target.cert, target.key))
    client.max_inflight_messages_set(window)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect(target.host, target.port, keepalive=60)
    sock = client.socket()
    if nodelay and isinstance(sock, socket.socket):
        # paho leaves Nagle on: each small PUBLISH would wait for the previous ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise SystemExit(f"no CONNACK from {target.host}:{target.port} within 10 s")
        payload = os.urandom(size // 2).hex().encode()[:size].ljust(size, b"x")
        start = time.perf_counter()
        for _ in range(n):
            slots.acquire()
            info = client.publish(target.topic, payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise SystemExit(f"publish failed: {mqtt.error_string(info.rc)}")
        if not done.wait(max(60.0, n / 500)):
            raise SystemExit(f"only {acked} of {n} PUBACKs arrived")
        seconds = time.perf_counter() - start
    finally:
        client.disconnect()
        client.loop_stop()
    return Result(n=n, size=size, window=window, nodelay=nodelay, seconds=seconds, failed=failed)


@contextlib.contextmanager
def started_broker() -> Iterator[Target]:
    """A throwaway PKI and mosquitto (as the tests start it), publishing as pbx-test-1."""
    from tests.support.mosquitto import Mosquitto
    from tests.support.pki import temporary_pki

    with temporary_pki() as pki, Mosquitto(pki) as broker:
        dev = pki.device("pbx-test-1")
        yield Target(
            "localhost", broker.port, pki.ca_file, dev.cert, dev.key, "pbx/pbx-test-1/up/bench"
        )


def main() -> int:
    """Parse options, run, print figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=100_000, help="messages per run (default 100000)")
    p.add_argument("--size", type=int, default=300, help="payload bytes (default 300)")
    p.add_argument("--window", type=int, default=100, help="publishes in flight (default 100)")
    p.add_argument("--runs", type=int, default=3, help="runs; the best is reported too")
    p.add_argument("--no-nodelay", action="store_true", help="leave Nagle on (paho's default)")
    p.add_argument("--start-broker", action="store_true", help="start a throwaway mosquitto")
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=8883)
    p.add_argument("--ca", type=Path)
    p.add_argument("--cert", type=Path)
    p.add_argument("--key", type=Path)
    p.add_argument("--topic", default="pbx/pbx-test-1/up/bench")
    a = p.parse_args()

    with contextlib.ExitStack() as stack:
        if a.start_broker:
            target = stack.enter_context(started_broker())
        elif a.ca and a.cert and a.key:
            target = Target(a.host, a.port, a.ca, a.cert, a.key, a.topic)
        else:
            p.error("give --start-broker, or --ca, --cert and --key for a running broker")
        results = []
        for _ in range(a.runs):
            r = publish_run(target, n=a.n, size=a.size, window=a.window, nodelay=not a.no_nodelay)
            print(r.line(), flush=True)
            results.append(r)
        best = max(results, key=lambda r: r.rate)
        print(f"best of {a.runs}: {best.rate:,.0f} msg/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
