"""Uplink benchmarks, run by hand; they print figures and the floors, they do not assert.

1. Throughput, outbox → broker, QoS 1, the outbox durable (synchronous=FULL),
   the anchor (agent/anchor.py) kept up to date as the daemon keeps it:
   the real Gate, Outbox and UplinkSession in this process against a real
   mosquitto with mutual TLS; next to it, in the same run, the bare paho
   publisher of bench/bench_bare_paho.py with the same window and payload size
   to the same broker. Floors: 5,000 envelopes/s and 0.6 of bare paho.
2. Drain time of a 100,000-envelope backlog (same rig).
3. Switch latency with the real daemon behind a byte-counting relay:
   `uplink off` sent → reply, and → the relay sees the connection closed;
   p50/p99 over ``--flips`` flips. Floor: p99 under 500 ms.
4. Idle RSS of the real daemon with the uplink connected.

    PYTHONPATH=. python bench/bench_uplink.py [-n 20000] [--backlog 100000]
        [--flips 200] [--size 300] [--window 100] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import structlog

from agent import control
from agent.anchor import Anchor, Mark
from agent.config import AgentConfig, PolicyConfig, loads
from agent.errors import ControlError
from agent.ledger import Ledger
from agent.outbox import Outbox, Stored
from agent.policy.classes import DataClass, Record
from agent.policy.gate import Gate
from agent.store import database_id, open_db
from agent.uplink.session import UplinkSession
from bench.bench_bare_paho import Target, publish_run
from tests.support.daemon import AgentProcess, base_config, wait_for
from tests.support.mosquitto import Mosquitto
from tests.support.payload import incompressible
from tests.support.pki import PKI, temporary_pki
from tests.support.relay import Relay

DEVICE = "pbx-test-1"
FLOOR_RATE = 5000.0
FLOOR_RATIO = 0.6
FLOOR_SWITCH_P99 = 0.5
SETTLE = 0.1  # seconds connected before a flip


class _Host:
    """The daemon's side of NOC commands; the bench sends none."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def collectors_known(self) -> list[str]:
        return []

    def collect_now(self, name: str) -> None:
        pass


def session_config(pki: PKI, broker: Mosquitto, window: int) -> AgentConfig:
    """An AgentConfig with only what the uplink reads."""
    creds = pki.device(DEVICE)
    return loads(
        f"device_id: {DEVICE}\n"
        f"uplink:\n"
        f"  broker: mqtts://localhost:{broker.port}\n"
        f"  ca_file: {pki.ca_file}\n"
        f"  cert_file: {creds.cert}\n"
        f"  key_file: {creds.key}\n"
        f"  max_inflight: {window}\n"
        f"  heartbeat: 1h\n"
    )


class WatchedOutbox(Outbox):
    """The real outbox, telling the bench the moment it becomes empty."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.empty = asyncio.Event()
        self.batches = 0  # delivery commits

    def delivered(self, items: Sequence[Stored], *, durable: bool = True) -> None:
        """The real delivery; then note an empty outbox."""
        super().delivered(items, durable=durable)
        self.batches += 1
        if self.count == 0:
            self.empty.set()


def fill(state: Path, n: int, size: int) -> tuple[WatchedOutbox, Gate, int]:
    """Approve and store ``n`` envelopes of about ``size`` bytes; return outbox, gate, size."""
    conn, _ = open_db(state)
    conn.execute("PRAGMA synchronous=OFF")  # filling is set-up; the drain runs durable below
    outbox = WatchedOutbox(conn, Ledger(conn), max_bytes=8 * 1024**3)
    gate = Gate(
        policy=PolicyConfig(send=frozenset(DataClass)),
        switch_on=lambda: True,
        last_seq=outbox.last_seq,
    )
    pad = max(size - 120, 1)  # the envelope's own fields take about 120 bytes
    payload_size = 0
    for i in range(n):
        env = gate.approve(Record(DataClass.HEALTH, {"i": i, "pad": incompressible(pad, i)}))
        payload_size = len(env.payload)
        outbox.put(env)
    conn.execute("PRAGMA synchronous=FULL")
    return outbox, gate, payload_size


async def drain(config: AgentConfig, outbox: WatchedOutbox, gate: Gate) -> float:
    """Run an UplinkSession until the outbox is empty; seconds from connected to empty."""
    assert config.uplink is not None
    session = UplinkSession(
        uplink=config.uplink,
        device_id=config.device_id,
        outbox=outbox,
        ledger=outbox.ledger,
        switch_on=lambda: True,
        commands=_Host(gate),
    )
    task = asyncio.create_task(session.run())
    try:
        while session.state != "connected":
            if task.done():
                task.result()
            await asyncio.sleep(0.001)
        t0 = time.perf_counter()
        empty = asyncio.ensure_future(outbox.empty.wait())
        await asyncio.wait({empty, task}, return_when=asyncio.FIRST_COMPLETED)
        if not empty.done():
            empty.cancel()
            task.result()  # the session ended before the outbox was empty: say why
            raise RuntimeError("the uplink session ended before the outbox was empty")
        return time.perf_counter() - t0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        outbox.conn.close()


class TimedAnchor(Anchor):
    """The real anchor, counting the time its touches take and the writes they make."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seconds = 0.0
        self.touches = 0
        self.writes = 0

    def touch(self, *, force: bool = False) -> None:
        """The real touch, timed."""
        t0 = time.perf_counter()
        before = self._written_at
        super().touch(force=force)
        self.seconds += time.perf_counter() - t0
        self.touches += 1
        self.writes += self._written_at != before


