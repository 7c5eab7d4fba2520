"""The idle footprint of the daemon, beside collectd and a bare interpreter, in one run.

What a good citizen on a PBX costs when nothing happens: the real daemon
(``agentctl run``) with the shipped default configuration (``etc/agent.yaml``:
health every minute, hourly configuration scans of a copy of the sample PBX
tree, the CDR file followed every 30 s), the uplink connected over mutual TLS
to a local mosquitto through a byte-counting relay. For each process, after
``--minutes`` minutes:

- VmRSS and USS (psutil ``memory_full_info``);
- CPU seconds per minute and context switches per minute (voluntary and
  involuntary, summed over every thread from ``/proc/PID/task/*/status``),
  over the run after its first minute (start-up excluded);
- bytes sent (TCP payload towards the broker, TLS and MQTT included) in the
  first minute and per minute after it, projected to a day.

The daemon runs through ``bench/as_installed.py``, which hides the development
virtualenv's test and lint tools (structlog would otherwise import ``rich``):
what ``pip install .`` puts on a box, no more.

Beside it, measured the same way in the same run: collectd (Debian's, when
installed: ``apt-get install collectd-core``; its service is never enabled)
with cpu, memory, df, load, processes, interface and uptime every 60 s,
published by its mqtt plugin at QoS 1 over mutual TLS to the same broker; and
a bare ``python3`` sleeping (the interpreter's own floor).

Then the switch: ``--flips`` flips of ``uplink off`` → connection closed
(seen by the relay), p50 and p99.

    PYTHONPATH=. python bench/bench_idle.py [--minutes 10] [--flips 200] [--skip collectd switch]

Floors (issue 17): VmRSS ≤ 34 MiB, USS ≤ 20 MiB, CPU ≤ 0.015 s/min, ≤ 60
context switches/min, ≤ 1 MB/day sent; switch p99 ≤ 10 ms. Exit status 1 when
one is missed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from agent import control
from bench import as_installed
from tests.support.daemon import AgentProcess, shipped_config, wait_for
from tests.support.mosquitto import Mosquitto
from tests.support.pki import PKI, temporary_pki
from tests.support.relay import Relay

REPO = Path(__file__).resolve().parents[1]
DEVICE = "pbx-test-1"
COLLECTD_DEVICE = "pbx-test-2"
MIB = 2**20

FLOOR_RSS = 34.0
FLOOR_USS = 20.0
FLOOR_CPU = 0.015
FLOOR_CTX = 60.0
FLOOR_DAY = 1_000_000
FLOOR_SWITCH_P99 = 0.010


@dataclass
class Sample:
    """One reading of a process and its relay."""

    at: float
    cpu: float  # user + system seconds, every thread
    ctx: int  # voluntary + involuntary context switches, every thread
    sent: int  # bytes the relay received from the process


@dataclass
class Figures:
    """What the table shows for one process."""

    rss: float
    uss: float
    cpu_per_min: float
    ctx_per_min: float
    first_minute: int | None
    sent_per_min: float | None

    @property
    def per_day(self) -> float | None:
        """Bytes a day at the steady rate, plus the first minute's surplus."""
        if self.sent_per_min is None or self.first_minute is None:
            return None
        return self.sent_per_min * 1440 + max(0.0, self.first_minute - self.sent_per_min)


def ctx_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of every thread of ``pid``."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:
            continue  # a thread that ended between the listing and the read
        for line in text.splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def sample(pid: int, relay: Relay | None) -> Sample:
    """Read CPU, context switches and bytes sent now."""
    t = psutil.Process(pid).cpu_times()
    return Sample(
        at=time.monotonic(),
        cpu=t.user + t.system,
        ctx=ctx_switches(pid),
        sent=relay.bytes_up if relay is not None else 0,
    )


def figures(pid: int, start: Sample, minute: Sample, end: Sample, relay: bool) -> Figures:
    """The table's figures from three samples (start, after the first minute, end)."""
    mem = psutil.Process(pid).memory_full_info()
    mins = (end.at - minute.at) / 60
    return Figures(
        rss=mem.rss / MIB,
        uss=mem.uss / MIB,
        cpu_per_min=(end.cpu - minute.cpu) / mins,
        ctx_per_min=(end.ctx - minute.ctx) / mins,
        first_minute=minute.sent - start.sent if relay else None,
        sent_per_min=(end.sent - minute.sent) / mins if relay else None,
    )


# -- the agent ---------------------------------------------------------------------------


