"""Links, includes and globs pointing at the voicemail spool or key files are refused, unopened.

The kernel's own audit of opens (inotify IN_OPEN/IN_ACCESS on every spool and
key folder and file) proves the files are never opened, not merely not sent.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.collectors.pbxconfig import snapshot
from agent.collectors.pbxconfig.collector import SnapshotCollector
from agent.collectors.pbxconfig.settings import SnapshotSettings
from agent.collectors.pbxconfig.sources import PathPolicy
from agent.policy.classes import Record

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "pbx"
CANARIES = ("CANARY-VOICEMAIL-7f3c9e1a", "CANARY-RECORDING-2b8d4f60", "CANARY-KEY-9d1e")
IN_ACCESS, IN_OPEN = 0x1, 0x20
PEM = (
    "-----BEGIN PRIVATE KEY-----\nCANARY-KEY-9d1e\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n"
    "-----END PRIVATE KEY-----\n"
)


class OpenAudit:
    """inotify watches for opens and reads under some trees (the OS's own audit)."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            pytest.skip("inotify is not available here")
        self.names: dict[int, str] = {}

    def watch_tree(self, top: Path) -> None:
        for d, _, files in os.walk(top):
            for p in [d, *(os.path.join(d, f) for f in files)]:
                wd = self.libc.inotify_add_watch(self.fd, p.encode(), IN_OPEN | IN_ACCESS)
                assert wd >= 0, f"cannot watch {p}"
                self.names[wd] = p
        self.events()  # walking the tree to watch it opened its folders: not the agent

    def events(self) -> list[str]:
        out: list[str] = []
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return out
        i = 0
        while i < len(data):
            wd, mask, _, length = struct.unpack_from("iIII", data, i)
            name = data[i + 16 : i + 16 + length].rstrip(b"\0").decode()
            out.append(f"{self.names.get(wd, wd)}/{name} mask={mask:#x}")
            i += 16 + length
        return out

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def audit() -> Iterator[OpenAudit]:
    a = OpenAudit()
    yield a
    a.close()


def build(base: Path) -> tuple[Path, Path, Path]:
    shutil.copytree(FIXTURES, base, dirs_exist_ok=True)
    etc = base / "etc" / "asterisk"
    spool = base / "var" / "spool" / "asterisk"
    keys = etc / "keys"
    keys.mkdir()
    (keys / "asterisk.key").write_text(PEM)
    (keys / "notes.conf").write_text("[k]\nsecret = CANARY-KEY-9d1e\n")
    return etc, spool, keys


def collect(
    etc: Path, spool: Path, state: Path, extra_roots: tuple[Path, ...] = ()
) -> list[dict[str, Any]]:
    s = SnapshotSettings(roots=(etc, *extra_roots), exclude=())
    got: list[dict[str, Any]] = []

    def emit(r: Record) -> bool:
        got.append(dict(r.body))
        return True

    asyncio.run(SnapshotCollector(s, state, forbidden=[spool]).collect(emit, reason="command"))
    return got


def manifest_of(bodies: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["path"]: e for b in bodies for e in b.get("manifest", [])}


def everything_sent(bodies: list[dict[str, Any]]) -> str:
    decoded = {}
    for b in bodies:
        decoded.update(snapshot.decode_content(b))
    return json.dumps(bodies) + json.dumps(decoded)


def test_audit_sees_an_open(tmp_path: Path, audit: OpenAudit) -> None:
    """Control: the audit does report an open of a watched spool file."""
    _, spool, _ = build(tmp_path)
    audit.watch_tree(spool)
    msg = next(spool.rglob("msg0000.txt"))
    msg.read_bytes()
    assert any("msg0000.txt" in e or str(msg) in e for e in audit.events())


def test_links_into_the_spool_and_keys_are_refused_unopened(
    tmp_path: Path, audit: OpenAudit
) -> None:
    """Symbolic links to spool files, spool folders and key files: reported, never opened."""
    etc, spool, keys = build(tmp_path)
    msg = next(spool.rglob("msg0000.txt"))
    (etc / "vm").symlink_to(spool / "voicemail")
    (etc / "msg.conf").symlink_to(msg)
    (etc / "monitor.conf").symlink_to(spool / "monitor" / "README.txt")
    (etc / "key.conf").symlink_to(keys / "asterisk.key")
    (etc / "outside.conf").symlink_to(tmp_path / "etc" / "amportal.conf")
    (etc / "relative.conf").symlink_to(Path("../../var/spool/asterisk/monitor/README.txt"))
    audit.watch_tree(spool)
    audit.watch_tree(keys)
    bodies = collect(etc, spool, tmp_path / "state")
    m = manifest_of(bodies)
    for name in ("vm", "msg.conf", "monitor.conf", "key.conf", "relative.conf"):
        assert m[str(etc / name)]["reason"] == "forbidden", name
    assert m[str(etc / "outside.conf")]["reason"] == "outside-roots"
    assert m[str(keys)]["reason"] == "forbidden"
    assert audit.events() == []
    wire = everything_sent(bodies)
    assert not [c for c in CANARIES if c in wire]


def test_includes_and_globs_into_the_spool_are_refused_unopened(
    tmp_path: Path, audit: OpenAudit
) -> None:
    """'#include' of spool or key paths, directly, relatively, by glob or via a link: refused."""
    etc, spool, keys = build(tmp_path)
    (etc / "vm").symlink_to(spool / "voicemail")
    (etc / "evil.conf").write_text(
        "[x]\n"
        f"#include {spool}/voicemail/default/1000/INBOX/msg0000.txt\n"
        "#include ../../var/spool/asterisk/monitor/README.txt\n"
        f'#tryinclude "{spool}/voicemail/*/*/INBOX/*.txt"\n'
        "#include <vm/default/1000/INBOX/msg0000.txt>\n"
        "#include keys/asterisk.key\n"
        "#include keys/*.conf\n"
    )
    audit.watch_tree(spool)
    audit.watch_tree(keys)
    bodies = collect(etc, spool, tmp_path / "state")
    entry = manifest_of(bodies)[str(etc / "evil.conf")]
    assert [i["status"] for i in entry["includes"]] == ["forbidden"] * 6
    problems = [p for p in bodies[0]["summary"]["problems"] if p["path"] == str(etc / "evil.conf")]
    assert len(problems) == 6 and all("refused: forbidden" in p["problem"] for p in problems)
    assert audit.events() == []
    assert not [c for c in CANARIES if c in everything_sent(bodies)]


def test_root_that_is_the_spool_is_refused(tmp_path: Path, audit: OpenAudit) -> None:
    """Even a configuration listing the spool as a root does not open it."""
    etc, spool, _ = build(tmp_path)
    audit.watch_tree(spool)
    got = collect(etc, spool, tmp_path / "state", extra_roots=(spool / "voicemail",))
    assert manifest_of(got)[str(spool / "voicemail")]["reason"] == "forbidden"
    assert audit.events() == []


def test_pem_key_under_an_innocent_name_is_never_sent(tmp_path: Path) -> None:
    """A config-looking file that holds a PEM private key is dropped, not redacted and sent."""
    etc, spool, _ = build(tmp_path)
    (etc / "tls.conf").write_text("[t]\nnote = inline key follows\n" + PEM)
    bodies = collect(etc, spool, tmp_path / "state")
    entry = manifest_of(bodies)[str(etc / "tls.conf")]
    assert entry["status"] == "skipped" and entry["reason"] == "key-material"
    assert "digest" not in entry
    assert "CANARY-KEY-9d1e" not in everything_sent(bodies)


def test_key_and_binary_names_are_never_opened(tmp_path: Path, audit: OpenAudit) -> None:
    """'*.key', '*.pem' and audio files inside a root are skipped by name, unopened."""
    etc, spool, _ = build(tmp_path)
    side = etc / "extra"
    side.mkdir()
    (side / "server.pem").write_text(PEM)
    (side / "greeting.wav").write_bytes(b"RIFF....WAVE")
    audit.watch_tree(side)
    bodies = collect(etc, spool, tmp_path / "state")
    m = manifest_of(bodies)
    assert m[str(side / "server.pem")]["reason"] == "key-material"
    assert m[str(side / "greeting.wav")]["reason"] == "binary"
    assert [e for e in audit.events() if "pem" in e or "wav" in e] == []


def test_built_in_spool_cannot_be_configured_away() -> None:
    """/var/spool/asterisk and the key folders are forbidden whatever the settings say."""
    policy = PathPolicy([Path("/etc/asterisk")], forbidden=[])
    assert policy.is_forbidden("/var/spool/asterisk/voicemail/default/1000/INBOX/msg0000.wav")
    assert policy.is_forbidden("/etc/asterisk/keys/asterisk.key")
    assert policy.check("/var/spool/asterisk/monitor/x.wav") == "forbidden"
    assert not policy.is_forbidden("/etc/asterisk/sip.conf")


@pytest.mark.parametrize("spelling", ["plain", "dotdot", "trailing-slash", "via-link"])
def test_forbidden_tree_deep_inside_a_root_is_refused_unopened(
    tmp_path: Path, audit: OpenAudit, spelling: str
) -> None:
    """A spool several folders below a root, however its path is spelt, is met and not opened."""
    _, spool, _ = build(tmp_path)
    named = {
        "plain": spool,
        "dotdot": tmp_path / "var" / "spool" / ".." / "spool" / "asterisk",
        "trailing-slash": Path(str(spool) + "/"),
        "via-link": tmp_path / "spool-link",
    }[spelling]
    (tmp_path / "spool-link").symlink_to(spool)
    audit.watch_tree(spool)
    s = SnapshotSettings(roots=(tmp_path / "var",), exclude=())
    got: list[dict[str, Any]] = []

    def emit(r: Record) -> bool:
        got.append(dict(r.body))
        return True

    collector = SnapshotCollector(s, tmp_path / "state", forbidden=[named])
    asyncio.run(collector.collect(emit, reason="command"))
    m = manifest_of(got)
    assert m[str(spool)]["reason"] == "forbidden"
    assert not [p for p in m if p.startswith(str(spool) + "/")]
    assert audit.events() == []
    assert not [c for c in CANARIES if c in everything_sent(got)]


def test_suffix_of_is_splitext() -> None:
    """The walker's cheap suffix is os.path.splitext's, so key names are still caught by name."""
    import itertools

    from agent.collectors.pbxconfig.sources import classify_name, suffix_of

    pieces = ["", ".", "..", "a", "key", "pem", ".pem", "x.y", "é"]
    for parts in itertools.product(pieces, repeat=3):
        name = "".join(parts)
        if name:
            assert suffix_of(name) == os.path.splitext(name)[1], name
    assert classify_name("Server.PEM") == "key-material"
    assert classify_name(".pem") is None  # a dot file named ".pem" has no suffix, as in splitext


# -- another name for the same file: hard links, bind mounts --------------------------


def test_hard_links_into_the_spool_and_keys_are_listed_unopened(
    tmp_path: Path, audit: OpenAudit
) -> None:
    """Hard links to a voicemail and a key, under innocent names: listed, never opened.

    inotify watches inodes, not names: an open through the link would show up
    on the watched spool file itself.
    """
    etc, spool, keys = build(tmp_path)
    msg = next(spool.rglob("msg0000.txt"))
    os.link(msg, etc / "greeting.conf")
    os.link(keys / "asterisk.key", etc / "tls_notes.conf")
    audit.watch_tree(spool)
    audit.watch_tree(keys)
    bodies = collect(etc, spool, tmp_path / "state")
    m = manifest_of(bodies)
    for name in ("greeting.conf", "tls_notes.conf"):
        entry = m[str(etc / name)]
        assert entry["status"] == "skipped" and entry["reason"] == "hard-link", entry
        assert "digest" not in entry
    assert audit.events() == []
    assert not [c for c in CANARIES if c in everything_sent(bodies)]


def test_link_made_between_lstat_and_open_is_not_read(tmp_path: Path) -> None:
    """A file that gains a second name after the walk's lstat is refused on its descriptor."""
    from agent.collectors.pbxconfig.sources import Skipped, _read

    f = tmp_path / "race.conf"
    f.write_text("[x]\nsecret = CANARY-RACE\n")
    st = os.stat(f, follow_symlinks=False)
    assert st.st_nlink == 1
    os.link(f, tmp_path / "spool-copy")  # what an attacker does in the window
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        got = _read(dfd, "race.conf", st, 1 << 20)
    finally:
        os.close(dfd)
    assert isinstance(got, Skipped) and got.reason == "hard-link"


@pytest.fixture
def bind_mount() -> Iterator[Any]:
    """Bind-mount a folder (root only), unmounted whatever the test does."""
    mounted: list[Path] = []

    def mount(source: Path, target: Path) -> None:
        target.mkdir(exist_ok=True)
        r = subprocess.run(
            ["mount", "--bind", str(source), str(target)], capture_output=True, check=False
        )
        if r.returncode != 0:
            pytest.skip(f"cannot bind-mount here: {r.stderr.decode().strip()}")
        mounted.append(target)

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", str(target)], check=False)


def test_bind_mount_of_the_spool_is_not_followed(
    tmp_path: Path, audit: OpenAudit, bind_mount: Any
) -> None:
    """The spool bind-mounted inside a root, or as a root itself: refused, never opened."""
    etc, spool, _ = build(tmp_path)
    bind_mount(spool / "voicemail", etc / "vmbind")
    outside = tmp_path / "looks-harmless"
    bind_mount(spool, outside)
    audit.watch_tree(spool)
    bodies = collect(etc, spool, tmp_path / "state", extra_roots=(outside,))
    m = manifest_of(bodies)
    assert m[str(etc / "vmbind")]["reason"] == "mount-point"
    assert m[str(outside)]["reason"] == "forbidden"
    assert not [p for p in m if p.startswith(str(etc / "vmbind") + "/")]
    assert audit.events() == []
    assert not [c for c in CANARIES if c in everything_sent(bodies)]


@pytest.mark.integration
def test_hard_link_canary_never_reaches_the_broker(
    tmp_path: Path, audit: OpenAudit, pki: Any, broker: Any
) -> None:
    """A real daemon over a root holding hard links into the spool: never opened, never sent.

    The NOC subscriber reassembles every configuration snapshot it receives and
    searches it, and the raw payloads, for the canaries.
    """
    from agent import control
    from agent.collectors.pbxconfig import parts
    from tests.support.daemon import AgentProcess, base_config, wait_for
    from tests.support.noc import NocListener

    etc, spool, keys = build(tmp_path / "pbx")
    vm = spool / "voicemail" / "default" / "1000" / "INBOX"
    (vm / "msg0001.wav").write_bytes(b"RIFF\0\0\0\0WAVE" + CANARIES[0].encode() * 64)
    os.link(vm / "msg0001.wav", etc / "moh_custom.conf")
    os.link(next(spool.rglob("msg0000.txt")), etc / "vm_notes.inc")
    os.link(keys / "asterisk.key", etc / "http_custom.conf")
    audit.watch_tree(spool)
    audit.watch_tree(keys)
    creds = pki.device("pbx-test-1")
    cfg = base_config(tmp_path)
    cfg["collectors"]["config"] = {
        "interval": "1h",
        "roots": [str(etc)],
        "never_read": [str(spool)],
    }
    cfg["uplink"] = {
        "broker": f"mqtts://localhost:{broker.port}",
        "ca_file": str(pki.ca_file),
        "cert_file": str(creds.cert),
        "key_file": str(creds.key),
    }
    agent = AgentProcess(tmp_path, cfg)
    try:
        with NocListener(broker, "pbx/pbx-test-1/#") as noc:
            agent.start()
            wait_for(lambda: noc.envelopes("config"), timeout=30, what="a config snapshot")
            control.request(agent.socket_path, "collect", collector="config")
            wait_for(lambda: len(noc.envelopes("config")) >= 2, timeout=30, what="a second one")
            wait_for(lambda: agent.status()["outbox"]["queued"] == 0, what="an empty outbox")
            received = noc.snapshot()
            envelopes = noc.envelopes("config")
        status = agent.status()["collectors"]["config"]
    finally:
        agent.close()
    by_id: dict[str, list[dict[str, Any]]] = {}
    for env in envelopes:
        by_id.setdefault(env["body"]["snapshot"], []).append(env["body"])
    texts: dict[str, str] = {}
    for bodies in by_id.values():
        whole = parts.reassemble(bodies)
        texts.update(whole.texts)
        for name in ("moh_custom.conf", "vm_notes.inc", "http_custom.conf"):
            entry = next(e for e in whole.entries if e["path"] == str(etc / name))
            assert entry["reason"] == "hard-link", entry
    assert texts, "no configuration content arrived at all"
    wire = b"\n".join(m.payload for m in received) + json.dumps(texts).encode()
    assert not [c for c in CANARIES if c.encode() in wire]
    assert status["skipped"]["hard-link"] == 3
    assert audit.events() == []
