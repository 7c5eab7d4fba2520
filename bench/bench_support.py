"""Remote-support benchmarks, run by hand; they print figures beside baselines, never assert.

Everything is real: a private OpenSSH sshd as the bastion, the daemon as a
subprocess with its uplink to a private mosquitto (mutual TLS), the NOC as an
MQTT client sending ``support.connect``, local TCP services behind the tunnel.

1. ``support.connect`` → usable forwarded port: from the NOC publishing the
   command to the first byte echoed back through the bastion's port (MQTT, the
   locks, paramiko's import on the first run, TCP + SSH handshake, public-key
   login, the remote forward). Repeated with ``support.disconnect`` between runs.
2. Throughput through the tunnel, each way, beside a direct loopback copy of
   the same bytes between the same programs in the same run.
3. Idle daemon RSS: no support section, against support configured with a
   window open and no tunnel (paramiko must not be loaded), then with a tunnel.

    PYTHONPATH=. python bench/bench_support.py [--connects 10] [--mib 64] [--settle 5]

Needs root (a private sshd) and Debian's openssh-server and mosquitto.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

from tests.support.daemon import AgentProcess, base_config, wait_for
from tests.support.mosquitto import Mosquitto
from tests.support.pki import temporary_pki
from tests.support.sshd import private_root, require_sshd
from tests.support.support_rig import SupportRig, refuses, usable

CHUNK = 256 * 1024


class Sink:
    """Reads and discards; ``wait(n)`` returns when ``n`` bytes have arrived in all."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        self.received = 0
        self.cond = threading.Condition()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.server.accept()
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(CHUNK):
                with self.cond:
                    self.received += len(data)
                    self.cond.notify_all()

    def wait(self, total: int, timeout: float = 120) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.received >= total, timeout):
                raise TimeoutError(f"sink got {self.received} of {total} bytes")


class Source:
    """Sends ``size`` bytes to each connection, then closes it."""

    def __init__(self, size: int) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        self.block = bytes(range(256)) * (CHUNK // 256)
        self.size = size
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.server.accept()
            threading.Thread(target=self._send, args=(conn,), daemon=True).start()

    def _send(self, conn: socket.socket) -> None:
        with conn:
            left = self.size
            while left > 0:
                n = min(left, len(self.block))
                conn.sendall(self.block[:n])
                left -= n


def download(port: int) -> tuple[int, float]:
    """Read everything a connection to ``port`` sends; (bytes, seconds)."""
    t0 = time.perf_counter()
    got = 0
    with socket.create_connection(("127.0.0.1", port)) as s:
        while data := s.recv(CHUNK):
            got += len(data)
    return got, time.perf_counter() - t0


def upload(port: int, sink: Sink, size: int) -> float:
    """Send ``size`` bytes to ``port`` and wait until the sink has them; seconds."""
    block = bytes(range(256)) * (CHUNK // 256)
    start = sink.received
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        left = size
        while left > 0:
            n = min(left, len(block))
            s.sendall(block[:n])
            left -= n
        sink.wait(start + size)
    return time.perf_counter() - t0


def rss_of(pid: int) -> tuple[float, float]:
    """(RSS, USS) in MiB."""
    info = psutil.Process(pid).memory_full_info()
    return info.rss / 2**20, info.uss / 2**20


def idle_rss(root: Path, support: dict[str, object] | None, settle: float) -> tuple[float, float]:
    """RSS and USS of an idle local-only daemon, with or without a support section."""
    cfg = base_config(root, collectors={"health": {"interval": "60s"}})
    if support is not None:
        cfg["support"] = support
    agent = AgentProcess(root, cfg)
    try:
        agent.start()
        if support is not None:
            out = agent.ctl("support", "open", "--for", "1h")
            assert out.returncode == 0, out.stderr
            assert agent.ctl("support", "status", "--json").stdout.count('"paramiko_loaded": false')
        time.sleep(settle)  # let start-up garbage settle; nothing else runs
        assert agent.proc is not None
        return rss_of(agent.proc.pid)
    finally:
        agent.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--connects", type=int, default=10)
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--settle", type=float, default=5.0)
    a = p.parse_args()
    require_sshd()
    size = a.mib * 2**20
    sink, source = Sink(), Source(size)
    with temporary_pki() as pki, Mosquitto(pki) as broker, private_root() as root:
        rig = SupportRig(
            root / "rig",
            pki,
            broker,
            services=("web", "sink", "source"),
            addresses={"sink": f"127.0.0.1:{sink.port}", "source": f"127.0.0.1:{source.port}"},
            support={"keepalive_interval": "15s", "keepalive_deadline": "15s"},
        )
        try:
            rig.start()
            rig.open_window("1h")
            # 1. support.connect → usable port
            times = []
            for i in range(a.connects):
                t0 = time.perf_counter()
                reply = rig.connect()
                assert reply["ok"], reply
                while not usable(rig.ports["web"]):
                    time.sleep(0.002)
                times.append(time.perf_counter() - t0)
                if i + 1 < a.connects:
                    rig.command("support.disconnect", {})
                    wait_for(lambda: refuses(rig.ports["web"]), timeout=5, interval=0.005)
                    wait_for(lambda: rig.support_status()["session"]["live"] is False, timeout=5)
            print(f"support.connect -> usable port, {a.connects} runs (the first loads paramiko):")
            print(
                f"  first {times[0] * 1000:.0f} ms; later runs median "
                f"{statistics.median(times[1:]) * 1000:.0f} ms, max {max(times[1:]) * 1000:.0f} ms"
                if len(times) > 1
                else f"  {times[0] * 1000:.0f} ms"
            )
            # 2. throughput
            got, secs = download(rig.ports["source"])
            assert got == size, got
            _, secs_d = download(source.port)
            up_s = upload(rig.ports["sink"], sink, size)
            up_d = upload(sink.port, sink, size)
            mb = size / 1e6
            print(f"throughput, {a.mib} MiB one way (MB/s):")
            print(
                f"  service -> vendor: tunnel {mb / secs:.1f}, direct loopback {mb / secs_d:.1f} "
                f"(ratio {secs_d / secs:.3f})"
            )
            print(
                f"  vendor -> service: tunnel {mb / up_s:.1f}, direct loopback {mb / up_d:.1f} "
                f"(ratio {up_d / up_s:.3f})"
            )
            assert rig.agent.proc is not None
            rss_tunnel = rss_of(rig.agent.proc.pid)
            st = rig.support_status()["session"]
            print(
                f"  ledgered for the session: {st['bytes_to_vendor']:,} B to the vendor, "
                f"{st['bytes_from_vendor']:,} B from the vendor"
            )
        finally:
            rig.close()
        # 3. idle RSS
        plain = idle_rss(root / "plain", None, a.settle)
        support_cfg = dict(rig.config["support"])
        with_support = idle_rss(root / "support", support_cfg, a.settle)
        print("idle daemon (local only), RSS / USS MiB:")
        print(f"  no support section:                         {plain[0]:.1f} / {plain[1]:.1f}")
        print(
            f"  support configured, window open, no tunnel: {with_support[0]:.1f} / "
            f"{with_support[1]:.1f} (difference {with_support[0] - plain[0]:+.1f} MiB RSS; "
            "paramiko not loaded)"
        )
        tunnel_rss = f"{rss_tunnel[0]:.1f} / {rss_tunnel[1]:.1f}"
        print(f"  with a tunnel up (uplink connected too):    {tunnel_rss}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