ANCHOR_COST: list[TimedAnchor] = []  # the last throughput run's anchor, for the report


def outbox_rate(
    pki: PKI,
    broker: Mosquitto,
    n: int,
    size: int,
    window: int,
    profile: Path | None,
    *,
    anchor: bool = True,
) -> tuple[float, float, int]:
    """Envelopes/s and seconds for draining ``n`` durable envelopes; the payload size."""
    root = Path(tempfile.mkdtemp(prefix="pbx-bench-uplink-"))
    try:
        outbox, gate, payload_size = fill(root / "state", n, size)
        # What the daemon does on this path: the anchor follows the ledger head.
        db_id = database_id(outbox.conn)

        def mark() -> Mark:
            n_, digest = outbox.ledger.head
            return Mark(db_id, outbox.last_seq, n_, digest, outbox.count)

        if anchor:
            timed = TimedAnchor(root / "state", mark)
            outbox.anchor = timed
            ANCHOR_COST[:] = [timed]
        config = session_config(pki, broker, window)
        prof = cProfile.Profile() if profile else None
        if prof:
            prof.enable()
        seconds = asyncio.run(drain(config, outbox, gate))
        if prof and profile:
            prof.disable()
            prof.dump_stats(profile)
        return n / seconds, seconds, payload_size
    finally:
        shutil.rmtree(root, ignore_errors=True)


def daemon_config(root: Path, pki: PKI, port: int, health: str) -> dict[str, Any]:
    """A daemon configuration with an uplink to localhost:``port``."""
    creds = pki.device(DEVICE)
    cfg = base_config(root)
    cfg["collectors"]["health"] = {"interval": health}
    cfg["uplink"] = {
        "broker": f"mqtts://localhost:{port}",
        "ca_file": str(pki.ca_file),
        "cert_file": str(creds.cert),
        "key_file": str(creds.key),
        "heartbeat": "30s",
        "reconnect_max": "2s",
    }
    return cfg


def _connected(sock: Path, settled: float = 0.0) -> bool:
    """Connected, and for at least ``settled`` seconds."""
    up = control.request(sock, "uplink-status")["uplink"]
    if up["state"] != "connected" or up["connected_since"] is None:
        return False
    return bool(time.time() - up["connected_since"] >= settled)


def idle_rss_connected(pki: PKI, broker: Mosquitto, settle: float) -> float:
    """RSS (MiB) of the real daemon, uplink connected, after ``settle`` idle seconds."""
    root = Path(tempfile.mkdtemp(prefix="pbx-bench-rss-"))
    agent = AgentProcess(root, daemon_config(root, pki, broker.port, "60s"))
    try:
        agent.start()
        wait_for(lambda: _connected(agent.socket_path), timeout=15, what="connected")
        time.sleep(settle)  # the figure wanted is the settled one, not a condition to wait on
        assert agent.proc is not None
        return psutil.Process(agent.proc.pid).memory_info().rss / 2**20
    finally:
        agent.close()
        shutil.rmtree(root, ignore_errors=True)


def switch_latency(pki: PKI, broker: Mosquitto, flips: int) -> tuple[list[float], list[float]]:
    """Per flip: seconds from sending `uplink off` to its reply, and to the relay seeing close."""
    root = Path(tempfile.mkdtemp(prefix="pbx-bench-switch-"))
    replies: list[float] = []
    closed: list[float] = []
    with Relay(broker.host, broker.port) as relay:
        agent = AgentProcess(root, daemon_config(root, pki, relay.port, "1s"))
        try:
            agent.start()
            sock = agent.socket_path
            for i in range(flips):
                # Settled for 100 ms: an `off` in the first milliseconds after connecting can
                # hang forever (see _report_hang and the report); that is a finding, not a
                # latency, so the latency runs keep clear of it.
                wait_for(
                    lambda: _connected(sock, SETTLE), timeout=15, interval=0.005, what=f"flip {i}"
                )
                if not relay.wait_connections(1, 5):
                    raise RuntimeError(f"flip {i}: the relay sees no connection")
                t0 = time.perf_counter()
                try:
                    control.request(sock, "uplink", state="off")
                except ControlError:
                    _report_hang(agent, i, time.perf_counter() - t0)
                    raise
                t1 = time.perf_counter()
                if not relay.wait_closed(5):
                    raise RuntimeError(f"flip {i}: connection still open 5 s after off")
                t2 = time.perf_counter()
                replies.append(t1 - t0)
                closed.append(t2 - t0)
                control.request(sock, "uplink", state="on")
        finally:
            agent.close()
            shutil.rmtree(root, ignore_errors=True)
    return replies, closed


