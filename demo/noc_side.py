"""The demo's NOC service: PostgreSQL, ``noc ingest`` workers, ``noc alerts``, ``noc web``.

Everything runs on this machine's loopback: a throwaway PostgreSQL 15 cluster
(as the ``postgres`` user when run as root), the NOC's own processes started as
an operator would start them (``python -m noc -c noc.yaml ...``), and
headless Chromium (Debian's, through chromedriver) for the screenshots.

The demo box is real and live. Two more boxes (one of the demo customer's,
one of another customer's) get 30 days of call statistics and a day of
health made up and stored through the ingest code (tests/support/nocseed.py),
so that the reports have something to show; the demo says so. The other
customer's box then stays live as a simulated box (the agent's real uplink
code with its own certificate, tests/support/agents.py); the demo customer's
second box has its uplink severed by its customer.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import yaml

from noc import accounts
from noc.ca import CA
from tests.support.agents import SimAgent
from tests.support.nocseed import PASSWORD, history, seed_accounts, set_status, store_history
from tests.support.pki import Creds
from tests.support.postgres import Postgres, PostgresUnavailable

REPO = Path(__file__).resolve().parents[1]


class NocSide:
    """The NOC's database and processes for the demo."""

    def __init__(self, run: Path, files: dict[str, Path], broker_port: int, web_port: int) -> None:
        self.run = run / "noc-service"
        self.run.mkdir(parents=True, exist_ok=True)
        self.files = files
        self.broker_port = broker_port
        self.web_port = web_port
        self.pg: Postgres | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.dsn = ""
        self.config = self.run / "noc.yaml"
        self._sim_stop: asyncio.Event | None = None
        self._sim_thread: threading.Thread | None = None
        self._sim_loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        """The dashboard's address (localhost: Chromium keeps Secure cookies for it over http)."""
        return f"http://localhost:{self.web_port}"

    def start(self) -> None:
        """PostgreSQL, the schema, the accounts, the history, then the NOC's processes."""
        try:
            self.pg = Postgres(fsync=False)
        except PostgresUnavailable as exc:
            raise SystemExit(f"{exc}") from None
        self.pg.start()
        self.dsn = self.pg.create_database("noc")
        print(f"  PostgreSQL 15 on 127.0.0.1:{self.pg.port} (data in {self.pg.root})")
        self.config.write_text(yaml.safe_dump(self.settings(), sort_keys=False))
        self.noc("migrate")
        with psycopg.connect(self.dsn) as conn:
            seed_accounts(conn)
            accounts.assign_device(conn, "acme-pbx-02", "acme", None)
            accounts.assign_device(conn, "globex-pbx-01", "globex", None)
            for n, dev in enumerate(("acme-pbx-02", "globex-pbx-01")):
                store_history(conn, history(dev, seed=n))
                set_status(conn, dev, "online" if n else "severed")
        print("  made-up history stored through the ingest code for acme-pbx-02 and globex-pbx-01")
        for args in (
            ["ingest", "--name", "a", "--standby"],
            ["ingest", "--name", "b"],
            ["alerts"],
            ["web"],
        ):
            self.spawn(args)
        deadline = time.monotonic() + 30
        import socket

        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.web_port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"noc web did not start; see {self.run}/web.log")
            time.sleep(0.1)
        self.start_simulated_box("globex-pbx-01")

    def start_simulated_box(self, device: str) -> None:
        """A live box of another customer: the agent's real uplink, its own certificate."""
        ca = CA.load(self.files["ca"].parent)
        cert, key = ca.issue_device(device, self.run / "sim")
        box = SimAgent(
            device, Creds(device, cert, key), self.files["ca"], self.broker_port,
            self.run / "sim", keepalive=10, heartbeat=10, reconnect_max=5.0,
        )  # fmt: skip
        ready = threading.Event()

        async def main() -> None:
            self._sim_stop = asyncio.Event()
            box.open()
            box.start()
            ready.set()
            while not self._sim_stop.is_set():
                box.put_health()
                try:
                    await asyncio.wait_for(self._sim_stop.wait(), 10)
                except TimeoutError:
                    pass
            await box.stop()

        def run() -> None:
            self._sim_loop = asyncio.new_event_loop()
            self._sim_loop.run_until_complete(main())
            self._sim_loop.close()

        self._sim_thread = threading.Thread(target=run, name="simulated-box", daemon=True)
        self._sim_thread.start()
        ready.wait(10)
        print(f"  {device}: a simulated box (the agent's uplink code) sends health every 10 s")

    def settings(self) -> dict[str, Any]:
        """The NOC's configuration file (noc.yaml) for the demo."""
        return {
            "database": self.dsn,
            "broker": {
                "url": f"mqtts://localhost:{self.broker_port}",
                "ca_file": str(self.files["ca"]),
                "cert_file": str(self.files["noc_cert"]),
                "key_file": str(self.files["noc_key"]),
            },
            "web": {"host": "127.0.0.1", "port": self.web_port},
            "alerts": {"heartbeat": "10s", "interval": "5s", "resolve_after": "10s"},
            "signing": {"key_file": str(self.files["command_key"])},
            "command_timeout": "5s",
        }

    def noc(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run one ``noc`` command, echoing it."""
        print(f"$ noc {' '.join(args)}", flush=True)
        out = subprocess.run(
            [sys.executable, "-m", "noc", "-c", str(self.config), *args],
            capture_output=True, text=True, cwd=REPO, check=False, timeout=60,
        )  # fmt: skip
        text = (out.stdout + out.stderr).strip()
        if text:
            print("  " + text.replace("\n", "\n  "), flush=True)
        return out

    def spawn(self, args: list[str]) -> None:
        """Start a long-running ``noc`` process, its log beside the configuration."""
        name = "-".join(a.strip("-") for a in args[:3])
        log = (self.run / f"{name}.log").open("wb")
        print(f"$ noc {' '.join(args)} &   (log: {self.run / name}.log)", flush=True)
        self.procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "noc", "-c", str(self.config), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        )
        log.close()

    def screenshots(self, device: str) -> list[Path]:
        """Log in with Chromium as staff and as the customer; PNGs of the pages that matter."""
        from tests.support.browser import Browser, BrowserUnavailable

        shots = self.run.parent / "screenshots"
        shutil.rmtree(shots, ignore_errors=True)
        made: list[Path] = []
        try:
            with Browser(self.url) as b:
                b.login("noc-admin", PASSWORD, then="/fleet")
                made.append(b.screenshot(shots / "fleet.png"))
                b.get(f"/devices/{device}?span=1h")
                made.append(b.screenshot(shots / "device.png"))
            with Browser(self.url) as b:
                b.login("alice", PASSWORD, then="/report")
                made.append(b.screenshot(shots / "customer-report.png"))
        except BrowserUnavailable as exc:
            print(f"  (no screenshots: {exc})")
        return made

    def stop(self) -> None:
        """Stop the simulated box, the NOC's processes and PostgreSQL."""
        if self._sim_loop is not None and self._sim_stop is not None:
            self._sim_loop.call_soon_threadsafe(self._sim_stop.set)
        if self._sim_thread is not None:
            self._sim_thread.join(10)
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.pg is not None:
            self.pg.close()
