"""Remote support without a network: keys, pins, the window file, sshd's log, the locks.

The locks are checked through the real command handler on a real daemon object
(its SQLite database, ledger, switch and window files), not started: a
``support.connect`` that reaches a box whose switch is off cannot be produced
over MQTT (the switch closes that connection first), so the race it stands for
is staged here by flipping the daemon's switch state under the handler.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import ledger, support_window, switch
from agent.config import loads
from agent.daemon import Daemon
from agent.errors import ConfigError, KeyFormatError, StateError
from agent.sshkeys import (
    ensure_box_key,
    parse_host_key,
    parse_public_key,
    public_key_file,
)
from agent.support_window import CloseReason, WindowState
from agent.uplink.commands import CommandHandler
from agent.uplink.signing import CommandVerifier
from agent.uplink.sshd_log import LogFollower, parse_login
from agent.uplink.support import Grant, _Session
from tests.support import signing
from tests.support.signing import signed_bytes
from tests.support.sshd import KeyPair

ED = KeyPair().public_line
HOST_KEY = KeyPair().public_line


def config_text(root: Path, **support: Any) -> str:
    """A configuration with a support section for a bastion on 127.0.0.1:2222."""
    body = {
        "bastion": {"host": "127.0.0.1", "port": 2222, "host_key": HOST_KEY},
        "services": {"ssh": "127.0.0.1:22", "web": "127.0.0.1:8080"},
        **support,
    }
    return json.dumps(
        {
            "device_id": "pbx-test-1",
            "paths": {"state_dir": str(root / "state"), "runtime_dir": str(root / "run")},
            "control": {"read_group": "nogroup", "admin_group": False},
            "collectors": {"config": {"enabled": False}, "callstats": {"enabled": False}},
            "support": body,
        }
    )


def open_window(root: Path, *, ticket: str | None = "T-1", seconds: float = 600) -> None:
    """Write an open window as `agentctl support open` would have."""
    w = support_window.new_window(
        uid=0, seconds=seconds, ticket=ticket, services=("ssh", "web"), now=time.time()
    )
    support_window.write_window(root / "state", w)


_OPEN: list[Daemon] = []


def daemon(root: Path, **support: Any) -> Daemon:
    """The daemon object (not running) for this configuration; released after the test."""
    d = Daemon(loads(config_text(root, **support), root / "agent.yaml"))
    _OPEN.append(d)
    return d


def release(d: Daemon) -> None:
    """What a stopping daemon lets go of: its database and its state-directory lock."""
    if d in _OPEN:
        _OPEN.remove(d)
        d.db.close()
        d.lock.release()


@pytest.fixture(autouse=True)
def _release_daemons() -> Iterator[None]:
    """Release the daemon objects a test made (one daemon per state directory)."""
    yield
    for d in list(_OPEN):
        release(d)


def handler_for(d: Daemon) -> CommandHandler:
    """The NOC command handler as the uplink session makes it."""
    return CommandHandler(
        conn=d.db,
        ledger=d.ledger,
        host=d,
        max_age=300,
        switch_word=lambda: d.switch.word,
        verifier=CommandVerifier(signing.root_pub(), "pbx-test-1"),
    )


def send(h: CommandHandler, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
    """One command through the handler; the reply as the NOC gets it."""
    payload = {"v": 1, "id": f"c{time.monotonic_ns()}", "ts": time.time(), "cmd": cmd}
    body = signed_bytes({**payload, "args": args}, "pbx-test-1")
    return dict(json.loads(h.handle(body).payload()))


def support_events(d: Daemon) -> list[dict[str, Any]]:
    """The support entries of the daemon's ledger."""
    return [e.data for e in ledger.read(d.db, kind="support")]


# -- the locks -----------------------------------------------------------------------------


