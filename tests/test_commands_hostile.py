"""A hostile NOC: no payload takes the uplink down, goes unanswered or unledgered, or grows memory.

The first half drives :class:`CommandHandler` directly on a real SQLite
database (the host is the small stand-in of ``tests/test_commands.py``: the
daemon adds nothing to what is proven there). The second half floods the real
daemon through a real mosquitto with mutual TLS, as the NOC would, and reads
the replies, the ledger and the daemon's status.
"""

from __future__ import annotations

import gc
import json
import subprocess
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import strictjson
from agent.policy.classes import DataClass
from agent.uplink.commands import MAX_COMMAND_BYTES, MAX_DEPTH, MAX_ID_LENGTH, Reply
from tests.support.daemon import AgentProcess, wait_for
from tests.support.hostile import KINDS, flood, hostile_payloads, make_payload
from tests.support.mosquitto import Mosquitto
from tests.support.pki import PKI
from tests.test_commands import KNOWN, MAX_AGE, NOW, FuzzRig, Host, Rig, cmd, signed
from tests.test_uplink import DEVICE, uplink_config

# -- the handler alone ----------------------------------------------------------------------


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """A handler on tmp_path/state with every class allowed."""
    r = Rig(tmp_path / "state")
    yield r
    r.conn.close()


def answered(rig: Rig, payload: bytes, now: float = NOW) -> Reply:
    """Hand ``payload`` to the handler; assert one reply in the v1 shape and one ledger entry."""
    before = len(rig.commands())
    reply = rig.handler.handle(payload, now=now)
    body = strictjson.loads(reply.payload())  # the reply itself is strict JSON
    assert body["v"] == 1 and body["ok"] is reply.ok and body["id"] == reply.id
    assert reply.id is None or (reply.id.isprintable() and len(reply.id) <= MAX_ID_LENGTH)
    entries = rig.commands()
    assert len(entries) == before + 1
    assert entries[-1]["ok"] == reply.ok and entries[-1]["id"] == reply.id
    return reply


def still_alive(rig: Rig, now: float = NOW) -> None:
    """A well-formed command after the hostile ones is still accepted."""
    fresh = f"alive-{time.monotonic_ns()}"
    assert rig.handler.handle(signed(cmd(fresh, "ping", ts=now), now), now=now).ok


def test_overflowing_integer_ts_is_refused(rig: Rig) -> None:
    """A ts of 400 digits (past a float's range) is refused with a reply, not an OverflowError."""
    payload = b'{"v":1,"id":"big","cmd":"ping","ts":' + b"9" * 400 + b"}"
    reply = answered(rig, payload)
    assert not reply.ok and "digits" in (reply.error or "")
    assert reply.id == "big"  # still named, so the NOC can match the refusal
    still_alive(rig)


def test_lone_surrogate_id_is_refused(rig: Rig) -> None:
    """An id holding a lone surrogate (unstorable in SQLite) is refused, replied and ledgered."""
    payload = b'{"v":1,"id":"\\ud800","cmd":"ping","ts":%d}' % NOW
    reply = answered(rig, payload)
    assert not reply.ok and "surrogate" in (reply.error or "")
    assert reply.id is None
    still_alive(rig)


def test_paired_surrogates_are_fine(rig: Rig) -> None:
    """An escaped surrogate pair is one valid character: the command is accepted."""
    payload = signed(cmd("emoji-\U0001f600", "ping"))
    assert b"\\ud83d\\ude00" in payload  # json.dumps escapes it as the pair
    reply = answered(rig, payload)
    assert reply.ok and reply.id == "emoji-\U0001f600"


