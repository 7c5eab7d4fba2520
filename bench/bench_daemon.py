"""Daemon benchmarks, run by hand; they print figures and the floors, they do not assert.

1. Start to READY=1: the real ``agentctl run`` as a subprocess, timed from
   spawn to the notify datagram (local only, no uplink). Floor: under 1 s.
2. ``agentctl status`` round trip including the interpreter's start: hyperfine
   when installed (apt-get install hyperfine), else a loop of subprocess runs.
   Floor: under 150 ms.
3. Idle RSS of the daemon without an uplink, after it has settled. Floor: under 35 MB.

    PYTHONPATH=. python bench/bench_daemon.py [--starts 5] [--status-runs 30]
        [--settle 5] [--import-profile]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tests.support.daemon import REPO, AgentProcess, base_config, wait_for

FLOOR_READY = 1.0
FLOOR_STATUS = 0.150
FLOOR_RSS_MB = 35.0


def ready_times(root: Path, starts: int, env: dict[str, str]) -> list[float]:
    """Seconds from spawn to READY=1 for ``starts`` starts (after one warm-up start)."""
    times = []
    agent = AgentProcess(root, base_config(root, collectors={"health": {"interval": "60s"}}))
    try:
        agent.start(env=env)
        agent.stop()
        for _ in range(starts):
            times.append(agent.start(env=env))
            agent.stop()
    finally:
        agent.close()
    return times


def status_command(config: Path) -> list[str]:
    """The argv of `agentctl -c CONFIG status`, as an installed agentctl would run it."""
    return [sys.executable, "-m", "agent.cli", "-c", str(config), "status"]


def status_hyperfine(
    config: Path, runs: int, env: dict[str, str]
) -> tuple[float, float, float] | None:
    """(mean, median, max) seconds from hyperfine, or None when it is not installed."""
    exe = shutil.which("hyperfine")
    if exe is None:
        return None
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    try:
        cmd = " ".join(status_command(config))
        subprocess.run(
            [exe, "-N", "--warmup", "3", "--runs", str(runs), "--export-json", str(out), cmd],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(REPO), **env},
            cwd=REPO,
        )
        result = json.loads(out.read_text())["results"][0]
        return float(result["mean"]), float(result["median"]), float(result["max"])
    finally:
        out.unlink(missing_ok=True)


def status_loop(config: Path, runs: int, extra: dict[str, str]) -> list[float]:
    """Seconds per `agentctl status` over ``runs`` subprocess runs (after 3 warm-ups)."""
    times = []
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    for i in range(runs + 3):
        t0 = time.perf_counter()
        subprocess.run(status_command(config), check=True, capture_output=True, env=env, cwd=REPO)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return times


def bare_interpreter(runs: int) -> float:
    """Median seconds for `python -c pass`: the part of any figure that is not ours."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def import_profile(config: Path) -> str:
    """The ten slowest imports of `agentctl status` (python -X importtime), cumulative µs."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "agent.cli", "-c", str(config), "status"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        check=False,
    )
    rows = []
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self_us, cumulative, name = (f.strip() for f in line[len("import time:") :].split("|"))
        rows.append((int(cumulative), name))
    rows.sort(reverse=True)
    return "\n".join(f"    {us / 1000:7.1f} ms  {name}" for us, name in rows[:10])


def main() -> int:
    """Run each measurement once and print a table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--starts", type=int, default=5, help="cold starts to time")
    p.add_argument("--status-runs", type=int, default=30, help="agentctl status runs")
    p.add_argument("--settle", type=float, default=5.0, help="idle seconds before reading RSS")
    p.add_argument("--import-profile", action="store_true", help="show the slowest imports")
    a = p.parse_args()

    root = Path(tempfile.mkdtemp(prefix="pbx-bench-daemon-"))
    rows: list[tuple[str, str, str]] = []
    try:
        # This environment sets PYTHONDONTWRITEBYTECODE, so every start compiles the agent
        # from source; an installed agent has its bytecode. Measure both, the cache kept
        # outside the repository (PYTHONPYCACHEPREFIX).
        modes = {
            "as run here, no bytecode cache": {"PYTHONDONTWRITEBYTECODE": "1"},
            "bytecode cached, as installed": {
                "PYTHONDONTWRITEBYTECODE": "",
                "PYTHONPYCACHEPREFIX": str(root / "pycache"),
            },
        }
        for label, env in modes.items():
            ready = ready_times(root / "starts", a.starts, env)
            rows.append(
                (
                    f"start → READY=1, {label} (median of {a.starts}; min/max)",
                    f"{statistics.median(ready) * 1000:.0f} ms "
                    f"({min(ready) * 1000:.0f}/{max(ready) * 1000:.0f})",
                    _floor(statistics.median(ready) < FLOOR_READY, "< 1 s"),
                )
            )
        agent = AgentProcess(root / "run", base_config(root / "run"))
        try:
            agent.start()
            wait_for(
                lambda: agent.status()["collectors"]["health"]["last_ok"],
                what="a first collection",
            )
            config = agent.config_path
            for label, env in modes.items():
                hf = status_hyperfine(config, a.status_runs, env)
                if hf is not None:
                    mean, median, worst = hf
                    how = "hyperfine"
                else:
                    loop = status_loop(config, a.status_runs, env)
                    mean, median = statistics.fmean(loop), statistics.median(loop)
                    worst = max(loop)
                    how = "subprocess loop"
                rows.append(
                    (
                        f"agentctl status round trip, {label} ({how}, {a.status_runs} runs)",
                        f"mean {mean * 1000:.0f} ms, median {median * 1000:.0f}, "
                        f"max {worst * 1000:.0f}",
                        _floor(mean < FLOOR_STATUS, "< 150 ms"),
                    )
                )
            rows.append(
                (
                    "python -c pass (the interpreter alone)",
                    f"{bare_interpreter(10) * 1000:.0f} ms",
                    "",
                )
            )
            time.sleep(a.settle)  # the settled figure is the one wanted
            assert agent.proc is not None
            proc = psutil.Process(agent.proc.pid)
            info = proc.memory_full_info()
            rss_mb = info.rss / 1e6
            rows.append(
                (
                    f"daemon idle RSS, no uplink (after {a.settle:g} s; USS)",
                    f"{rss_mb:.1f} MB = {info.rss / 2**20:.1f} MiB "
                    f"(USS {info.uss / 2**20:.1f} MiB)",
                    _floor(rss_mb < FLOOR_RSS_MB, "< 35 MB"),
                )
            )
            if a.import_profile:
                print("slowest imports of agentctl status (cumulative):")
                print(import_profile(config))
        finally:
            agent.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    width = max(len(r[0]) for r in rows)
    for name, value, floor in rows:
        print(f"{name:<{width}}  {value:<44} {floor}")
    return 0


def _floor(ok: bool, text: str) -> str:
    return f"[{'ok' if ok else 'MISSED'}: {text}]"


if __name__ == "__main__":
    sys.exit(main())