def agent_config(root: Path, pki: PKI, port: int) -> dict[str, Any]:
    """The shipped etc/agent.yaml, pointed at a copy of the sample PBX tree and the relay."""
    creds = pki.device(DEVICE)
    return shipped_config(root, broker_port=port, ca=pki.ca_file, cert=creds.cert, key=creds.key)


def connected(sock: Path) -> bool:
    """The daemon says its uplink is connected."""
    try:
        up = control.request(sock, "uplink-status")["uplink"]
    except OSError:
        return False
    return bool(up["state"] == "connected")


# -- collectd ----------------------------------------------------------------------------


COLLECTD_CONF = """\
Hostname "{device}"
FQDNLookup false
Interval 60
BaseDir "{root}"
PIDFile "{root}/collectd.pid"
PluginDir "/usr/lib/collectd"
TypesDB "/usr/share/collectd/types.db"
LoadPlugin logfile
<Plugin logfile>
  LogLevel warning
  File "{root}/collectd.log"
</Plugin>
LoadPlugin cpu
LoadPlugin memory
LoadPlugin df
LoadPlugin load
LoadPlugin processes
LoadPlugin interface
LoadPlugin uptime
LoadPlugin mqtt
<Plugin mqtt>
  <Publish "noc">
    Host "localhost"
    Port {port}
    ClientId "{device}"
    Prefix "pbx/{device}/collectd"
    QoS 1
    CACert "{ca}"
    CertificateFile "{cert}"
    CertificateKeyFile "{key}"
    TLSProtocol "tlsv1.2"
  </Publish>
</Plugin>
"""


def collectd_binary() -> str | None:
    """Debian's collectd, when installed."""
    path = shutil.which("collectd") or "/usr/sbin/collectd"
    return path if os.access(path, os.X_OK) else None


def start_collectd(root: Path, pki: PKI, port: int) -> subprocess.Popen[bytes] | None:
    """collectd in the foreground with the bench's configuration, or None when absent."""
    binary = collectd_binary()
    if binary is None:
        return None
    creds = pki.device(COLLECTD_DEVICE)
    conf = root / "collectd.conf"
    conf.write_text(
        COLLECTD_CONF.format(
            device=COLLECTD_DEVICE,
            root=root,
            port=port,
            ca=pki.ca_file,
            cert=creds.cert,
            key=creds.key,
        )
    )
    log = (root / "collectd.out").open("ab")
    return subprocess.Popen([binary, "-f", "-C", str(conf)], stdout=log, stderr=log)


# -- the run -----------------------------------------------------------------------------


@dataclass
class Subject:
    """One process measured."""

    name: str
    pid: int
    relay: Relay | None
    start: Sample | None = None
    minute: Sample | None = None


def idle(pki: PKI, broker: Mosquitto, minutes: float, with_collectd: bool) -> dict[str, Figures]:
    """Start the subjects side by side, wait, measure."""
    root = Path(tempfile.mkdtemp(prefix="pbx-bench-idle-"))
    os.chmod(root, 0o755)
    subjects: list[Subject] = []
    relays: list[Relay] = []
    procs: list[subprocess.Popen[bytes]] = []
    agent: AgentProcess | None = None
    try:
        relay = Relay(broker.host, broker.port)
        relays.append(relay)
        agent = AgentProcess(root / "agent", {})
        agent.write_config(agent_config(root / "agent", pki, relay.port))
        agent.start(module="bench.as_installed", env=as_installed.environment())
        assert agent.proc is not None
        wait_for(lambda: connected(agent.socket_path), timeout=30, what="uplink connected")
        subjects.append(Subject("pbx-agent", agent.proc.pid, relay))
        if with_collectd:
            crelay = Relay(broker.host, broker.port)
            relays.append(crelay)
            (root / "collectd").mkdir()
            proc = start_collectd(root / "collectd", pki, crelay.port)
            if proc is None:
                print("collectd is not installed (apt-get install collectd-core): skipped")
            else:
                procs.append(proc)
                subjects.append(Subject("collectd 5", proc.pid, crelay))
        bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1e6)"])
        procs.append(bare)
        subjects.append(Subject("bare python3", bare.pid, None))
        # Start-up excluded from the rates: the agent's start happened before this.
        for s in subjects:
            s.start = sample(s.pid, s.relay)
        time.sleep(60)  # a measurement window, not a wait for a condition
        for s in subjects:
            s.minute = sample(s.pid, s.relay)
        time.sleep(max(60.0, (minutes - 1) * 60))
        out = {}
        for s in subjects:
            assert s.start is not None and s.minute is not None
            end = sample(s.pid, s.relay)
            out[s.name] = figures(s.pid, s.start, s.minute, end, s.relay is not None)
        return out
    finally:
        if agent is not None:
            agent.close()
        for p in procs:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        for r in relays:
            r.close()
        shutil.rmtree(root, ignore_errors=True)