@pytest.mark.parametrize("field", ["id", "cmd", "ts", "v", "args"])
def test_duplicate_keys_are_refused(rig: Rig, field: str) -> None:
    """An object naming a key twice is ambiguous (which one counts?): refused, whichever key."""
    payload = b'{"v":1,"id":"dup","ts":%d,"cmd":"ping","args":{},"%s":%s}' % (
        NOW,
        field.encode(),
        json.dumps({"id": "dup", "cmd": "narrow", "ts": NOW, "v": 1, "args": None}[field]).encode(),
    )
    reply = answered(rig, payload)
    assert not reply.ok and "duplicate key" in (reply.error or "")
    assert rig.host.gate.narrowed == set()


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999"])
def test_nan_and_infinity_are_refused_anywhere(rig: Rig, token: bytes) -> None:
    """NaN and infinities (as tokens or by overflow) are not JSON numbers, in any field."""
    for where in (b'"ts":%s' % token, b'"ts":%d,"args":{"x":%s}' % (NOW, token)):
        reply = answered(rig, b'{"v":1,"id":"n","cmd":"ping",' + where + b"}")
        assert not reply.ok


@pytest.mark.parametrize("depth", [MAX_DEPTH, 999, 5_000])
def test_deep_nesting_is_refused(rig: Rig, depth: int) -> None:
    """Arguments nested deeper than the limit are refused before anything looks at them."""
    args = b"[" * depth + b"]" * depth
    reply = answered(rig, b'{"v":1,"id":"d","cmd":"collect","ts":%d,"args":%s}' % (NOW, args))
    assert not reply.ok and "nested deeper" in (reply.error or "")


def test_nul_and_control_characters(rig: Rig) -> None:
    """NUL in an id is refused; NUL in a command name is refused and written escaped."""
    assert not answered(rig, signed(cmd("a\x00", "ping"))).ok
    reply = answered(rig, signed(cmd("nul-cmd", "ping\x00")))
    assert not reply.ok and reply.cmd == "ping\\x00" and reply.id == "nul-cmd"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32", "latin-1"])
def test_only_utf8(rig: Rig, encoding: str) -> None:
    """JSON in another encoding (which json.loads would guess and accept) is refused."""
    text = json.dumps(cmd("enc", "p\u00efng"), ensure_ascii=False)
    reply = answered(rig, text.encode(encoding))
    assert not reply.ok and "UTF-8" in (reply.error or "")


def test_oversized_just_over_the_limit(rig: Rig) -> None:
    """One byte over 16 KiB is refused without being parsed (its id is not even read)."""
    body = json.dumps(cmd("o", "ping", args={"pad": ""})).encode()
    pad = b"x" * (MAX_COMMAND_BYTES + 1 - len(body))
    reply = answered(rig, body.replace(b'"pad": ""', b'"pad": "' + pad + b'"'))
    assert not reply.ok and "too large" in (reply.error or "") and reply.id is None


@pytest.mark.parametrize(
    "ts", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59", 1e308, -(10**30)]
)
def test_timestamps_out_of_range(rig: Rig, ts: Any) -> None:
    """Times a datetime cannot convert, or far out of range, are refused, not raised."""
    reply = answered(rig, signed(cmd("t", "ping", ts=ts)))
    assert not reply.ok and "sign" not in (reply.error or "")  # refused for its time


class BrokenHost(Host):
    """A host whose collector list fails: a bug in the daemon, reached by a NOC command."""

    def collectors_known(self) -> list[str]:
        """Fail as a bug would."""
        raise RuntimeError("collectors are being rebuilt")


