"""The demo: a vendor broker, a PBX box, the agent between them, and the customer's switch.

Everything is real and local: a throwaway vendor CA made with ``cryptography``
(``noc.ca``), a device key made "on the box" whose CSR the CA signs, mosquitto
on a free loopback port with mutual TLS and the per-device ACL, the agent
started as ``agentctl run`` on the sample PBX tree shipped in
``tests/fixtures/pbx``, a NOC subscriber printing what the vendor receives,
then ``agentctl status``, ``audit``, ``uplink off`` and ``on``; and the NOC
service (demo/noc_side.py): PostgreSQL, ingest workers, alerts and the web
dashboard, which stays up on a loopback port with demo logins (when run from a
terminal; ``DEMO_KEEP=0`` ends at once, ``DEMO_KEEP=1`` stays without one),
and headless-Chromium screenshots of the fleet and of the customer's report.
Files go to ``demo/run/`` (removed at the next run).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import yaml

from demo.noc_side import NocSide
from noc import signing
from noc.ca import make_ca, make_key_and_csr
from tests.support.nocseed import PASSWORD

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "demo" / "run"
SAMPLE = REPO / "tests" / "fixtures" / "pbx"
DEVICE = "pbx-demo-0001"


def say(text: str) -> None:
    """A section heading."""
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, deadline: float) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"mosquitto did not start on port {port}; see {RUN / 'mosquitto.log'}")


def agentctl(*args: str, show: bool = True) -> subprocess.CompletedProcess[str]:
    """Run agentctl as an administrator would, echoing the command and its output."""
    cmd = [sys.executable, "-m", "agent.cli", "-c", str(RUN / "agent.yaml"), *args]
    if show:
        print(f"$ agentctl {' '.join(args)}", flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if show:
        print(textwrap.indent((out.stdout + out.stderr).rstrip(), "  "), flush=True)
    return out


class Noc(threading.Thread):
    """The vendor's side: subscribes to pbx/# with the NOC's certificate and prints a line each."""

    def __init__(self, port: int, ca: Path, cert: Path, key: Path) -> None:
        super().__init__(daemon=True)
        self.port, self.ca, self.cert, self.key = port, ca, cert, key
        self.quiet = False
        self.received = 0
        self.ready = threading.Event()

    def run(self) -> None:
        from noc import mqtt
        from noc.config import BrokerSettings
        from noc.errors import BrokerError

        settings = BrokerSettings(
            host="localhost",
            port=self.port,
            ca_file=self.ca,
            cert_file=self.cert,
            key_file=self.key,
        )

        def on_message(c: Any, userdata: Any, m: Any) -> None:
            self.received += 1
            if not self.quiet:
                print(f"  NOC <- {describe(str(m.topic), m.payload)}", flush=True)

        def on_connect(c: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
            c.subscribe("pbx/#", qos=1)  # again after each of paho's reconnects

        def on_subscribe(*args: Any) -> None:
            self.ready.set()

        while True:
            c = mqtt.client(settings, client_id="noc-demo")
            c.on_connect = on_connect
            c.on_message = on_message
            c.on_subscribe = on_subscribe
            try:
                mqtt.connect_blocking(c, settings)  # paho's own thread runs it from here
            except BrokerError:
                time.sleep(0.5)
                continue
            return


def describe(topic: str, payload: Any) -> str:
    """One line about a received message: never its content, like the NOC's log would be."""
    data = payload if isinstance(payload, bytes) else b""
    if "/up/" in topic:
        env = json.loads(data)
        return (
            f"{topic:<32} v{env['v']} class={env['class']:<9} seq={env['seq']:<4} "
            f"{len(data):>6} B  id={env['id']}"
        )
    return f"{topic:<32} {data.decode(errors='replace')}"