def switch_latency(pki: PKI, broker: Mosquitto, flips: int) -> list[float]:
    """Per flip: seconds from sending `uplink off` to the relay seeing the connection closed."""
    root = Path(tempfile.mkdtemp(prefix="pbx-bench-flip-"))
    closed: list[float] = []
    with Relay(broker.host, broker.port) as relay:
        agent = AgentProcess(root, {})
        agent.write_config(agent_config(root, pki, relay.port))
        try:
            agent.start(module="bench.as_installed", env=as_installed.environment())
            sock = agent.socket_path
            for i in range(flips):
                wait_for(lambda: connected(sock), timeout=15, interval=0.005, what=f"flip {i}")
                if not relay.wait_connections(1, 5):
                    raise RuntimeError(f"flip {i}: the relay sees no connection")
                t0 = time.perf_counter()
                control.request(sock, "uplink", state="off")
                if not relay.wait_closed(5):
                    raise RuntimeError(f"flip {i}: connection still open 5 s after off")
                closed.append(time.perf_counter() - t0)
                control.request(sock, "uplink", state="on")
        finally:
            agent.close()
            shutil.rmtree(root, ignore_errors=True)
    return closed


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def main() -> int:
    """Run the benches and print the table; exit 1 when a floor is missed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=3.0, help="idle run length (default 3)")
    p.add_argument("--flips", type=int, default=200)
    p.add_argument("--skip", nargs="*", default=[], choices=("idle", "collectd", "switch"))
    a = p.parse_args()
    ok = True
    print(f"load average {os.getloadavg()[0]:.2f} at start")
    with temporary_pki() as pki, Mosquitto(pki) as broker:
        broker.start()
        if "idle" not in a.skip:
            figs = idle(pki, broker, a.minutes, "collectd" not in a.skip)
            print(f"\nidle, after {a.minutes:g} min (rates over the minutes after the first):")
            head = ("", "VmRSS MiB", "USS MiB", "CPU s/min", "ctxsw/min", "B 1st min", "B/min")
            print("  {:<14}{:>10}{:>9}{:>11}{:>11}{:>11}{:>9}{:>12}".format(*head, "B/day"))
            for name, f in figs.items():
                print(
                    f"  {name:<14}{f.rss:>10.1f}{f.uss:>9.1f}{f.cpu_per_min:>11.4f}"
                    f"{f.ctx_per_min:>11.1f}{_n(f.first_minute):>11}{_n(f.sent_per_min):>9}"
                    f"{_n(f.per_day):>12}"
                )
            agent = figs["pbx-agent"]
            checks = [
                ("VmRSS", agent.rss <= FLOOR_RSS, f"≤ {FLOOR_RSS} MiB"),
                ("USS", agent.uss <= FLOOR_USS, f"≤ {FLOOR_USS} MiB"),
                ("CPU", agent.cpu_per_min <= FLOOR_CPU, f"≤ {FLOOR_CPU} s/min"),
                ("context switches", agent.ctx_per_min <= FLOOR_CTX, f"≤ {FLOOR_CTX:g}/min"),
                ("bytes/day", (agent.per_day or 0) <= FLOOR_DAY, f"≤ {FLOOR_DAY:,} B"),
            ]
            for what, met, floor in checks:
                print(f"  floor {what} {floor}: {'met' if met else 'MISSED'}")
                ok = ok and met
        if "switch" not in a.skip:
            closed = switch_latency(pki, broker, a.flips)
            p99 = pct(closed, 99)
            print(
                f"\nswitch, `uplink off` → connection closed, {len(closed)} flips: "
                f"p50 {pct(closed, 50) * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, "
                f"max {max(closed) * 1e3:.1f} ms (floor p99 ≤ {FLOOR_SWITCH_P99 * 1e3:g} ms: "
                f"{'met' if p99 <= FLOOR_SWITCH_P99 else 'MISSED'})"
            )
            ok = ok and p99 <= FLOOR_SWITCH_P99
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return 0 if ok else 1


def _n(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


if __name__ == "__main__":
    sys.exit(main())