def test_an_unforeseen_exception_is_a_refusal(tmp_path: Path) -> None:
    """Any exception type inside handling is a refusal with a reply and a ledger entry."""
    r = Rig(tmp_path / "s", BrokenHost())
    try:
        reply = answered(r, signed(cmd("u1", "collect", args={"collector": "health"})))
        assert not reply.ok and "RuntimeError" in (reply.error or "") and reply.id == "u1"
        assert r.handler.unexpected == 1
        still_alive(r)
    finally:
        r.conn.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (unmounted afterwards); skipped where mounting is not permitted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {out.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_unledgerable_command_does_not_run_and_is_answered(small_disk: Path) -> None:
    """With the state disk full, a narrow is not run, its reply says why; space back, it runs."""
    r = Rig(small_disk / "state")
    try:
        assert r.send(cmd("before", "ping")).ok
        filler = small_disk / "filler"
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True, check=False
        )
        before = len(r.commands())
        # The WAL may have room for a few more pages: send until the disk says no.
        for i in range(200):
            reply = r.send(cmd(f"full-{i}", "narrow", args={"class": "health"}))
            if not reply.ok:
                break
            r.host.gate.narrowed.clear()
        assert not reply.ok, "the full disk never refused a write"
        assert "ledger could not be written" in (reply.error or "")
        assert reply.id == f"full-{i}"
        assert r.host.gate.narrowed == set()  # not ledgered, so not run
        assert r.handler.not_ledgered == 1
        filler.unlink()
        again = r.send(cmd(f"full-{i}", "narrow", args={"class": "health"}))
        assert again.ok, again  # the id was not spent by the refusal
        assert r.host.gate.narrowed == {DataClass.HEALTH}
        assert len(r.commands()) == before + i + 1
    finally:
        r.conn.close()


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in ("ok", "replay")])
def test_every_generated_kind_is_refused(rig: Rig, kind: str) -> None:
    """Twenty payloads of each hostile kind from the flood generator: refused, replied, ledgered."""
    import random

    rng = random.Random(kind)
    for _ in range(20):
        reply = answered(rig, make_payload(kind, rng, NOW, []))
        assert not reply.ok, (kind, reply)
    still_alive(rig)


def test_memory_does_not_grow_with_hostile_commands(tmp_path: Path) -> None:
    """Three thousand hostile commands leave the Python heap where it was (nothing per command)."""
    r = FuzzRig(tmp_path / "mem")
    try:
        payloads = [p for _, p in hostile_payloads(3_500, seed=3, now=NOW)]
        for p in payloads[:500]:  # warm up caches (compiled regexes, the throttle's keys)
            r.handler.handle(p, now=NOW)
        tracemalloc.start()
        try:
            gc.collect()
            start, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            for p in payloads[500:]:
                r.handler.handle(p, now=NOW)
            gc.collect()
            end, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # What stays is bounded caches (SQLite's statements, the JSON scanner's): 35-75 KB
        # here. Keeping as little as 48 bytes per command would leave 144 KB.
        assert end - start < 128 * 1024, f"grew by {end - start} bytes"
        assert peak - start < 4 * 1024 * 1024, f"peak {peak - start} bytes above the start"
        assert r.count() == len(payloads)
    finally:
        r.conn.close()


# -- hypothesis: JSON text of every shape, well formed or not -----------------------------

_KEYS = st.sampled_from(["v", "id", "ts", "cmd", "args", "collector", "class", "", "\\u0000"])
_RAW_NUMBERS = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
    st.integers(min_value=1, max_value=6_000).map(lambda n: "9" * n),  # past every limit
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1E-400", "-0", "01"]),
)
_RAW_STRINGS = st.one_of(
    st.text(max_size=20).map(lambda s: json.dumps(s)),
    st.text(max_size=5).map(lambda s: json.dumps(s, ensure_ascii=False)),
    st.sampled_from(
        ['"\\ud800"', '"a\\udfff"', '"\\ud83d\\ude00"', '"\\u0000"', '"\\x41"', '"tab\there"', '"']
    ),
)
_RAW_LEAVES = st.one_of(
    _RAW_NUMBERS, _RAW_STRINGS, st.sampled_from(["true", "false", "null", "nul", "tru"])
)


def _render_object(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f'"{k}":{v}' for k, v in pairs) + "}"