def make_pki() -> dict[str, Path]:
    """Vendor CA, broker certificate, NOC certificate, and the box's own key and certificate."""
    ca = make_ca(RUN / "vendor-ca", name="Demo vendor CA")
    broker_cert, broker_key = ca.issue_server(["localhost"], RUN / "broker")
    noc_cert, noc_key = ca.issue_device("noc", RUN / "noc")
    box = RUN / "box"
    key, csr = make_key_and_csr(DEVICE, box)  # the private key never leaves this folder
    cert = ca.sign_csr(csr.read_bytes(), box / "device.crt", device_id=DEVICE)
    shutil.copy(ca.cert_path, box / "vendor-ca.pem")
    print(f"  vendor CA        {ca.cert_path}")
    print(
        f"  box key (0{key.stat().st_mode & 0o777:o})   {key}   made on the box; only the CSR "
        f"went to the CA"
    )
    print(f"  box certificate  {cert}  CN={DEVICE}")
    # Command signing: an offline root (its public key pinned on the box) and a command key
    # it certifies, which the NOC signs every command with.
    root_key, root_pub, fp = signing.init_root(RUN / "vendor-root")
    command_key = RUN / "noc" / "command-key.json"
    signing.issue_command_key(signing.load_root(root_key), command_key, days=1)
    shutil.copy(root_pub, box / "vendor-root.pub")
    print(f"  command root     {root_pub}  {fp}, pinned on the box; command key {command_key}")
    return {
        "root_pub": box / "vendor-root.pub",
        "command_key": command_key,
        "ca": ca.cert_path,
        "broker_cert": broker_cert,
        "broker_key": broker_key,
        "noc_cert": noc_cert,
        "noc_key": noc_key,
        "cert": cert,
        "key": key,
        "box_ca": box / "vendor-ca.pem",
    }


def start_broker(files: dict[str, Path], port: int) -> subprocess.Popen[bytes]:
    """mosquitto with mutual TLS and the per-device ACL, in the foreground."""
    acl = RUN / "acl"
    acl.write_text(
        "user noc\ntopic read pbx/#\ntopic write pbx/+/cmd\n\npattern readwrite pbx/%u/#\n"
    )
    conf = RUN / "mosquitto.conf"
    conf.write_text(
        f"per_listener_settings false\nlistener {port} 127.0.0.1\n"
        f"cafile {files['ca']}\ncertfile {files['broker_cert']}\nkeyfile {files['broker_key']}\n"
        "require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n"
        f"acl_file {acl}\npersistence false\nset_tcp_nodelay true\n"
        "max_queued_messages 100000\nlog_dest stderr\n"
    )
    if os.geteuid() == 0:
        # mosquitto started as root drops to the mosquitto user, who must read its files.
        try:
            pw = pwd.getpwnam("mosquitto")
        except KeyError:
            pass
        else:
            for p in (files["broker_cert"].parent, files["broker_cert"], files["broker_key"]):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            for p in (RUN, RUN / "vendor-ca", acl, conf, files["ca"]):
                os.chmod(p, 0o755 if p.is_dir() else 0o644)
    log = (RUN / "mosquitto.log").open("wb")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log, stderr=log)
    wait_port(port, time.monotonic() + 10)
    return proc


def agent_config(files: dict[str, Path], port: int) -> dict[str, Any]:
    """The box's configuration: the sample PBX tree, the broker, state under demo/run."""
    etc = SAMPLE / "etc"
    return {
        "device_id": DEVICE,
        "paths": {"state_dir": str(RUN / "state"), "runtime_dir": str(RUN / "rt")},
        "control": {"read_group": False, "admin_group": False},
        "collectors": {
            "health": {"interval": "5s"},
            "config": {
                "interval": "1m",
                "roots": [
                    str(etc / "asterisk"),
                    str(etc / "freepbx.conf"),
                    str(etc / "amportal.conf"),
                ],
                "exclude": [str(etc / "asterisk" / "keys") + "/**"],
                "never_read": [str(SAMPLE / "var" / "spool" / "asterisk")],
            },
            # The sample CDRs are from March 2026: let the demo count them.
            "callstats": {
                "interval": "5s",
                "bucket": "1h",
                "max_age": "3650d",
                "source": {"csv": str(SAMPLE / "var/log/asterisk/cdr-csv/Master.csv")},
            },
        },
        "uplink": {
            "broker": f"mqtts://localhost:{port}",
            "ca_file": str(files["box_ca"]),
            "cert_file": str(files["cert"]),
            "key_file": str(files["key"]),
            "command_root": str(files["root_pub"]),
            "heartbeat": "10s",
            "reconnect_max": "5s",
        },
    }