def _report_hang(agent: AgentProcess, flip: int, waited: float) -> None:
    """Print what the daemon was doing when `uplink off` got no answer (a finding, not noise)."""
    print(f"flip {flip}: no reply to `uplink off` within {waited:.1f} s", file=sys.stderr)
    if agent.proc is not None and agent.proc.poll() is None:
        agent.proc.send_signal(signal.SIGUSR1)  # faulthandler: every thread's stack
        time.sleep(0.5)  # give it a moment to write the dump; a diagnostic, not a wait
    print("daemon log (last 60 lines):", file=sys.stderr)
    print("\n".join(agent.log().splitlines()[-60:]), file=sys.stderr)


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def main() -> int:
    """Run every measurement once and print a table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=20_000, help="envelopes for the throughput run")
    p.add_argument("--backlog", type=int, default=100_000, help="backlog to drain")
    p.add_argument("--flips", type=int, default=200, help="switch flips")
    p.add_argument("--size", type=int, default=300, help="approximate envelope bytes")
    p.add_argument("--window", type=int, default=100, help="publishes in flight")
    p.add_argument("--profile", type=Path, help="write a cProfile of the throughput run here")
    p.add_argument("--skip", nargs="*", default=[], choices=("drain", "switch", "rss"))
    a = p.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    rows: list[tuple[str, str, str]] = []

    def row(name: str, value: str, floor: str = "") -> None:
        rows.append((name, value, floor))
        print(f"  {name}: {value} {floor}", flush=True)

    with temporary_pki() as pki, Mosquitto(pki) as broker:
        rate, secs, payload = outbox_rate(pki, broker, a.n, a.size, a.window, a.profile)
        creds = pki.device(DEVICE)
        target = Target(
            "localhost", broker.port, pki.ca_file, creds.cert, creds.key, f"pbx/{DEVICE}/up/bench"
        )
        bare = publish_run(target, n=a.n, size=payload, window=a.window)
        ratio = rate / bare.rate
        row(
            f"outbox→broker QoS1, durable, window {a.window}, {payload} B",
            f"{rate:,.0f} env/s ({a.n} in {secs:.2f} s)",
            _floor(rate >= FLOOR_RATE, f">= {FLOOR_RATE:,.0f}/s"),
        )
        row(
            "bare paho, same window and size, same broker",
            f"{bare.rate:,.0f} msg/s ({bare.n} in {bare.seconds:.2f} s)",
        )
        row("agent / bare paho", f"{ratio:.2f}", _floor(ratio >= FLOOR_RATIO, f">= {FLOOR_RATIO}"))
        cost = ANCHOR_COST[0]
        row(
            "anchor on the delivery path (in the run above)",
            f"{cost.writes} writes, {cost.touches} touches, {cost.seconds * 1000:.0f} ms "
            f"({cost.seconds / secs * 100:.1f}% of {secs:.2f} s)",
        )
        if "drain" not in a.skip:
            rate_b, secs_b, _ = outbox_rate(pki, broker, a.backlog, a.size, a.window, None)
            row(f"drain of a {a.backlog:,}-envelope backlog", f"{secs_b:.1f} s ({rate_b:,.0f}/s)")
        if "rss" not in a.skip:
            row(
                "daemon idle RSS, uplink connected", f"{idle_rss_connected(pki, broker, 5):.1f} MiB"
            )
        if "switch" not in a.skip:
            replies, closed = switch_latency(pki, broker, a.flips)
            row(
                f"switch: off → reply (p50/p99/max, {a.flips} flips)",
                _ms(replies),
                _floor(pct(replies, 99) < FLOOR_SWITCH_P99, "p99 < 500 ms"),
            )
            row(
                "switch: off → relay sees close (p50/p99/max)",
                _ms(closed),
                _floor(pct(closed, 99) < FLOOR_SWITCH_P99, "p99 < 500 ms"),
            )

    width = max(len(r[0]) for r in rows)
    print()
    for name, value, floor in rows:
        print(f"{name:<{width}}  {value:<34} {floor}")
    return 0


def _ms(values: list[float]) -> str:
    return (
        f"{pct(values, 50) * 1000:.1f} / {pct(values, 99) * 1000:.1f} / "
        f"{max(values) * 1000:.1f} ms (mean {statistics.fmean(values) * 1000:.1f})"
    )


def _floor(ok: bool, text: str) -> str:
    return f"[{'ok' if ok else 'MISSED'}: {text}]"


if __name__ == "__main__":
    sys.exit(main())