_RAW_JSON = st.recursive(
    _RAW_LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.lists(st.tuples(_KEYS, inner), max_size=5).map(_render_object),  # duplicates likely
        st.tuples(st.integers(0, 3_000), inner, st.booleans()).map(
            lambda t: "[" * t[0] + t[1] + ("]" * t[0] if t[2] else "")
        ),
    ),
    max_leaves=10,
)
_VALID_FIELDS: dict[str, st.SearchStrategy[str]] = {
    "v": st.sampled_from(["1", "1.0", "true", '"1"', "2"]),
    "id": st.one_of(st.text(min_size=1, max_size=70).map(json.dumps), _RAW_STRINGS),
    "ts": st.one_of(
        st.floats(min_value=NOW - 2 * MAX_AGE, max_value=NOW + 120).map(repr), _RAW_NUMBERS
    ),
    "cmd": st.sampled_from(['"ping"', '"policy"', '"collect"', '"narrow"', '"uplink"', "1"]),
    "args": st.one_of(
        st.sampled_from(
            ['{"collector":"health"}', '{"class":"config"}', "{}", "null", "[]", '{"class":NaN}']
        ),
        _RAW_JSON,
    ),
}
# Most examples look like a command with some fields wrong; some are anything at all.
_COMMAND_TEXT = st.one_of(
    st.lists(
        st.sampled_from(list(_VALID_FIELDS)).flatmap(
            lambda k: _VALID_FIELDS[k].map(lambda v: (k, v))
        ),
        max_size=7,
    ).map(_render_object),
    _RAW_JSON,
)
_PAYLOADS = st.one_of(
    _COMMAND_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")),
    _COMMAND_TEXT.map(lambda t: t.encode("utf-16")),
    st.tuples(_COMMAND_TEXT, st.binary(min_size=1, max_size=4)).map(
        lambda t: t[0].encode("utf-8", "surrogatepass") + t[1]
    ),
    st.integers(MAX_COMMAND_BYTES - 64, MAX_COMMAND_BYTES + 64).map(
        lambda n: (b'{"v":1,"id":"pad","ts":1,"cmd":"ping","args":{"p":"' + b"x" * n)[:n] + b'"}}'
    ),
)


@pytest.fixture(scope="module")
def prop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzRig]:
    """One handler shared by the property test's examples."""
    r = FuzzRig(tmp_path_factory.mktemp("prop") / "state")
    yield r
    r.conn.close()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=_PAYLOADS)
def test_any_payload_gets_a_reply_and_a_ledger_entry(prop: FuzzRig, payload: bytes) -> None:
    """Whatever the bytes: one strict-JSON reply, one ledger entry, and the handler still works."""
    before = prop.count()
    reply = prop.handler.handle(payload, now=NOW)
    body = strictjson.loads(reply.payload())
    assert body["ok"] is reply.ok and body["id"] == reply.id
    assert reply.id is None or reply.id.isprintable()
    assert reply.cmd is None or (reply.cmd.isprintable() and len(reply.cmd) <= 64)
    if reply.ok:  # only what the strict parser takes can have run
        msg = strictjson.loads(payload, max_depth=MAX_DEPTH)
        assert msg["v"] == 1 and type(msg["v"]) is int and msg["cmd"] in ("ping", "policy")
    assert prop.count() == before + 1
    alive = f"alive-{prop.count()}"
    assert prop.handler.handle(signed(cmd(alive, "ping")), now=NOW).ok
    assert prop.host.gate.policy.send == frozenset(DataClass)
    assert prop.host.collected == [] or set(prop.host.collected) <= set(KNOWN)


# -- the real daemon through a real broker ---------------------------------------------------


@pytest.fixture
def linked(tmp_path: Path, pki: PKI, broker: Mosquitto) -> Iterator[AgentProcess]:
    """A daemon whose uplink is connected to the session broker."""
    cfg = uplink_config(tmp_path, pki, "localhost", broker.port)
    cfg["collectors"]["health"] = {"interval": "60s"}
    a = AgentProcess(tmp_path, cfg)
    a.start()
    wait_for(lambda: a.status()["uplink"]["state"] == "connected", timeout=15, what="connected")
    yield a
    a.close()


def ledgered_commands(agent: AgentProcess) -> list[dict[str, Any]]:
    """The daemon's "command" ledger entries, through agentctl audit."""
    out = agent.ctl("audit", "--kind", "command", "--json")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.integration