def test_connect_refused_when_the_switch_is_off(tmp_path: Path) -> None:
    """A support.connect that slips in as the switch goes off is refused, replied and ledgered."""
    open_window(tmp_path)
    d = daemon(tmp_path)
    d.switch = switch.SwitchState(on=False)
    reply = send(handler_for(d), "support.connect", {"ticket": "T-1", "ports": {"web": 40080}})
    assert reply["ok"] is False and "switch is off" in reply["error"]
    refused = [e for e in support_events(d) if e["event"] == "connect_refused"]
    assert len(refused) == 1 and "switch" in refused[0]["reason"]
    commands = [e.data for e in ledger.read(d.db, kind="command")]
    assert commands[-1]["ok"] is False and commands[-1]["cmd"] == "support.connect"


def test_connect_accepted_names_the_configured_bastion_only(tmp_path: Path) -> None:
    """Inside the window the reply names the bastion from the configuration, whatever is sent."""
    open_window(tmp_path)
    d = daemon(tmp_path)
    h = handler_for(d)
    for foreign in ({"host": "203.0.113.5"}, {"bastion": "evil:22"}, {"port": 22}):
        reply = send(h, "support.connect", {"ticket": "T-1", "ports": {"web": 40080}, **foreign})
        assert reply["ok"] is False and "never from a command" in reply["error"]
    ok = send(h, "support.connect", {"ticket": "T-1", "ports": {"web": 40080, "ssh": 40022}})
    assert ok["ok"] is True
    assert ok["result"]["bastion"] == "127.0.0.1:2222"
    assert ok["result"]["ports"] == {"web": 40080, "ssh": 40022}


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({"ticket": "T-2", "ports": {"web": 40080}}, "ticket"),
        ({"ports": {"web": 40080}}, "ticket"),
        ({"ticket": "T-1", "ports": {}}, '"ports"'),
        ({"ticket": "T-1", "ports": {"db": 40080}}, "not in the customer's window"),
        ({"ticket": "T-1", "ports": {"web": 0}}, "1 to 65535"),
        ({"ticket": "T-1", "ports": {"web": True}}, "1 to 65535"),
        ({"ticket": "T-1", "ports": {"web": "40080"}}, "1 to 65535"),
        ({"ticket": "T-1", "ports": {"web": 40080, "ssh": 40080}}, "named twice"),
        ({"ticket": "T-1", "ports": {"web": 40080}, "key": ED}, 'needs the "ssh" service'),
        ({"ticket": "T-1", "ports": {"ssh": 40022}, "key": "ssh-rsa AAAA"}, "not a usable"),
        ({"ticket": ["T-1"], "ports": {"web": 40080}}, "string"),
    ],
)
def test_connect_arguments_are_checked(tmp_path: Path, args: dict[str, Any], error: str) -> None:
    """Each malformed or foreign support.connect is refused with a reason, and ledgered."""
    open_window(tmp_path)
    d = daemon(tmp_path)
    reply = send(handler_for(d), "support.connect", args)
    assert reply["ok"] is False and error in reply["error"], reply
    assert support_events(d)[-1]["event"] == "connect_refused"


def test_no_window_no_connect(tmp_path: Path) -> None:
    """Without a window, an expired one, or an unreadable window file: refused."""
    d = daemon(tmp_path)
    h = handler_for(d)
    assert "no support window" in send(h, "support.connect", {"ports": {"web": 1}})["error"]
    (tmp_path / "state" / support_window.WINDOW_FILE).write_text("{not json")
    release(d)
    d2 = daemon(tmp_path)
    assert d2.support.window is None and "corrupt" in str(d2.support.window_error)
    assert send(handler_for(d2), "support.connect", {"ports": {"web": 1}})["ok"] is False


def test_start_closes_a_window_the_switch_or_the_clock_ended(tmp_path: Path) -> None:
    """A daemon starting with the switch off, or after the window's end, closes and ledgers it."""
    open_window(tmp_path)
    switch.write_switch(tmp_path / "state", False, uid=0, via="agentctl")
    d = daemon(tmp_path)
    assert d.support.window is not None and d.support.window.close_reason is CloseReason.SWITCH
    assert support_events(d)[-1] == {
        "event": "window_close",
        "reason": "switch",
        "uid": None,
        "via": "daemon",
        "window": d.support.window.id,
    }
    release(d)
    other = tmp_path / "other"
    w = support_window.new_window(uid=0, seconds=1, ticket=None, services=("web",), now=1000.0)
    support_window.write_window(other / "state", w)
    d2 = daemon(other)
    assert d2.support.window is not None
    assert d2.support.window.state is WindowState.CLOSED
    assert d2.support.window.close_reason is CloseReason.EXPIRED
    stored = support_window.read_window(other / "state").window
    assert stored is not None and stored.close_reason is CloseReason.EXPIRED


