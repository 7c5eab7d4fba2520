"""The fleet simulation: N boxes, one mosquitto, ingest workers and the dashboard, all here.

Each simulated box is the agent's real data path (gate, SQLite outbox, uplink
session with its own certificate and device id; tests/support/agents.py), all
in one event loop; the broker runs the shipped configuration
(etc/mosquitto-example.conf); PostgreSQL 15 runs with fsync on; ``noc ingest``
workers and ``noc web`` are real processes. Everything listens on 127.0.0.1.

Figures (printed, and written to bench/out/fleet.json):

1. N boxes connected: how long from start until every session is connected.
2. Ingest rate with 1 and with 2 workers: the workers are stopped (their
   sessions persist), every box sends a burst that queues in the broker, the
   workers start, and the rate is stored envelopes per second until the last
   is in PostgreSQL. Baseline in the same run: the broker's own client
   (mosquitto_sub, C, acknowledges only, no database) draining the same kind
   of backlog from the same kind of session.
3. A box that dies is shown offline: (a) its process dies (the socket closes:
   the broker publishes its will at once); (b) its network vanishes (a
   blackholing proxy: no FIN, no packets), which the broker notices after 1.5
   keep-alive intervals. Measured as the dashboard's fleet rows show it.
4. Broker restart: mosquitto is stopped for a few seconds and started again;
   every box's reconnection time is recorded, and printed as a histogram.
5. The fleet page with N rows: server time (the Server-Timing header) over
   20 requests; baseline in the same run: /healthz (one query, no template).

    PYTHONPATH=. .venv/bin/python bench/fleet.py [-n 500] [--burst 40] [--keepalive 10]
        [--health 5] [--outage 5]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg

from noc import accounts, db
from tests.support.agents import SimAgent, SimFleet
from tests.support.nocbroker import NocBroker
from tests.support.nocservice import NocProcess, noc_settings, start_web
from tests.support.pki import PKI, temporary_pki
from tests.support.postgres import Postgres

OUT = Path(__file__).resolve().parent / "out"
STAFF, PASSWORD = "bench-staff", "bench password 1"


def raise_fd_limit() -> int:
    """Descriptors: each box holds a socket, paho's wake-up pair and three SQLite files."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


class Blackhole:
    """A TCP proxy on 127.0.0.1 that can stop forwarding without closing anything.

    Frozen, it reads and drops both ways: to both ends the peer has gone silent,
    as when a box's network vanishes (no FIN, no RST).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = False
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.frozen:
            await reader.read()  # a new connection goes nowhere either
            return
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if not self.frozen:
                    dst.write(data)
                    await dst.drain()

        await asyncio.gather(pump(reader, up_w), pump(up_r, writer), return_exceptions=True)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


def count(dsn: str, sql: str = "SELECT count(*) FROM envelopes") -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(sql).fetchone()
        return int(row[0]) if row else 0


def login(url: str) -> str:
    """A staff session cookie, made through the login form."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a: Any, **k: Any) -> None:
            return None

    data = urllib.parse.urlencode({"username": STAFF, "password": PASSWORD}).encode()
    try:
        urllib.request.build_opener(NoRedirect).open(url + "/login", data, timeout=10)
    except urllib.error.HTTPError as exc:
        return str(exc.headers["set-cookie"]).split(";", 1)[0]
    raise SystemExit("login did not redirect")


def get(url: str, cookie: str) -> tuple[str, float]:
    """Body and server time (ms) of one page."""
    req = urllib.request.Request(url, headers={"Cookie": cookie})
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = resp.read().decode()
        timing = resp.headers.get("Server-Timing", "app;dur=nan")
    return body, float(timing.split("dur=")[1])


