"""Chaos runs (`make chaos`): the long forms of the fault tests. Minutes, not seconds.

Each phase drains a backlog from the real daemon (`agentctl run`) to a real
mosquitto with mutual TLS and counts, at a real NOC subscriber, what arrived:

1. broker restarts: ``--restarts`` stops and starts of the broker during the
   drain (the broker and the NOC keep persistent sessions, as a NOC would);
2. kill -9: ``--kills`` SIGKILLs of the daemon during the drain, each followed
   by a restart;
3. a full disk: the state directory on a tmpfs filled with dd for
   ``--full-disk`` seconds in the middle of the drain, then freed (needs root
   to mount; skipped with a message otherwise), while a reader holds a
   snapshot of the database so that SQLite cannot reuse the space it holds;
4. the hostile-command flood: ``bench/bench_hostile.py --count N
   --skip-control`` (its command phase; its own floors decide its exit status).

For each phase it prints ``lost`` (backlog envelopes that never reached the
NOC: must be 0) and ``duplicated`` (copies beyond the first), and the largest
number of copies of one envelope; the exit status is 1 if anything was lost or
the hostile flood missed a floor.

    PYTHONPATH=. python bench/chaos.py [--backlog 30000] [--restarts 20] [--kills 25]
        [--full-disk 60] [--hostile-count 10000] [--skip restarts kills disk hostile]
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.store import db_path
from tests.support.backlog import prefill
from tests.support.daemon import AgentProcess, base_config, wait_for
from tests.support.faults import MountUnavailable, Tmpfs
from tests.support.mosquitto import Mosquitto
from tests.support.noc import NocListener
from tests.support.pki import PKI, temporary_pki

DEVICE = "pbx-test-1"
REPO = Path(__file__).resolve().parents[1]
HOSTILE = REPO / "bench" / "bench_hostile.py"


@dataclass
class Outcome:
    """What one phase measured."""

    name: str
    backlog: int
    lost: int
    duplicated: int
    max_copies: int
    seconds: float
    note: str = ""
    failed: bool = False  # a floor of its own was missed (the hostile flood)

    def line(self) -> str:
        """One row of the summary."""
        return (
            f"{self.name:<28} backlog {self.backlog:>6}  lost {self.lost:>3}  "
            f"duplicated {self.duplicated:>5}  max copies {self.max_copies}  "
            f"{self.seconds:6.1f} s  {self.note}"
        )


def agent_config(
    root: Path, pki: PKI, port: int, window: int, health: str = "60s"
) -> dict[str, Any]:
    """Health once a minute by default (the backlog is the subject), quick reconnects."""
    creds = pki.device(DEVICE)
    cfg = base_config(root)
    cfg["collectors"]["health"] = {"interval": health}
    cfg["uplink"] = {
        "broker": f"mqtts://localhost:{port}",
        "ca_file": str(pki.ca_file),
        "cert_file": str(creds.cert),
        "key_file": str(creds.key),
        "heartbeat": "30s",
        "reconnect_max": "1s",
        "connect_timeout": "5s",
        "max_inflight": window,
    }
    return cfg


def tally(name: str, ids: list[str], noc: NocListener, t0: float, note: str = "") -> Outcome:
    """Lost and duplicated among the backlog's ids, as the NOC received them."""
    want = set(ids)
    copies = Counter(e["id"] for e in noc.envelopes("health") if e["id"] in want)
    return Outcome(
        name=name,
        backlog=len(ids),
        lost=len(want - set(copies)),
        duplicated=sum(c - 1 for c in copies.values()),
        max_copies=max(copies.values(), default=0),
        seconds=time.monotonic() - t0,
        note=note,
    )


def received(noc: NocListener) -> int:
    """Messages the NOC has received so far (cheap: no parsing)."""
    return len(noc.messages)


def drained(agent: AgentProcess, noc: NocListener, ids: list[str], timeout: float) -> None:
    """Wait for an empty outbox and every backlog id at the NOC (or the deadline)."""
    want = set(ids)
    try:
        wait_for(lambda: agent.status()["outbox"]["queued"] == 0, timeout=timeout, interval=0.5)
        wait_for(
            lambda: want <= {e["id"] for e in noc.envelopes("health")},
            timeout=30,
            interval=1.0,
            what="every envelope at the NOC",
        )
    except AssertionError as exc:
        print(f"  not drained: {exc}", flush=True)


