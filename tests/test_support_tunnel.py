"""Remote support end to end: a real OpenSSH bastion, the daemon, the NOC over MQTT, a service."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import wait_for
from tests.support.mosquitto import Mosquitto
from tests.support.pki import PKI
from tests.support.sshd import (
    SUPPORT_USER,
    KeyPair,
    SshdUnavailable,
    ensure_user,
    private_root,
    remove_user,
    require_sshd,
)
from tests.support.support_rig import SupportRig, as_user, refuses, round_trip

pytestmark = pytest.mark.integration


@pytest.fixture
def rig_factory(pki: PKI, broker: Mosquitto) -> Iterator[Callable[..., SupportRig]]:
    """Make support rigs in a root-owned folder (sshd's StrictModes); all closed afterwards."""
    try:
        require_sshd()
    except SshdUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    made: list[SupportRig] = []
    with private_root() as root:

        def make(**kwargs: Any) -> SupportRig:
            rig = SupportRig(root / f"r{len(made)}", pki, broker, **kwargs)
            made.append(rig)
            return rig

        try:
            yield make
        finally:
            for rig in made:
                rig.close()


def test_data_flows_through_the_tunnel_and_is_accounted(
    rig_factory: Callable[..., SupportRig],
) -> None:
    """Inside the window the vendor reaches the service; every channel and byte is in the ledger."""
    rig = rig_factory().start()
    assert rig.support_status()["paramiko_loaded"] is False
    rig.open_window("10m", ticket="T-100")
    reply = rig.connect(ticket="T-100")
    assert reply["ok"] is True, reply
    rig.wait_usable()
    payload = bytes(range(256)) * 4096  # 1 MiB
    assert round_trip(rig.ports["web"], payload) == payload
    st = wait_for(
        lambda: (s := rig.support_status())["session"]["bytes_to_vendor"] >= len(payload) and s,
        what="byte counts",
    )
    assert st["paramiko_loaded"] is True
    sess = st["session"]
    assert sess["state"] == "up" and sess["ticket"] == "T-100"
    assert sess["bytes_from_vendor"] >= len(payload)
    assert any(c["service"] == "web" for c in sess["channels"])
    out = rig.agent.ctl("support", "close")
    assert out.returncode == 0, out.stderr
    rig.wait_refused()
    events = [e["event"] for e in rig.ledger()]
    for ev in (
        "window_open",
        "session_start",
        "tunnel_up",
        "channel_open",
        "channel_close",
        "window_close",
        "tunnel_down",
        "session_end",
    ):
        assert ev in events, (ev, events)
    end = rig.ledger("session_end")[-1]
    assert end["bytes_to_vendor"] >= len(payload) and end["bytes_from_vendor"] >= len(payload)


def test_connect_refused_without_window_with_wrong_ticket_or_foreign_address(
    rig_factory: Callable[..., SupportRig],
) -> None:
    """No window, another ticket, a service outside the window, an address: refused, ledgered."""
    rig = rig_factory(services=("web", "admin")).start()
    no_window = rig.connect(ticket="T-1")
    assert no_window["ok"] is False and "no support window" in no_window["error"]
    rig.open_window("10m", ticket="T-1", services=["web"])
    wrong = rig.connect(ticket="T-2", ports={"web": rig.ports["web"]})
    assert wrong["ok"] is False and "ticket" in wrong["error"]
    missing = rig.connect(ports={"web": rig.ports["web"]})
    assert missing["ok"] is False and "ticket" in missing["error"]
    outside = rig.connect(ticket="T-1", ports={"admin": rig.ports["admin"]})
    assert outside["ok"] is False and "not in the customer's window" in outside["error"]
    address = rig.connect(ticket="T-1", ports={"web": rig.ports["web"]}, host="203.0.113.9")
    assert address["ok"] is False and "never from a command" in address["error"]
    zero = rig.connect(ticket="T-1", ports={"web": 0})
    assert zero["ok"] is False
    refusals = rig.ledger("connect_refused")
    assert len(refusals) == 6
    commands = rig.agent.ctl("audit", "--kind", "command", "--json").stdout.splitlines()
    assert sum('"ok": false' in c for c in commands) == 6
    assert rig.bastion.clients() == 0  # not even a TCP connection to the bastion
    assert rig.support_status()["session"] is None


def up(rig: SupportRig, *, ticket: str | None = None, duration: str = "10m") -> None:
    """Open a window, send support.connect, wait until the forwarded port works."""
    rig.open_window(duration, ticket=ticket)
    reply = rig.connect(**({"ticket": ticket} if ticket else {}))
    assert reply["ok"] is True, reply
    rig.wait_usable()


def test_switch_off_closes_the_tunnel_and_the_window(
    rig_factory: Callable[..., SupportRig],
) -> None:
    """`uplink off` cuts the tunnel within 1 s and closes the window; support needs a new one."""
    rig = rig_factory().start()
    up(rig)
    out = rig.agent.ctl("uplink", "off")
    assert out.returncode == 0, out.stderr
    assert rig.wait_refused(timeout=1.0) < 1.0
    st = rig.support_status()
    assert st["window"]["open"] is False and st["window"]["close_reason"] == "switch"
    assert st["session"]["live"] is False
    assert rig.ledger("session_end")[-1]["reason"] == "uplink switch off"
    refused = rig.agent.ctl("support", "open", "--for", "1h")
    assert refused.returncode == 69 and "switch is off" in refused.stderr
    assert rig.agent.ctl("uplink", "on").returncode == 0
    wait_for(rig.online, timeout=15, what="online again")
    again = rig.connect()
    assert again["ok"] is False and "no support window" in again["error"]


def test_window_end_closes_the_tunnel(rig_factory: Callable[..., SupportRig]) -> None:
    """When the window's time is up, the forwarded port refuses within 1 s of its end."""
    rig = rig_factory().start()
    up(rig, duration="6s")
    until = rig.support_status()["window"]["until"]
    wait_for(lambda: time.time() >= until, timeout=10, what="the window's end")
    assert rig.wait_refused(timeout=1.0) < 1.0
    assert time.time() - until < 1.0 + 0.5  # measured from the end, polling included
    assert rig.ledger("window_close")[-1]["reason"] == "expired"
    assert rig.ledger("session_end")[-1]["reason"] == "support window ended"
    late = rig.connect()
    assert late["ok"] is False and "no support window" in late["error"]


def test_daemon_stop_closes_the_tunnel_and_the_window_survives(
    rig_factory: Callable[..., SupportRig],
) -> None:
    """SIGTERM cuts the tunnel within 1 s; after a restart the window is still open, no tunnel."""
    rig = rig_factory().start()
    up(rig, ticket="T-7")
    window = rig.support_status()["window"]
    t0 = time.monotonic()
    rig.agent.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    wait_for(lambda: refuses(rig.ports["web"]), timeout=1.0, interval=0.01, what="refused")
    assert time.monotonic() - t0 < 1.0
    assert rig.agent.proc.wait(timeout=10) == 0  # type: ignore[union-attr]
    rig.agent.start()
    st = rig.support_status()
    assert st["window"]["id"] == window["id"] and st["window"]["open"] is True
    assert st["session"] is None and refuses(rig.ports["web"])
    assert rig.ledger("session_end")[-1]["reason"] == "daemon stopping"
    wait_for(rig.online, timeout=15, what="online again")
    assert rig.connect(ticket="T-7")["ok"] is True
    rig.wait_usable()


def test_changed_bastion_host_key_is_refused(rig_factory: Callable[..., SupportRig]) -> None:
    """A bastion showing another host key than the pinned one gets no login and no forward."""
    rig = rig_factory()
    rig.bastion.new_host_key()  # the configuration still pins the old one
    rig.start()
    rig.open_window("10m")
    assert rig.connect()["ok"] is True
    failed = wait_for(lambda: rig.ledger("tunnel_failed"), timeout=15, what="tunnel_failed")
    assert "host key" in failed[0]["error"] and "pinned" in failed[0]["error"]
    end = wait_for(lambda: rig.ledger("session_end"), timeout=5, what="session_end")
    assert "host key" in end[0]["reason"]
    assert "Accepted publickey" not in rig.bastion.log()
    assert rig.bastion.clients() == 1  # one try, not a retry loop against a suspect server
    assert refuses(rig.ports["web"])


def test_dead_bastion_is_noticed_and_the_tunnel_comes_back(
    rig_factory: Callable[..., SupportRig],
) -> None:
    """A frozen bastion is noticed within the keepalive deadline; a restarted one is rejoined."""
    rig = rig_factory().start()
    up(rig)
    # Frozen, not killed: TCP stays up and only an unanswered keepalive can tell (#2326).
    frozen_at = time.time()
    rig.bastion.freeze()
    down = wait_for(lambda: rig.ledger("tunnel_down"), timeout=10, what="tunnel_down")
    assert "keepalive" in down[0]["reason"]
    # Noticed (the ledger entry's time) within keepalive_interval 1s + keepalive_deadline 1s.
    noticed = down[0]["ts"] - frozen_at
    assert noticed < 2.0 + 0.5, noticed  # and the loop's scheduling on a loaded machine
    rig.bastion.kill()
    rig.bastion.start()
    wait_for(lambda: len(rig.ledger("tunnel_up")) >= 2, timeout=20, what="the tunnel back")
    rig.wait_usable()
    # Killed outright: the connection's end is noticed at once, and the tunnel returns again.
    rig.bastion.kill()
    wait_for(lambda: len(rig.ledger("tunnel_down")) >= 2, timeout=5, what="second tunnel_down")
    rig.bastion.start()
    wait_for(lambda: len(rig.ledger("tunnel_up")) >= 3, timeout=20, what="the tunnel back again")
    rig.wait_usable()
    assert rig.support_status()["session"]["connects"] == 3


def test_idle_tunnel_closes(rig_factory: Callable[..., SupportRig]) -> None:
    """With no channel and no byte for support.idle_timeout, the session ends by itself."""
    rig = rig_factory(support={"idle_timeout": "3s"}).start()
    up(rig)
    end = wait_for(lambda: rig.ledger("session_end"), timeout=15, what="idle session_end")
    assert end[0]["reason"].startswith("idle")
    assert refuses(rig.ports["web"])
    assert rig.support_status()["window"]["open"] is True  # the customer's window stays


@pytest.fixture
def support_account() -> Iterator[str]:
    """The restricted local account vendor logins use (made for the test, removed after)."""
    made = ensure_user(SUPPORT_USER)
    try:
        yield SUPPORT_USER
    finally:
        if made:
            remove_user(SUPPORT_USER)


def ssh_login(port: int, key: Path, user: str) -> subprocess.CompletedProcess[str]:
    """Log in with OpenSSH's client as the vendor would and run ``id -un``."""
    return subprocess.run(
        [
            "ssh",
            "-p",
            str(port),
            "-i",
            str(key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=5",
            f"{user}@127.0.0.1",
            "id -un",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_vendor_login_works_inside_the_window_only(
    rig_factory: Callable[..., SupportRig], support_account: str, tmp_path: Path
) -> None:
    """The one-time key logs in through the tunnel inside the window (ledgered); after it, no."""
    rig = rig_factory(services=("ssh", "web"), box_sshd=True).start()
    assert rig.box is not None
    vendor = KeyPair()
    key_file = vendor.write_private(tmp_path / "vendor_key")
    keys = rig.agent.ctl("support", "authorized-keys", support_account)
    assert keys.returncode == 0 and keys.stdout == ""  # no window: no key
    rig.open_window("10m", ticket="T-9")
    assert rig.connect(ticket="T-9", key=vendor.public_line)["ok"] is True
    wait_for(lambda: not refuses(rig.ports["ssh"]), timeout=15, what="the ssh forward")
    line = rig.agent.ctl("support", "authorized-keys", support_account).stdout.strip()
    assert line.startswith('restrict,pty,from="127.0.0.1",expiry-time="')
    assert vendor.public_line.split()[1] in line
    assert rig.agent.ctl("support", "authorized-keys", "root").stdout == ""
    login = ssh_login(rig.ports["ssh"], key_file, support_account)
    assert login.returncode == 0, login.stderr + rig.box.log()[-2000:]
    assert login.stdout.strip() == support_account
    logins = wait_for(lambda: rig.ledger("login"), timeout=10, what="the login in the ledger")
    assert logins[0]["fingerprint"] == vendor.fingerprint
    assert logins[0]["user"] == support_account
    st = rig.support_status()["session"]
    assert st["logins"][0]["fingerprint"] == vendor.fingerprint
    assert any(c["service"] == "ssh" for c in st["channels"])
    assert rig.agent.ctl("support", "close").returncode == 0
    rig.wait_refused("ssh")
    # Straight to the box's sshd (from 127.0.0.1, as through the tunnel): the key is gone.
    after = ssh_login(rig.box.port, key_file, support_account)
    assert after.returncode == 255 and "Permission denied" in after.stderr
    assert rig.agent.ctl("support", "authorized-keys", support_account).stdout == ""


def test_who_may_do_what(rig_factory: Callable[..., SupportRig]) -> None:
    """The read group sees support status and keys; only an admin opens or closes a window."""
    rig = rig_factory().start()
    cfg = str(rig.agent.config_path)
    nobody, nogroup = 65534, 65534  # nogroup is the configured read_group
    code, out = as_user(nobody, nogroup, "-c", cfg, "support", "open", "--for", "1h")
    assert code == 77
    assert rig.support_status()["window"] is None
    rig.open_window("1h")
    code, out = as_user(nobody, nogroup, "-c", cfg, "support", "status", "--json")
    assert code == 0 and json.loads(out)["window"]["open"] is True
    assert as_user(nobody, nogroup, "-c", cfg, "support", "close")[0] == 77
    assert rig.support_status()["window"]["open"] is True
    assert as_user(nobody, nogroup, "-c", cfg, "support", "authorized-keys", "x") == (0, "")
    assert as_user(nobody, nogroup, "-c", cfg, "support", "key") == (0, rig.box_key + "\n")
    assert as_user(1, 1, "-c", cfg, "support", "status")[0] == 77  # not in the read group


def test_idle_daemon_does_not_load_paramiko(rig_factory: Callable[..., SupportRig]) -> None:
    """With support configured and a window open but no tunnel, paramiko is not even loaded."""
    rig = rig_factory().start()
    rig.open_window("10m")
    pid = rig.agent.proc.pid  # type: ignore[union-attr]
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert rig.support_status()["paramiko_loaded"] is False
    assert "/nacl/" not in maps  # PyNaCl's libsodium comes only with paramiko
    assert rig.connect()["ok"] is True
    rig.wait_usable()
    assert rig.support_status()["paramiko_loaded"] is True
    assert "/nacl/" in Path(f"/proc/{pid}/maps").read_text()


def test_window_is_capped_and_can_be_extended_without_dropping_the_vendor(
    rig_factory: Callable[..., SupportRig],
) -> None:
    """--for beyond support.max_window is cut to it; reopening with the same ticket keeps the
    tunnel, reopening for another ticket ends it."""
    rig = rig_factory(support={"max_window": "2m"}).start()
    t0 = time.time()
    out = rig.open_window("10h", ticket="T-1")
    assert "capped at 2m" in out.stdout
    until = rig.support_status()["window"]["until"]
    assert t0 + 110 < until <= time.time() + 120
    assert rig.connect(ticket="T-1")["ok"] is True
    rig.wait_usable()
    rig.open_window("1m", ticket="T-1")  # changed its mind about the length: same ticket
    assert rig.support_status()["session"]["live"] is True
    assert round_trip(rig.ports["web"], b"still here") == b"still here"
    rig.open_window("1m", ticket="T-2")
    rig.wait_refused()
    assert "does not cover" in rig.ledger("session_end")[-1]["reason"]


def test_noc_disconnect_ends_the_session(rig_factory: Callable[..., SupportRig]) -> None:
    """support.disconnect closes the tunnel; the customer's window stays open."""
    rig = rig_factory().start()
    up(rig)
    reply = rig.command("support.disconnect", {})
    assert reply["ok"] is True and reply["result"]["disconnected"]
    rig.wait_refused()
    assert rig.support_status()["window"]["open"] is True


def test_close_without_the_daemon_is_ledgered_at_its_start(
    rig_factory: Callable[..., SupportRig],
) -> None:
    """`support close` works with the daemon down; the daemon ledgers it when it starts."""
    rig = rig_factory().start()
    rig.open_window("1h")
    assert rig.agent.stop()[0] == 0
    out = rig.agent.ctl("support", "close")
    assert out.returncode == 0 and "daemon not running" in out.stdout
    status = json.loads(rig.agent.ctl("support", "status", "--json").stdout)
    assert status["daemon_running"] is False and status["window"]["open"] is False
    rig.agent.start()
    closes = rig.ledger("window_close")
    assert len(closes) == 1 and closes[0]["via"] == "agentctl" and closes[0]["uid"] == 0
    wait_for(rig.online, timeout=15, what="online again")  # a command before it would be lost
    assert rig.connect()["ok"] is False