def test_support_not_configured_refuses(tmp_path: Path) -> None:
    """A box without a support section refuses support.connect, and says why."""
    text = json.loads(config_text(tmp_path))
    del text["support"]
    d = Daemon(loads(json.dumps(text), tmp_path / "agent.yaml"))
    _OPEN.append(d)
    reply = send(handler_for(d), "support.connect", {"ports": {"web": 1}})
    assert reply["ok"] is False and "not configured" in reply["error"]


def test_authorized_keys_line_is_restricted_and_expires_with_the_window(tmp_path: Path) -> None:
    """The one-time key is answered with restrict,pty, from=, expiry-time at the window's end."""
    until = time.time() + 3600
    w = support_window.new_window(
        uid=0, seconds=3600, ticket="T", services=("ssh",), now=until - 3600
    )
    support_window.write_window(tmp_path / "state", w)
    d = daemon(tmp_path)
    ctl = d.support
    assert ctl.authorized_keys("pbx-support") == []  # a window but no session
    key = parse_public_key(ED + " vendor@noc\n")
    grant = Grant("s-1", "T", {"ssh": 40022}, key, "c1", time.time())
    ctl._session = _Session(grant=grant, window_id=w.id)  # as _start_session leaves it
    (line,) = ctl.authorized_keys("pbx-support")
    minute = int(-(-w.until // 60) * 60)
    expiry = time.strftime("%Y%m%d%H%M", time.gmtime(minute))
    assert line == (
        f'restrict,pty,from="127.0.0.1",expiry-time="{expiry}Z" {key.type} {key.base64} '
        "pbx-support-s-1"
    )
    assert ctl.authorized_keys("root") == []
    ctl._close_window(CloseReason.CLOSED, uid=0)
    assert ctl.authorized_keys("pbx-support") == []


# -- keys ----------------------------------------------------------------------------------


def test_box_key_is_ed25519_openssh_0600(tmp_path: Path) -> None:
    """The box's key is made on the box: Ed25519, OpenSSH format, 0600; ssh-keygen agrees."""
    path = tmp_path / "support" / "id_ed25519"
    public, made = ensure_box_key(path, "pbx-agent@pbx-test-1")
    assert made is True
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(path)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert derived[:2] == [public.type, public.base64] and public.type == "ssh-ed25519"
    assert public_key_file(path).read_text().startswith(f"ssh-ed25519 {public.base64} ")
    again, made_again = ensure_box_key(path, "pbx-agent@pbx-test-1")
    assert again == public and made_again is False
    printed = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(public_key_file(path))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert public.fingerprint in printed


def test_box_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    """A support key that group or others can read is refused, as ssh refuses it."""
    path = tmp_path / "id_ed25519"
    ensure_box_key(path, "x")
    path.chmod(0o640)
    with pytest.raises(StateError, match="chmod 600"):
        ensure_box_key(path, "x")


def _blob(*fields: bytes) -> str:
    return base64.b64encode(b"".join(struct.pack(">I", len(f)) + f for f in fields)).decode()


WEAK_RSA = _blob(b"ssh-rsa", bytes([1, 0, 1]), bytes([1]) * 128)
_REFUSALS = {
    "options before the key are not accepted",
    "one line",
    "not base64",
    "says 'ssh-ed25519', not 'ssh-rsa'",
    "32-byte",
    "truncated",
    "too weak",
    "unsupported key type",
    "TYPE BASE64",
}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (f'command="/bin/sh" {ED}', "options before the key are not accepted"),
        (f"restrict {ED}", "options before the key are not accepted"),
        (f"{ED} x\n{ED}", "one line"),
        (f"{ED}\rcommand", "one line"),
        ("ssh-ed25519 !!!notbase64", "not base64"),
        (f"ssh-rsa {ED.split()[1]}", "says 'ssh-ed25519', not 'ssh-rsa'"),
        (f"ssh-ed25519 {_blob(b'ssh-ed25519', b'short')}", "32-byte"),
        (f"ssh-ed25519 {ED.split()[1][:-8]}", "truncated"),
        (f"ssh-rsa {WEAK_RSA}", "too weak"),
        (f"ssh-dss {ED.split()[1]}", "unsupported key type"),
        ("ssh-ed25519", "TYPE BASE64"),
    ],
    # The key is made at import: ids must not carry it, or parallel workers collect
    # different test names.
    ids=lambda value: value if value in _REFUSALS else "key",
)
def test_public_keys_are_refused_unless_plain(text: str, error: str) -> None:
    """Anything but one plain TYPE BASE64 [comment] of a sound key is refused, saying why."""
    with pytest.raises(KeyFormatError, match=_re(error)):
        parse_public_key(text)