def wait_status(pred: Any, timeout: float = 15) -> dict[str, Any]:
    """Poll `agentctl status --json` until ``pred(status)`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        out = agentctl("status", "--json", show=False)
        try:
            st: dict[str, Any] = json.loads(out.stdout)
        except json.JSONDecodeError:
            st = {}
        if st.get("running") and pred(st):
            return st
        if time.monotonic() > deadline:
            raise SystemExit(
                f"the agent did not reach the expected state; log: {RUN / 'agent.log'}"
            )
        time.sleep(0.2)


def main() -> int:
    """Run the demo; returns the exit status."""
    if shutil.which("mosquitto") is None:
        print("mosquitto is not installed: run `make demo` as root, or `apt-get install mosquitto`")
        return 69
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir(parents=True)
    say("1. The vendor's CA, the broker's certificate, the box's own key and certificate")
    files = make_pki()
    port = free_port()
    say(f"2. The vendor's broker: mosquitto on 127.0.0.1:{port}, mutual TLS, per-device ACL")
    broker = start_broker(files, port)
    say("3. The NOC service: PostgreSQL, noc migrate, two ingest workers, alerts, the dashboard")
    service = NocSide(RUN, files, port, free_port())
    try:
        service.start()
    except BaseException:
        service.stop()
        broker.terminate()
        raise
    service.noc("device", "add", DEVICE, "--org", "acme", "--cert", str(files["cert"]))
    noc = Noc(port, files["ca"], files["noc_cert"], files["noc_key"])
    noc.start()
    noc.ready.wait(10)
    print("  NOC subscribed to pbx/# with its own certificate")
    (RUN / "agent.yaml").write_text(yaml.safe_dump(agent_config(files, port), sort_keys=False))
    agent = None
    try:
        say("4. The agent on the sample PBX tree (tests/fixtures/pbx): agentctl run")
        agentctl("config", "check", "--quiet")
        log = (RUN / "agent.log").open("wb")
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "-c", str(RUN / "agent.yaml"), "run"],
            stdout=log,
            stderr=log,
            cwd=REPO,
            env={**os.environ, "PBX_AGENT_LOG_FORMAT": "json"},
        )
        wait_status(
            lambda s: s["uplink"].get("state") == "connected" and s["outbox"]["delivered"] >= 3
        )
        time.sleep(2)
        say("5. What the customer sees: agentctl status")
        agentctl("status")
        say("6. What left the box, as the customer can audit it")
        noc.quiet = True
        out = agentctl("audit", show=False)
        lines = out.stdout.splitlines()
        print("$ agentctl audit   (last entries)")
        print(textwrap.indent("\n".join(lines[-8:]), "  "))
        agentctl("audit", "verify")
        say("7. The customer severs the uplink: agentctl uplink off")
        noc.quiet = False
        agentctl("uplink", "off")
        time.sleep(1.0)
        st = wait_status(lambda s: True)
        print(f"  the agent says: uplink {st['uplink']['state']}; nothing more is sent")
        agentctl("config", "check", "--quiet", show=False)
        say("8. Only a local administrator turns it back on: agentctl uplink on")
        agentctl("uplink", "on")
        wait_status(lambda s: s["uplink"].get("state") == "connected")
        time.sleep(1.5)
        noc.quiet = True
        say("9. What a full configuration snapshot sends: agentctl snapshot --dry-run --full")
        out = agentctl("snapshot", "--dry-run", "--full", show=False)
        print("$ agentctl snapshot --dry-run --full | grep -m10 redacted")
        shown = [ln for ln in out.stdout.splitlines() if "<redacted:" in ln][:10]
        print(textwrap.indent("\n".join(shown) or "(nothing)", "  "))
        say("10. Call statistics the vendor receives: agentctl callstats (excerpt)")
        out = agentctl("callstats", "--since", "3650d", show=False)
        print(textwrap.indent("\n".join(out.stdout.splitlines()[:14]), "  "))
        say("11. The NOC: a command and its reply, what ingest stored, the dashboard")
        service.noc("send", DEVICE, "ping", "--as", "demo")
        time.sleep(2)
        with psycopg.connect(service.dsn) as conn:
            row = conn.execute(
                "SELECT status, envelopes, missing, (SELECT count(*) FROM snapshots s"
                " WHERE s.device_id = d.device_id AND complete_at IS NOT NULL)"
                " FROM devices d WHERE device_id = %s",
                (DEVICE,),
            ).fetchone()
        if row:
            print(
                f"  PostgreSQL has {DEVICE}: status {row[0]}, {row[1]} envelopes (each once), "
                f"{row[2]} missing, {row[3]} configuration snapshot(s) reassembled"
            )
        shots = service.screenshots(DEVICE)
        for shot in shots:
            print(f"  screenshot: {shot}")
        print(f"\nDone: the NOC received {noc.received} messages. Files: {RUN}")
        print(f"\nDashboard: {service.url}/")
        print(f"  NOC staff:  noc-admin / {PASSWORD}")
        print(f"  customer:   alice / {PASSWORD}  (Acme Dental Group: {DEVICE}, acme-pbx-02)")
        keep = os.environ.get("DEMO_KEEP")
        if keep == "1" or (keep is None and sys.stdin.isatty()):
            print("The agent, the broker and the NOC keep running: Ctrl-C stops them.", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                print()
    finally:
        service.stop()
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
        broker.terminate()
        broker.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