def bare_rate(pki: PKI, broker: NocBroker, fleet: SimFleet, per_box: int) -> float:
    """Envelopes/s the broker's own client (mosquitto_sub: C, no database, acknowledges only)
    takes from a backlog queued for its persistent shared-subscription session."""
    creds = pki.device("noc")
    sub = shutil.which("mosquitto_sub")
    if sub is None:
        print("   (no mosquitto_sub: Debian's mosquitto-clients gives the bare baseline)")
        return float("nan")
    common = [
        sub, "-V", "5", "-h", "localhost", "-p", str(broker.port), "--cafile", str(pki.ca_file),
        "--cert", str(creds.cert), "--key", str(creds.key), "-i", "bench-bare", "-q", "1",
        "-t", "$share/bare/pbx/+/up/#",
    ]  # fmt: skip
    subprocess.run([*common, "-c", "-x", "3600", "-E"], check=True, timeout=30)
    total = per_box * len(fleet.agents)

    async def burst() -> None:
        for a in fleet.agents:
            for _ in range(per_box):
                a.put_health()
            await asyncio.sleep(0)  # a box's burst at a time: the others keep their keepalive
        await fleet.wait(fleet.drained, 300, "the burst queued in the broker", interval=0.2)

    on_loop(burst())
    t0 = time.monotonic()
    subprocess.run(
        [*common, "-c", "-x", "3600", "-C", str(total)],
        check=True, timeout=600, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    seconds = time.monotonic() - t0
    # A clean start ends the session: nothing more is queued for it.
    subprocess.run([*common, "-E"], check=True, timeout=30, stdout=subprocess.DEVNULL)
    return total / seconds


LOOP: asyncio.AbstractEventLoop


def run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


def on_loop(coro: Any, timeout: float = 600) -> Any:
    return asyncio.run_coroutine_threadsafe(coro, LOOP).result(timeout)


def main(argv: list[str] | None = None) -> int:
    global LOOP
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=500, help="simulated boxes")
    p.add_argument("--burst", type=int, default=40, help="envelopes per box in each ingest burst")
    p.add_argument("--keepalive", type=int, default=10, help="the boxes' MQTT keepalive (s)")
    p.add_argument("--health", type=float, default=5.0, help="seconds between health records")
    p.add_argument("--outage", type=float, default=5.0, help="seconds the broker stays down")
    args = p.parse_args(argv)
    fds = raise_fd_limit()
    OUT.mkdir(exist_ok=True)
    figures: dict[str, Any] = {"boxes": args.n, "keepalive": args.keepalive, "fd_limit": fds}
    LOOP = asyncio.new_event_loop()
    # Each box's paho connect (TCP and TLS handshake) blocks a thread of the loop's
    # executor; a real box has its own process, so give the simulated ones threads
    # enough not to queue behind six (the default on 2 cores) after a broker restart.
    LOOP.set_default_executor(concurrent.futures.ThreadPoolExecutor(64))
    figures["load_average_start"] = os.getloadavg()
    threading.Thread(target=run_loop, args=(LOOP,), daemon=True).start()
    root = Path(tempfile.mkdtemp(prefix="pbx-fleet-"))
    with temporary_pki() as pki, Postgres(fsync=True) as pg:
        broker = NocBroker(pki)
        broker.start()
        procs: list[NocProcess] = []
        try:
            dsn = pg.create_database("fleet")
            db.migrate(dsn)
            ids = [f"pbx-{i:04d}" for i in range(args.n)]
            with psycopg.connect(dsn) as conn:
                accounts.add_user(conn, STAFF, PASSWORD, role=accounts.Role.STAFF, org=None)
            data = noc_settings(
                pki, broker, dsn, alerts={"heartbeat": f"{args.keepalive}s", "offline_after": 3}
            )
            web, url = start_web(root / "web", data)
            procs.append(web)
            cookie = login(url)
            print(f"== {args.n} boxes, keepalive {args.keepalive}s, fd limit {fds}", flush=True)
            t0 = time.monotonic()
            fleet = SimFleet.make(
                pki.issue, pki.ca_file, broker.port, ids,
                keepalive=args.keepalive, heartbeat=args.keepalive, reconnect_max=30.0,
            )  # fmt: skip
            made = time.monotonic() - t0

            async def connect_all() -> float:
                t = time.monotonic()
                fleet.start()
                await fleet.wait(fleet.all_connected, 300, "every box connected", interval=0.1)
                return time.monotonic() - t

            figures["connect_seconds"] = on_loop(connect_all())
            print(
                f"1. {args.n} boxes connected in {figures['connect_seconds']:.1f} s "
                f"(certificates and outboxes made beforehand in {made:.1f} s)",
                flush=True,
            )

            # -- 2. ingest rate ---------------------------------------------------------------
            figures["bare_rate"] = bare_rate(pki, broker, fleet, args.burst)
            print(
                f"2. baseline: mosquitto_sub on a shared persistent session, no database: "
                f"{figures['bare_rate']:,.0f}/s",
                flush=True,
            )
            for n_workers in (1, 2):
                group = f"bench{n_workers}"
                wdata = {**data, "broker": {**data["broker"], "share_group": group}}
                names = [f"w{n_workers}{c}" for c in "ab"[:n_workers]]
                workers = [
                    NocProcess(root / nm, wdata, "ingest", "--name", nm, name=nm) for nm in names
                ]
                for w in workers:  # make the sessions, then stop: the backlog queues for them
                    w.start()
                deadline = time.monotonic() + 30
                while not all("ingest_connected" in w.log() for w in workers):
                    if time.monotonic() > deadline:
                        raise SystemExit(f"workers did not connect: {workers[0].log()}")
                    time.sleep(0.1)
                time.sleep(1.0)  # let the live trickle settle
                for w in workers:
                    w.stop()
                before = count(dsn)

                async def burst() -> int:
                    for a in fleet.agents:
                        for _ in range(args.burst):
                            a.put_health()
                        await asyncio.sleep(0)  # let the other boxes keep their keepalive
                    await fleet.wait(fleet.drained, 300, "burst queued in the broker", interval=0.2)
                    return int(args.burst) * len(fleet.agents)

                sent = on_loop(burst())
                t = time.monotonic()
                for w in workers:
                    w.start()
                target = before + sent
                first = None  # from the first row stored: the workers' start-up is not ingest
                while (n := count(dsn)) < target:
                    if first is None and n > before:
                        first = (time.monotonic(), n)
                    if time.monotonic() - t > 600:
                        raise SystemExit("ingest did not finish in 10 minutes")
                    time.sleep(0.05)
                t_first, n_first = first or (t, before)
                seconds = time.monotonic() - t_first
                rate = (target - n_first) / seconds
                figures[f"ingest_rate_{n_workers}"] = rate
                print(
                    f"2. ingest with {n_workers} worker(s): {sent:,} envelopes queued in the "
                    f"broker, stored at {rate:,.0f}/s ({seconds:.1f} s from the first row; "
                    f"{time.monotonic() - t:.1f} s with the workers' start)",
                    flush=True,
                )
                if n_workers == 2:
                    procs.extend(workers)  # these stay for the rest of the run
                else:
                    for w in workers:
                        w.stop()

            # -- health at a short interval, from now on ------------------------------------
            async def health_loop() -> None:
                n = len(fleet.agents)
                while True:
                    for i, a in enumerate(fleet.agents):
                        if a.outbox is not None and a.task is not None:
                            a.put_health()
                        if i % 50 == 49:
                            await asyncio.sleep(args.health * 50 / n)

            health_task = asyncio.run_coroutine_threadsafe(health_loop(), LOOP)

            # -- 3. a box dies ----------------------------------------------------------------
            def shown_state(dev: str) -> str:
                body, _ = get(f"{url}/fleet/rows?q={dev}", cookie)
                marker = 'data-state="'
                i = body.find(marker)
                return body[i + len(marker) : body.index('"', i + len(marker))] if i >= 0 else ""

            def wait_state(dev: str, state: str, limit: float) -> float:
                t = time.monotonic()
                while shown_state(dev) != state:
                    if time.monotonic() - t > limit:
                        return float("nan")
                    time.sleep(0.1)
                return time.monotonic() - t

            victim = fleet.agents[1]
            victim.kill()
            figures["offline_after_kill"] = wait_state(victim.device_id, "offline", 60)
            print(
                f"3a. box killed (socket closed): shown offline after "
                f"{figures['offline_after_kill']:.2f} s",
                flush=True,
            )
            hole = Blackhole(broker.port)
            on_loop(hole.start())
            silent = SimAgent(
                "pbx-silent", pki.issue("pbx-silent"), pki.ca_file, hole.port, root,
                keepalive=args.keepalive, heartbeat=args.keepalive,
            )  # fmt: skip

            async def start_silent() -> None:
                silent.open()
                silent.start()
                while not silent.connected:  # noqa: ASYNC110 -- the session has no event for it
                    await asyncio.sleep(0.05)

            on_loop(start_silent())
            wait_state("pbx-silent", "online", 30)
            hole.frozen = True
            t = wait_state("pbx-silent", "offline", 10 * args.keepalive)
            figures["offline_after_network_loss"] = t
            print(
                f"3b. box's network vanished: shown offline after {t:.1f} s "
                f"(keepalive {args.keepalive} s; limit 1.5 x = {1.5 * args.keepalive:.0f} s)",
                flush=True,
            )
            on_loop(silent.stop())

            # -- 4. broker restart -------------------------------------------------------------
            before_connects = {a.device_id: a.session.connects for a in fleet.agents if a.session}
            alive = [a for a in fleet.agents if a is not victim]
            broker.stop()
            down_at = time.monotonic()
            time.sleep(args.outage)
            broker.start()
            up_at = time.monotonic()
            back: dict[str, float] = {}

            async def watch() -> None:
                while len(back) < len(alive) and time.monotonic() - up_at < 120:
                    now = time.monotonic()
                    for a in alive:
                        s = a.session
                        if (
                            a.device_id not in back
                            and s is not None
                            and s.connects > before_connects[a.device_id]
                            and a.connected
                        ):
                            back[a.device_id] = now - up_at
                    await asyncio.sleep(0.05)

            on_loop(watch(), 200)
            times = sorted(back.values())
            figures["restart"] = {
                "outage_s": up_at - down_at,
                "reconnected": len(times),
                "of": len(alive),
                "last_s": times[-1] if times else None,
                "p50_s": statistics.median(times) if times else None,
                "histogram_5s": dict(sorted(Counter(int(x // 5) * 5 for x in times).items())),
                "histogram_1s": dict(sorted(Counter(int(x) for x in times).items())),
            }
            print(
                f"4. broker down {up_at - down_at:.1f} s: {len(times)}/{len(alive)} boxes back, "
                f"last after {times[-1]:.1f} s, median {statistics.median(times):.1f} s",
                flush=True,
            )
            for start, n in figures["restart"]["histogram_5s"].items():
                print(f"   {start:>3}-{start + 5:<3}s {n:>4} {'#' * max(1, n // 5)}")

            # -- 5. the fleet page --------------------------------------------------------------
            page_ms, bare_ms, rows = [], [], 0
            for _ in range(20):
                body, ms = get(f"{url}/fleet", cookie)
                page_ms.append(ms)
                rows = body.count('<tr class="row')
                bare_ms.append(get(f"{url}/healthz", cookie)[1])
            figures["fleet_page"] = {
                "rows": rows,
                "median_ms": statistics.median(page_ms),
                "p95_ms": sorted(page_ms)[int(0.95 * len(page_ms)) - 1],
                "healthz_median_ms": statistics.median(bare_ms),
            }
            f = figures["fleet_page"]
            print(
                f"5. fleet page, {rows} rows: server time median {f['median_ms']:.0f} ms, "
                f"p95 {f['p95_ms']:.0f} ms (baseline /healthz {f['healthz_median_ms']:.1f} ms)",
                flush=True,
            )
            # -- sizes for PostgreSQL sizing ---------------------------------------------------
            with psycopg.connect(dsn) as conn:
                sizes: dict[str, int] = dict(
                    conn.execute(
                        "SELECT relname, pg_total_relation_size(oid) FROM pg_class"
                        " WHERE relname IN ('envelopes', 'health')"
                    ).fetchall()
                )
                n_health = int(conn.execute("SELECT count(*) FROM health").fetchone()[0])  # type: ignore[index]
            per = (sizes["envelopes"] + sizes["health"]) / max(n_health, 1)
            figures["bytes_per_health_envelope"] = per
            print(f"6. PostgreSQL: {per:,.0f} bytes per stored health envelope (row + indexes)")
            health_task.cancel()
            on_loop(fleet.close(), 120)
            on_loop(hole.close())
        finally:
            for proc in procs:
                proc.stop()
            broker.close()
            shutil.rmtree(root, ignore_errors=True)
    figures["load_average_end"] = os.getloadavg()
    (OUT / "fleet.json").write_text(json.dumps(figures, indent=2, default=str))
    print(f"figures written to {OUT / 'fleet.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
