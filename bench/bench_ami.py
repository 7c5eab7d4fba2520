"""PBX health over AMI: CPU per collection and bytes per record, beside a bare reader.

Run by hand: ``PYTHONPATH=. python bench/bench_ami.py`` (``--endpoints``,
``--trunks``, ``--channels``, ``--runs`` to vary). The stand-in Asterisk
(tests/support/ami_server.py) runs in a process of its own with a box of 500
phones, 50 registered trunks and 200 channels up, so that only the client's
CPU time is counted here. Two figures for one PBX health collection (eight AMI
questions on one logged-in connection):

- ``PbxProbe.gather``: ask, parse, reduce to counts and trunk names, and the
  gate's JSON of the result;
- the bare baseline, in the same run, on its own connection: the same eight
  actions written by hand and their replies merely read and split into
  ``Key: Value`` dicts (no correlation, no figures), which is the least any
  client must do.

Each is the median of ``--runs`` collections (CPU time of this process, and
wall time); the record's size is the health envelope as the gate makes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.collectors.callstats.settings import CallstatsSettings
from agent.collectors.health.collector import HealthCollector
from agent.collectors.health.pbx import PbxProbe
from agent.collectors.health.settings import AmiSettings, HealthSettings
from agent.config import PolicyConfig
from agent.policy.gate import Gate

SECRET = "bench-ami-secret"
ACTIONS = (
    ("CoreStatus", False),
    ("CoreSettings", False),
    ("CoreShowChannels", True),
    ("PJSIPShowRegistrationsOutbound", True),
    ("PJSIPShowEndpoints", True),
    ("PJSIPShowContacts", True),
    ("SIPshowregistry", False),
    ("QueueSummary", True),
)


async def bare(port: int, runs: int) -> tuple[list[float], list[float], int]:
    """The same questions, replies read and split only: CPU and wall seconds per run, bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    await reader.readline()
    writer.write(f"Action: Login\r\nUsername: pbx-agent\r\nSecret: {SECRET}\r\n\r\n".encode())
    await reader.readuntil(b"\r\n\r\n")
    cpu, wall = [], []
    nbytes = 0
    for _ in range(runs):
        c0, w0 = time.process_time(), time.perf_counter()
        nbytes = 0
        for i, (name, is_list) in enumerate(ACTIONS):
            writer.write(f"Action: {name}\r\nActionID: b{i}\r\n\r\n".encode())
            chunks: list[bytes] = []
            tail = b""
            while True:
                chunk = await reader.read(1 << 18)
                chunks.append(chunk)
                window, tail = tail + chunk, chunk[-64:]
                if not is_list and b"\r\n\r\n" in window:
                    break
                done = b"EventList: Complete" in window or b"Response: Error" in window
                if is_list and done and chunk.endswith(b"\r\n\r\n"):
                    break
            buf = b"".join(chunks)
            nbytes += len(buf)
            msgs = [
                dict(line.split(": ", 1) for line in block.split("\r\n") if ": " in line)
                for block in buf.decode().split("\r\n\r\n")
                if block
            ]
            assert msgs
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    writer.close()
    await writer.wait_closed()
    return cpu, wall, nbytes


async def probe(ami: AmiSettings, runs: int) -> tuple[list[float], list[float], dict[str, Any]]:
    """PbxProbe.gather plus the JSON the gate makes of it: CPU and wall seconds per run."""
    p = PbxProbe(ami, CallstatsSettings())
    await p.gather()  # connect and log in outside the measurement
    cpu, wall = [], []
    pbx: dict[str, Any] = {}
    for _ in range(runs):
        c0, w0 = time.process_time(), time.perf_counter()
        pbx = await p.gather()
        json.dumps(pbx, separators=(",", ":"), ensure_ascii=False)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    await p.aclose()
    assert pbx["state"] == "ok", pbx
    return cpu, wall, pbx


async def record_bytes(ami: AmiSettings) -> tuple[int, int]:
    """Bytes of a whole health envelope with PBX figures, and of its ``pbx`` part."""
    hc = HealthCollector(HealthSettings(ami=ami), dict, trunk_rules=CallstatsSettings())
    records: list[Any] = []

    def keep(record: Any) -> bool:
        records.append(record)
        return True

    await hc.collect(keep, reason="schedule")
    await hc.aclose()
    gate = Gate(policy=PolicyConfig(), switch_on=lambda: True, last_seq=0)
    env = gate.approve(records[0])
    pbx = json.dumps(records[0].body["pbx"], separators=(",", ":"), ensure_ascii=False)
    return len(env.payload), len(pbx.encode())


def ms(xs: list[float]) -> str:
    """Median and max in milliseconds."""
    return f"median {statistics.median(xs) * 1000:.1f} ms, max {max(xs) * 1000:.1f} ms"


def main() -> None:
    """Start the stand-in, measure both, print the figures."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--endpoints", type=int, default=500)
    ap.add_argument("--trunks", type=int, default=50)
    ap.add_argument("--channels", type=int, default=200)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    big = f"{args.endpoints},{args.trunks},{args.channels}"
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.support.ami_server", "--big", big, "--secret", SECRET],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with tempfile.TemporaryDirectory() as tmp:
            secret = Path(tmp) / "ami.secret"
            secret.write_text(SECRET)
            secret.chmod(0o600)
            ami = AmiSettings(port=port, username="pbx-agent", secret_file=secret, timeout=30)
            load0 = os.getloadavg()[0]
            b_cpu, b_wall, b_bytes = asyncio.run(bare(port, args.runs))
            p_cpu, p_wall, pbx = asyncio.run(probe(ami, args.runs))
            env_bytes, pbx_bytes = asyncio.run(record_bytes(ami))
            load1 = os.getloadavg()[0]
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(10)
    print(
        f"box: {args.endpoints} phones, {args.trunks} trunks, {args.channels} channels; "
        f"{args.runs} collections each; AMI replies {b_bytes / 1024:.0f} KiB per collection"
    )
    print(f"PbxProbe.gather + JSON: CPU {ms(p_cpu)}; wall {ms(p_wall)}")
    print(f"bare read-and-split:    CPU {ms(b_cpu)}; wall {ms(b_wall)}")
    ratio = statistics.median(p_cpu) / statistics.median(b_cpu)
    print(f"CPU ratio probe/bare: {ratio:.2f}")
    print(
        f"record: health envelope {env_bytes} B, of which pbx {pbx_bytes} B "
        f"({len(pbx['trunks'])} trunks named, {len(pbx['queues'])} queues)"
    )
    print(f"load average {load0:.2f} -> {load1:.2f}")


if __name__ == "__main__":
    main()
