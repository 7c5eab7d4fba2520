"""Durable drain against the fairest bare paho publisher, in interleaved rounds.

The agent: the real Gate-approved envelopes in a real Outbox (SQLite,
``synchronous=FULL``), the real Ledger and anchor, drained by the real
:class:`~agent.uplink.session.UplinkSession` over mTLS to a real mosquitto.

The baseline: bare paho on its own network thread, the sliding window refilled
from ``on_publish`` (no semaphore handed between threads, no asyncio, no
storage): the most a Python MQTT client does on this machine with the same
broker, TLS, payload size, QoS 1 and window. Each round runs both, one after
the other; the figure is the median over rounds of each and their ratio.
Floor (issue 17): the agent at least 0.9 of the baseline.

    PYTHONPATH=. python bench/bench_drain.py [-n 50000] [--rounds 3] [--size 310]
        [--window 100] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from agent.anchor import Anchor, Mark
from agent.config import PolicyConfig
from agent.ledger import Ledger, verify
from agent.policy.classes import DataClass, Record
from agent.policy.gate import Gate
from agent.store import database_id, db_path, open_db
from agent.uplink.tls import client_context
from bench.bench_uplink import DEVICE, WatchedOutbox, drain, session_config
from tests.support.mosquitto import Mosquitto
from tests.support.pki import PKI, temporary_pki

FLOOR_RATIO = 0.9
TOPIC = f"pbx/{DEVICE}/up/bench"


def paho_callback(
    pki: PKI, broker: Mosquitto, n: int, payload: bytes, window: int, *, paho_window: bool = True
) -> float:
    """Seconds for ``n`` QoS 1 PUBACKs, the window refilled from ``on_publish``.

    ``paho_window``: paho's own in-flight limit set to the window too, as a paho
    publisher is usually written; without it (as the agent's link runs paho), paho
    skips walking its messages in flight at every PUBACK.
    """
    dev = pki.device(DEVICE)
    done = threading.Event()
    connected = threading.Event()
    sent = acked = 0
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-cb-{uuid.uuid4().hex[:6]}",
        protocol=paho.MQTTv5,
    )

    def send_more(c: paho.Client) -> None:
        nonlocal sent
        while sent < n and sent - acked < window:
            c.publish(TOPIC, payload, qos=1)
            sent += 1

    def on_connect(c: paho.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
        connected.set()

    def on_publish(c: paho.Client, u: Any, mid: int, rc: Any, p: Any) -> None:
        nonlocal acked
        acked += 1
        if acked == n:
            done.set()
        else:
            send_more(c)

    client.tls_set_context(client_context(pki.ca_file, dev.cert, dev.key))
    client.max_inflight_messages_set(window if paho_window else 0)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect("localhost", broker.port, keepalive=60)
    sock = client.socket()
    assert isinstance(sock, socket.socket)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the agent's link does
    client.loop_start()
    try:
        if not connected.wait(10):
            raise SystemExit("no CONNACK")
        t0 = time.perf_counter()
        # One publish from here starts it; on_publish keeps the window full on paho's thread.
        client.publish(TOPIC, payload, qos=1)
        sent = 1
        if not done.wait(300):
            raise SystemExit(f"only {acked} of {n} PUBACKs")
        return time.perf_counter() - t0
    finally:
        client.disconnect()
        client.loop_stop()


def make_template(root: Path, n: int, size: int) -> int:
    """A state directory with ``n`` approved envelopes of ``size`` bytes; their size."""
    conn, _ = open_db(root)
    conn.execute("PRAGMA synchronous=OFF")  # set-up only; each round opens it FULL
    outbox = WatchedOutbox(conn, Ledger(conn), max_bytes=8 * 1024**3)
    gate = Gate(policy=PolicyConfig(send=frozenset(DataClass)), switch_on=lambda: True, last_seq=0)
    # Sized on a typical envelope (seq and counter of n // 2 digits), by a throwaway gate.
    probe = Gate(
        policy=PolicyConfig(send=frozenset(DataClass)), switch_on=lambda: True, last_seq=n // 2
    ).approve(Record(DataClass.HEALTH, {"i": n // 2, "pad": ""}))
    pad = max(size - len(probe.payload), 1)
    sizes = []
    for i in range(n):
        env = gate.approve(Record(DataClass.HEALTH, {"i": i, "pad": "h" * pad}))
        sizes.append(len(env.payload))
        outbox.put(env)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return int(statistics.median(sizes))


def agent_round(
    template: Path, pki: PKI, broker: Mosquitto, window: int, prof: Any
) -> tuple[float, float]:
    """Seconds for the agent to drain a copy of the template, durably, and the CPU seconds
    of the session (connect included, as for paho; not the copy and checks around it)."""
    root = Path(tempfile.mkdtemp(prefix="pbx-bench-drain-"))
    try:
        state = root / "state"
        state.mkdir()
        shutil.copyfile(db_path(template), db_path(state))
        conn, _ = open_db(state)
        outbox = WatchedOutbox(conn, Ledger(conn), max_bytes=8 * 1024**3)
        n_env = outbox.count
        db_id = database_id(conn)

        def mark() -> Mark:
            n_, digest = outbox.ledger.head
            return Mark(db_id, outbox.last_seq, n_, digest, outbox.count)

        outbox.anchor = Anchor(state, mark)
        gate = Gate(
            policy=PolicyConfig(send=frozenset(DataClass)), switch_on=lambda: True, last_seq=0
        )
        config = session_config(pki, broker, window)
        if prof is not None:
            prof.enable()
        c0 = time.process_time()
        try:
            seconds = asyncio.run(drain(config, outbox, gate))
            cpu = time.process_time() - c0
        finally:
            if prof is not None:
                prof.disable()
        check, _ = open_db(state)
        try:
            verdict = verify(check)
            left = check.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        finally:
            check.close()
        if not verdict.ok or left:
            raise SystemExit(f"drain left {left} envelopes; ledger: {verdict}")
        print(f"  {outbox.batches} delivery commits, {n_env / outbox.batches:.0f} a commit")
        return seconds, cpu
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    """Interleaved rounds; medians and their ratio."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=50_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=310, help="envelope bytes")
    p.add_argument("--window", type=int, default=100)
    p.add_argument("--profile", type=Path, help="cProfile of the agent's rounds, to this file")
    a = p.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    prof = cProfile.Profile() if a.profile else None
    rates: dict[str, list[float]] = {"agent": [], "paho": [], "paho-nowin": []}
    # CPU seconds of this process per message, connect included: on a machine shared with
    # other work the wall-clock rate swings with the load, the CPU each client spends less.
    cpu: dict[str, list[float]] = {who: [] for who in rates}
    with tempfile.TemporaryDirectory(prefix="pbx-bench-tpl-") as tpl:
        template = Path(tpl)
        size = make_template(template, a.n, a.size)
        payload = os.urandom(size // 2).hex().encode()[:size].ljust(size, b"x")
        with temporary_pki() as pki, Mosquitto(pki) as broker:
            for r in range(a.rounds):
                # Alternate which goes first, so neither always meets a warmer machine.
                order = list(rates) if r % 2 == 0 else list(reversed(rates))
                for who in order:
                    c0 = time.process_time()
                    if who == "agent":
                        secs, used = agent_round(template, pki, broker, a.window, prof)
                    else:
                        secs = paho_callback(
                            pki, broker, a.n, payload, a.window, paho_window=who == "paho"
                        )
                        used = time.process_time() - c0
                    rates[who].append(a.n / secs)
                    cpu[who].append(used / a.n)
                    print(
                        f"round {r + 1} {who:<10} {a.n / secs:>10,.0f} msg/s, "
                        f"CPU {cpu[who][-1] * 1e6:.1f} µs/msg",
                        flush=True,
                    )
    if prof is not None and a.profile:
        prof.dump_stats(a.profile)
    ma, mb = statistics.median(rates["agent"]), statistics.median(rates["paho"])
    mc = statistics.median(rates["paho-nowin"])
    ratio = ma / mb
    ok = "ok" if ratio >= FLOOR_RATIO else "MISSED"
    print(
        f"\ndurable drain, {a.n:,} envelopes of {size} B, QoS 1, window {a.window}, "
        f"median of {a.rounds} interleaved rounds:\n"
        f"  agent (outbox, ledger, anchor, synchronous=FULL)  {ma:>9,.0f} env/s\n"
        f"  paho, window refilled from on_publish            {mb:>9,.0f} msg/s\n"
        f"  ratio {ratio:.2f} [{ok}: >= {FLOOR_RATIO}]\n"
        f"  the same paho, its own in-flight limit off       {mc:>9,.0f} msg/s "
        f"(agent / it: {ma / mc:.2f})\n"
        f"  CPU per message, medians: agent {_us(cpu['agent'])}, paho {_us(cpu['paho'])}, "
        f"paho without its limit {_us(cpu['paho-nowin'])}; paho / agent "
        f"{statistics.median(cpu['paho']) / statistics.median(cpu['agent']):.2f}"
    )
    return 0


def _us(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e6:.1f} µs"


if __name__ == "__main__":
    sys.exit(main())