def seq_gaps(state_dir: Path) -> int:
    """Seqs in 1..last_seq neither delivered (ledger) nor queued (outbox): must be 0."""
    conn = sqlite3.connect(f"file:{db_path(state_dir)}?mode=ro", uri=True, timeout=5)
    try:
        seen = {
            int(json.loads(d)["seq"])
            for (d,) in conn.execute("SELECT data FROM ledger WHERE kind = 'delivered'")
        }
        seen.update(int(s) for (s,) in conn.execute("SELECT seq FROM outbox"))
        last = int(conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()[0])
    finally:
        conn.close()
    return len(set(range(1, last + 1)) - seen)


@contextmanager
def persistence_dir() -> Iterator[Path]:
    """A folder the broker (as the mosquitto user) may keep its persistence file in."""
    path = Path(tempfile.mkdtemp(prefix="pbx-chaos-mosq-"))
    path.chmod(0o755)
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("mosquitto")
            os.chown(path, pw.pw_uid, pw.pw_gid)
        except KeyError:
            pass
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def broker_restarts(pki: PKI, backlog: int, restarts: int, window: int) -> Outcome:
    """Restart the broker ``restarts`` times while the daemon drains ``backlog``."""
    root = Path(tempfile.mkdtemp(prefix="pbx-chaos-restarts-"))
    t0 = time.monotonic()
    try:
        with persistence_dir() as pdir:
            broker = Mosquitto(
                pki, extra_config=f"persistence true\npersistence_location {pdir}/\n"
            )
            broker.start()
            try:
                with NocListener(broker, persistent=True) as noc:
                    ids = prefill(root / "state", backlog)
                    agent = AgentProcess(root, agent_config(root, pki, broker.port, window))
                    try:
                        agent.start()
                        step = max(backlog // (restarts * 3), 50)
                        for i in range(restarts):
                            mark = received(noc)
                            wait_for(
                                lambda m=mark: received(noc) >= m + step,  # type: ignore[misc]
                                timeout=60,
                                what=f"deliveries before restart {i + 1}",
                            )
                            broker.restart()
                            print(f"  broker restart {i + 1}/{restarts}", flush=True)
                        drained(agent, noc, ids, timeout=180)
                        connects = agent.status()["uplink"]["connects"]
                        agent.stop()
                    finally:
                        agent.close()
                    return tally(
                        f"{restarts} broker restarts", ids, noc, t0, f"(daemon connects {connects})"
                    )
            finally:
                broker.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def daemon_kills(pki: PKI, broker: Mosquitto, backlog: int, kills: int, window: int) -> Outcome:
    """SIGKILL the daemon ``kills`` times while it drains ``backlog``; restart it each time."""
    root = Path(tempfile.mkdtemp(prefix="pbx-chaos-kills-"))
    t0 = time.monotonic()
    try:
        with NocListener(broker) as noc:
            ids = prefill(root / "state", backlog)
            agent = AgentProcess(root, agent_config(root, pki, broker.port, window))
            try:
                agent.start()
                step = max(backlog // (kills * 3), 50)
                for i in range(kills):
                    mark = received(noc)
                    wait_for(
                        lambda m=mark: received(noc) >= m + step,  # type: ignore[misc]
                        timeout=60,
                        what=f"deliveries before kill {i + 1}",
                    )
                    assert agent.proc is not None
                    agent.proc.kill()
                    agent.proc.wait(10)
                    agent.start()
                    print(f"  kill -9 {i + 1}/{kills}", flush=True)
                drained(agent, noc, ids, timeout=180)
                agent.stop()
            finally:
                agent.close()
            verify = agent.ctl("audit", "verify").returncode
            return tally(f"{kills} kill -9 of the daemon", ids, noc, t0, f"(audit verify {verify})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def full_disk(pki: PKI, broker: Mosquitto, backlog: int, hold: float, window: int) -> Outcome:
    """Fill the state directory's tmpfs mid-drain for ``hold`` seconds, then free it."""
    root = Path(tempfile.mkdtemp(prefix="pbx-chaos-disk-"))
    t0 = time.monotonic()
    try:
        with Tmpfs(root / "state", size="64m") as fs, NocListener(broker) as noc:
            ids = prefill(fs.path, backlog)
            # Health every 2 s: records offered while the disk is full must take no seq.
            agent = AgentProcess(root, agent_config(root, pki, broker.port, window, "2s"))
            try:
                agent.start()
                wait_for(lambda: received(noc) >= min(2000, backlog // 4), timeout=60)
                # A reader holding a snapshot (`agentctl audit | less` does) keeps SQLite from
                # reusing its write-ahead log, so every commit needs new space: the worst case.
                # Without one, deletions free pages that SQLite reuses, and delivery goes on.
                reader = sqlite3.connect(f"file:{db_path(fs.path)}?mode=ro", uri=True)
                reader.execute("BEGIN")
                reader.execute("SELECT COUNT(*) FROM ledger").fetchone()
                fs.fill()
                at_fill = received(noc)
                paused_for = 0.0
                end = time.monotonic() + hold
                last = time.monotonic()
                while time.monotonic() < end:
                    is_paused = bool(agent.status()["uplink"].get("paused"))
                    now = time.monotonic()
                    paused_for += (now - last) if is_paused else 0.0
                    last = now
                    time.sleep(0.5)  # sampling the episode, not waiting on a condition
                during = received(noc) - at_fill
                connects = agent.status()["uplink"]["connects"]
                reader.close()
                fs.free()
                drained(agent, noc, ids, timeout=180)
                unstored = agent.status()["outbox"]["unstored"]
                agent.stop()
            finally:
                agent.close()
            return tally(
                f"full disk for {hold:.0f} s",
                ids,
                noc,
                t0,
                f"(paused about {paused_for:.0f} s; NOC messages while full {during}; "
                f"connects {connects}; records not stored {unstored}; "
                f"seq gaps {seq_gaps(fs.path)})",
            )
    except MountUnavailable as exc:
        print(f"  full disk: skipped ({exc})", flush=True)
        return Outcome("full disk", 0, 0, 0, 0, 0.0, f"skipped: {exc}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def hostile(count: int) -> Outcome:
    """The hostile-command flood: bench/bench_hostile.py's command phase, in a process of its own.

    Its own floors (every command replied and ledgered, no uplink restart, bounded
    memory) decide its exit status, which fails this phase.
    """
    t0 = time.monotonic()
    if not HOSTILE.exists():
        note = f"{HOSTILE.relative_to(REPO)} not present; flood not run"
        print(f"  {note}", flush=True)
        return Outcome("hostile-command flood", 0, 0, 0, 0, 0.0, note)
    done = subprocess.run(
        [sys.executable, str(HOSTILE), "--count", str(count), "--skip-control"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    return Outcome(
        f"{count} hostile commands",
        0,
        0,
        0,
        0,
        time.monotonic() - t0,
        f"(bench_hostile.py exit {done.returncode}: "
        f"{'floors met' if done.returncode == 0 else 'a floor MISSED'})",
        failed=done.returncode != 0,
    )


def main() -> int:
    """Run every phase and print lost and duplicated counts."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backlog", type=int, default=30_000, help="envelopes queued per phase")
    p.add_argument("--restarts", type=int, default=20)
    p.add_argument("--kills", type=int, default=25)
    p.add_argument("--full-disk", type=float, default=60.0, help="seconds the disk stays full")
    p.add_argument("--hostile-count", type=int, default=10_000)
    p.add_argument("--window", type=int, default=100, help="uplink.max_inflight")
    p.add_argument(
        "--skip", nargs="*", default=[], choices=("restarts", "kills", "disk", "hostile")
    )
    a = p.parse_args()
    outcomes: list[Outcome] = []
    with temporary_pki() as pki:
        if "restarts" not in a.skip:
            print("== broker restarts during a drain", flush=True)
            outcomes.append(broker_restarts(pki, a.backlog, a.restarts, a.window))
        with Mosquitto(pki) as broker:
            if "kills" not in a.skip:
                print("== kill -9 of the daemon during a drain", flush=True)
                outcomes.append(daemon_kills(pki, broker, a.backlog, a.kills, a.window))
            if "disk" not in a.skip:
                print("== a full state disk during a drain", flush=True)
                outcomes.append(full_disk(pki, broker, a.backlog, a.full_disk, a.window))
    if "hostile" not in a.skip:
        print("== hostile-command flood", flush=True)
        outcomes.append(hostile(a.hostile_count))
    print()
    for o in outcomes:
        print(o.line())
    lost = sum(o.lost for o in outcomes)
    print(f"\nlost: {lost} (must be 0)   duplicated: {sum(o.duplicated for o in outcomes)}")
    return 1 if lost or any(o.failed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