def _re(text: str) -> str:
    import re

    return re.escape(text)


def test_a_key_is_rewritten_from_its_parts() -> None:
    """What reaches sshd is rebuilt from the decoded key: a comment cannot carry anything."""
    key = parse_public_key(f'{ED} evil"comment,command=x')
    assert key.line('x"\ny, command="z') == f"{key.type} {key.base64} xycommandz"
    assert key.fingerprint.startswith("SHA256:") and len(key.fingerprint) == 50


def test_known_hosts_lines_must_name_the_bastion(tmp_path: Path) -> None:
    """A known_hosts pin names the host as OpenSSH does: [host]:port, wildcards, hashed, !."""
    pin = parse_host_key(f"[127.0.0.1]:2222 {HOST_KEY}")
    assert pin.matches_host("127.0.0.1", 2222) and not pin.matches_host("127.0.0.1", 2223)
    assert parse_host_key(f"bastion.example {HOST_KEY}").matches_host("bastion.example", 22)
    assert not parse_host_key(f"bastion.example {HOST_KEY}").matches_host("bastion.example", 2)
    assert parse_host_key(f"*.example,!evil.example {HOST_KEY}").matches_host("b.example", 22)
    assert not parse_host_key(f"*.example,!evil.example {HOST_KEY}").matches_host(
        "evil.example", 22
    )
    assert parse_host_key(HOST_KEY).hosts is None
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:2222 {HOST_KEY}\n")
    subprocess.run(["ssh-keygen", "-H", "-f", str(known)], capture_output=True, check=True)
    hashed = parse_host_key(known.read_text().strip().splitlines()[-1])
    assert hashed.hosts is not None and hashed.hosts[0].startswith("|1|")
    assert hashed.matches_host("127.0.0.1", 2222) and not hashed.matches_host("127.0.0.1", 22)
    with pytest.raises(KeyFormatError, match="@cert-authority"):
        parse_host_key(f"@cert-authority * {HOST_KEY}")


# -- configuration -------------------------------------------------------------------------


def test_support_configuration_errors_name_file_key_and_line(tmp_path: Path) -> None:
    """Every mistake in the support section is reported at once with its key path and line."""
    text = f"""\
device_id: pbx-test-1
support:
  bastion:
    host: "bad host"
    port: 70000
    host_key: "[127.0.0.1]:2223 {HOST_KEY}"
  services:
    Web: 127.0.0.1:80
    db: localhost
  max_window: 30d
  keepalive_deadline: soon
  extra: 1
"""
    with pytest.raises(ConfigError) as info:
        loads(text, Path("/etc/pbx-agent/agent.yaml"))
    problems = {p.key: (p.line, p.reason) for p in info.value.problems}
    assert problems["support.bastion.host"][0] == 4
    assert problems["support.bastion.port"][0] == 5
    assert problems["support.services.Web"][0] == 8
    assert "HOST:PORT" in problems["support.services.db"][1]
    assert problems["support.max_window"] == (10, "must be at most 7d, got 30d")
    assert "duration" in problems["support.keepalive_deadline"][1]
    assert "unknown key" in problems["support.extra"][1]
    assert all(str(p).startswith("/etc/pbx-agent/agent.yaml:") for p in info.value.problems)