def test_hostile_flood_leaves_the_uplink_up(linked: AgentProcess, broker: Mosquitto) -> None:
    """Four hundred generated hostile commands: each replied in order and ledgered, link never
    restarted or reconnected, RSS flat, and the accepted ones among them still run."""
    assert linked.proc is not None
    proc = psutil.Process(linked.proc.pid)
    kinds, payloads = zip(*hostile_payloads(400, seed=11), strict=True)
    warm_up = [p for _, p in hostile_payloads(50, seed=12)]  # imports, caches
    flood(broker, DEVICE, warm_up, timeout=60)
    rss_before = proc.memory_info().rss
    result = flood(broker, DEVICE, list(payloads), timeout=120)
    assert result.sent == len(payloads)
    assert len(result.replies) == result.sent, f"{len(result.replies)} replies to {result.sent}"
    for kind, reply in zip(kinds, result.replies, strict=True):
        assert reply["ok"] is (kind == "ok"), (kind, reply)
    status = linked.status()
    assert status["components"]["uplink"]["restarts"] == 0
    assert status["uplink"]["connects"] == 1
    assert status["uplink"]["state"] == "connected"
    counts = status["uplink"]["commands"]
    assert counts["handled"] + counts["refused"] == 450
    assert counts["unexpected"] == 0 and counts["not_ledgered"] == 0
    assert len(ledgered_commands(linked)) == 450
    assert linked.ctl("audit", "verify").returncode == 0
    growth = proc.memory_info().rss - rss_before
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"
    tracebacks = linked.log().count("Traceback")
    assert tracebacks == 0, linked.log()[-4000:]
    lines = linked.log().splitlines()
    assert len(lines) < 40, "\n".join(lines[-40:])  # the ledger has every one; the log does not


@pytest.mark.integration
def test_packet_over_the_announced_maximum_never_arrives(
    linked: AgentProcess, broker: Mosquitto
) -> None:
    """A 100 KiB command is dropped by the broker (MQTT 5 Maximum Packet Size); the link stays."""
    big = b'{"v":1,"id":"huge","ts":1,"cmd":"ping","pad":"' + b"x" * 100_000 + b'"}'
    ping = signed(cmd("after-huge", "ping", ts=time.time()), time.time())
    result = flood(broker, DEVICE, [big, ping], timeout=15, expect_replies=False)
    wait_for(lambda: linked.status()["uplink"]["commands"]["handled"] >= 1, what="the ping handled")
    time.sleep(0.2)  # a window in which a reply to the huge command would show
    ledger = ledgered_commands(linked)
    assert [e["id"] for e in ledger] == ["after-huge"]
    assert result.sent == 2
    status = linked.status()
    assert status["uplink"]["connects"] == 1 and status["uplink"]["state"] == "connected"


@pytest.mark.integration
def test_qos0_flood_is_bounded(linked: AgentProcess, broker: Mosquitto) -> None:
    """Two thousand QoS 0 commands at once: each one replied and ledgered or counted as dropped,
    the link stays up, and the daemon's memory stays bounded."""
    import asyncio

    from agent.uplink.mqtt import LinkSettings, MqttLink
    from agent.uplink.tls import client_context

    assert linked.proc is not None
    proc = psutil.Process(linked.proc.pid)
    rss_before = proc.memory_info().rss
    n = 2_000
    pad = "x" * 8_000

    async def blast() -> None:
        noc = broker.pki.device("noc")
        ctx = client_context(broker.pki.ca_file, noc.cert, noc.key)
        c = MqttLink(LinkSettings(host=broker.host, port=broker.port, client_id="noc-blast"), ctx)
        await c.connect()
        for i in range(n):
            body = {"v": 1, "id": f"q{i}", "ts": time.time(), "cmd": "ping", "pad": pad}
            c.publish(f"pbx/{DEVICE}/cmd", signed(body, time.time()), qos=0)
        # DISCONNECT goes out after them, in order: once it is written, all of them were.
        await c.disconnect(within=30)

    asyncio.run(blast())

    def settled() -> dict[str, Any] | None:
        c = linked.status()["uplink"]["commands"]
        return c if c["handled"] + c["refused"] + c["dropped_qos0"] >= n else None

    counts = wait_for(settled, timeout=60, what="every QoS 0 command handled or dropped")
    assert counts["handled"] + counts["refused"] + counts["dropped_qos0"] == n
    assert len(ledgered_commands(linked)) == counts["handled"] + counts["refused"]
    status = linked.status()
    assert status["uplink"]["connects"] == 1 and status["components"]["uplink"]["restarts"] == 0
    assert proc.memory_info().rss - rss_before < 20 * 2**20