def test_known_hosts_pin_for_another_port_is_a_config_error(tmp_path: Path) -> None:
    """A known_hosts line for another host or port than the bastion's is refused at load."""
    text = config_text(tmp_path).replace(HOST_KEY, f"[127.0.0.1]:2223 {HOST_KEY}")
    with pytest.raises(ConfigError, match=r"support\.bastion\.host_key.*\[127\.0\.0\.1\]:2222"):
        loads(text)


def test_support_defaults(tmp_path: Path) -> None:
    """Defaults: 4h windows, the device's own bastion account, the key in the state dir."""
    cfg = loads(config_text(tmp_path)).support
    assert cfg is not None
    assert cfg.max_window == 4 * 3600 and cfg.bastion_user == "pbx-test-1"
    assert cfg.key_file == tmp_path / "state" / "support" / "id_ed25519"
    assert cfg.account == "pbx-support" and cfg.service_names == ("ssh", "web")


# -- the window file and sshd's log --------------------------------------------------------


def test_window_file_round_trip_and_corruption(tmp_path: Path) -> None:
    """The window survives a reread whole; a corrupt file is no window, with the reason."""
    w = support_window.new_window(uid=5, seconds=60, ticket="T-1", services=("web",), now=100.0)
    support_window.write_window(tmp_path, w)
    assert support_window.read_window(tmp_path).window == w
    assert oct(os.stat(support_window.window_path(tmp_path)).st_mode & 0o777) == "0o644"
    closed = w.closed(CloseReason.CLOSED, uid=5, via="agentctl", at=120.0)
    support_window.write_window(tmp_path, closed)
    assert support_window.read_window(tmp_path).window == closed
    support_window.window_path(tmp_path).write_text('{"id": 1}')
    read = support_window.read_window(tmp_path)
    assert read.window is None and "corrupt" in str(read.error)


def test_sshd_log_lines_and_rotation(tmp_path: Path) -> None:
    """Accepted-key lines are read as they are appended; a rotated log is read from its start."""
    line = (
        "Accepted publickey for pbx-support from 127.0.0.1 port 51234 ssh2: ED25519 "
        "SHA256:LWq4oREuRxJFRO1AcZY1A4Pu/mL2yJgQZmHfeEL0wpw"
    )
    login = parse_login(f"Dec  1 18:40:01 pbx sshd[812]: {line}")
    assert login is not None and login.user == "pbx-support" and login.port == 51234
    assert login.fingerprint == "SHA256:LWq4oREuRxJFRO1AcZY1A4Pu/mL2yJgQZmHfeEL0wpw"
    assert parse_login("Failed publickey for pbx-support from 127.0.0.1 port 1 ssh2") is None
    log = tmp_path / "auth.log"
    log.write_text(f"old {line}\n")
    follower = LogFollower(log)
    assert follower.logins() == []  # what was there before the session does not count
    with log.open("a") as f:
        f.write(f"new {line}\npartial {line[:20]}")
    assert len(follower.logins()) == 1
    with log.open("a") as f:
        f.write(f"{line[20:]}\n")
    assert len(follower.logins()) == 1  # the partial line, now complete
    log.rename(tmp_path / "auth.log.1")
    log.write_text(f"rotated {line}\n")
    assert len(follower.logins()) == 1


def test_shipped_support_example_is_valid() -> None:
    """The commented support section of etc/agent.yaml, uncommented, is a valid configuration."""
    text = (Path(__file__).resolve().parents[1] / "etc" / "agent.yaml").read_text()
    block = text[text.index("# support:") :].splitlines()
    lines = [ln[2:] for ln in block if ln.startswith("# ") and not ln.startswith("#   # ")]
    example = "\n".join(lines).replace('"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA..."', HOST_KEY)
    cfg = loads("device_id: pbx-0001\n" + example).support
    assert cfg is not None and cfg.bastion == "bastion.vendor.example:22"
    assert cfg.service_names == ("ssh", "web") and cfg.max_window == 4 * 3600
