"""NOC commands: only the allow-listed ones run, nothing widens, every one is in the ledger.

The handler runs on a real SQLite database with a real Gate; the "host" is a
small class standing in for the daemon (it only records collect requests),
because the daemon itself needs an event loop and a control socket that add
nothing to what is proven here.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent import ledger
from agent.config import PolicyConfig
from agent.errors import PolicyRefused
from agent.ledger import Ledger
from agent.policy.classes import HARD_DENIED, DataClass, Record
from agent.policy.gate import Gate
from agent.store import open_db
from agent.uplink.commands import (
    ALLOWED,
    FUTURE_SKEW,
    MAX_COMMAND_BYTES,
    MAX_DEPTH,
    MAX_ID_LENGTH,
    CommandHandler,
    Reply,
)
from agent.uplink.signing import CommandVerifier
from tests.support import signing

MAX_AGE = 300.0
NOW = 1_800_000_000.0
KNOWN = ["callstats", "health"]
DEVICE = "pbx-test-1"


def signed(msg: dict[str, Any], now: float = NOW, device: str = DEVICE) -> bytes:
    """``msg`` signed as the NOC signs it, with a command key valid around ``now``."""
    return json.dumps(signing.sign(msg, device, now=now)).encode()


def verifier() -> CommandVerifier:
    """The verifier of a box called DEVICE that pins the test root."""
    return CommandVerifier(signing.root_pub(), DEVICE)


class Host:
    """What a command may touch: a real gate, and collectors that only note being asked."""

    def __init__(self, send: frozenset[DataClass] = frozenset(DataClass)) -> None:
        self.switch = True
        self.gate = Gate(policy=PolicyConfig(send=send), switch_on=lambda: self.switch, last_seq=0)
        self.collected: list[str] = []
        self.updates = "notify"
        self.update_requests = 0

    def collectors_known(self) -> list[str]:
        """Names a ``collect`` may name."""
        return list(KNOWN)

    def collect_now(self, name: str) -> None:
        """Record the request."""
        self.collected.append(name)

    def update_setting(self) -> str:
        """The box's ``updates:``."""
        return self.updates

    def request_update_check(self) -> None:
        """Record the request (the daemon touches the update unit's request file)."""
        self.update_requests += 1


class Rig:
    """A handler over a database file, re-creatable as after a restart."""

    def __init__(self, state: Path, host: Host | None = None) -> None:
        self.state = state
        self.host = host or Host()
        self.conn, _ = open_db(state)
        self.ledger = Ledger(self.conn)
        self.handler = self._handler()
        self.last_size = 0

    def _handler(self) -> CommandHandler:
        return CommandHandler(
            conn=self.conn,
            ledger=self.ledger,
            host=self.host,
            max_age=MAX_AGE,
            switch_word=lambda: "on" if self.host.switch else "off",
            verifier=verifier(),
        )

    def restart(self) -> None:
        """Close and reopen the database and make a new handler, as a daemon restart would."""
        self.conn.close()
        self.conn, _ = open_db(self.state)
        self.ledger = Ledger(self.conn)
        self.handler = self._handler()

    def send(self, msg: dict[str, Any] | bytes, now: float = NOW) -> Reply:
        """Hand one payload to the handler: a dict signed as the NOC signs, bytes as they are."""
        payload = msg if isinstance(msg, bytes) else signed(msg, now)
        self.last_size = len(payload)
        return self.handler.handle(payload, now=now)

    def commands(self) -> list[dict[str, Any]]:
        """The ledger's "command" entries' data."""
        return [e.data for e in ledger.read(self.conn, kind="command")]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """A handler on tmp_path/state with every class allowed."""
    r = Rig(tmp_path / "state")
    yield r
    r.conn.close()


def cmd(cmd_id: str, name: str, args: Any = None, ts: Any = NOW, **extra: Any) -> dict[str, Any]:
    """A command message in the v1 shape."""
    msg: dict[str, Any] = {"v": 1, "id": cmd_id, "ts": ts, "cmd": name, **extra}
    if args is not None:
        msg["args"] = args
    return msg


def refused(reply: Reply, fragment: str) -> None:
    """Assert an error reply whose message contains ``fragment`` and a v1 error payload."""
    assert reply.ok is False, reply
    assert reply.error is not None and fragment in reply.error, reply.error
    body = json.loads(reply.payload())
    assert body["ok"] is False and body["v"] == 1 and body["error"] == reply.error
    assert "result" not in body


# -- each refusal -------------------------------------------------------------------------


def test_too_large(rig: Rig) -> None:
    """A payload over the limit is refused before it is parsed."""
    big = json.dumps(cmd("big", "ping", args={"pad": "x" * MAX_COMMAND_BYTES})).encode()
    reply = rig.send(big)
    refused(reply, "too large")
    assert reply.id is None


@pytest.mark.parametrize("payload", [b"", b"\xff\xfe\x00", b"{", b"ping", b'{"v":1,}'])
def test_not_json(rig: Rig, payload: bytes) -> None:
    """Bytes that are not JSON (or not UTF-8) get an error reply."""
    refused(rig.send(payload), "not acceptable JSON")


@pytest.mark.parametrize("payload", [b"[1,2]", b'"ping"', b"1", b"null", b"true"])
def test_not_an_object(rig: Rig, payload: bytes) -> None:
    """JSON that is not an object gets an error reply."""
    refused(rig.send(payload), "JSON object")


@pytest.mark.parametrize("bad_id", [None, "", 7, ["a"], "x" * (MAX_ID_LENGTH + 1)])
def test_bad_id(rig: Rig, bad_id: Any) -> None:
    """A missing, empty, non-string or overlong id is refused; the reply carries no id."""
    msg = cmd("x", "ping")
    if bad_id is None:
        del msg["id"]
    else:
        msg["id"] = bad_id
    reply = rig.send(msg)
    refused(reply, '"id"')
    assert reply.id is None


@pytest.mark.parametrize("version", [2, 0, "1", None, "missing"])
def test_wrong_version(rig: Rig, version: Any) -> None:
    """Anything but "v": 1 is refused."""
    msg = cmd("v", "ping")
    if version == "missing":
        del msg["v"]
    else:
        msg["v"] = version
    reply = rig.send(msg)
    refused(reply, "version")
    assert reply.id == "v"


@pytest.mark.parametrize(
    "name", ["uplink_on", "uplink", "switch", "widen", "allow", "support.open", "PING", ""]
)
def test_unknown_command(rig: Rig, name: str) -> None:
    """Commands outside the allow-list are refused, naming the allowed ones."""
    refused(rig.send(cmd("u", name, args={"state": "on"})), "not allowed")


def test_cmd_not_a_string(rig: Rig) -> None:
    """A non-string cmd is refused."""
    refused(rig.send(cmd("n", 5)), '"cmd"')  # type: ignore[arg-type]


def test_too_old(rig: Rig) -> None:
    """A command older than command_max_age is refused; one just inside is accepted."""
    refused(rig.send(cmd("old", "ping", ts=NOW - MAX_AGE - 1)), "too old")
    assert rig.send(cmd("fresh", "ping", ts=NOW - MAX_AGE + 1)).ok


def test_from_the_future(rig: Rig) -> None:
    """A command stamped beyond the allowed clock skew is refused."""
    refused(rig.send(cmd("fut", "ping", ts=NOW + FUTURE_SKEW + 5)), "future")
    assert rig.send(cmd("skew", "ping", ts=NOW + FUTURE_SKEW - 5)).ok


@pytest.mark.parametrize("ts", [True, "yesterday", None, [NOW], {"t": NOW}, ""])
def test_bad_timestamp(rig: Rig, ts: Any) -> None:
    """A ts that is not a time is refused."""
    refused(rig.send(cmd("t", "ping", ts=ts)), '"ts"')


def test_iso_timestamp_accepted(rig: Rig) -> None:
    """An ISO 8601 ts with Z is read as UTC."""
    iso = datetime.fromtimestamp(NOW - 10, UTC).isoformat().replace("+00:00", "Z")
    assert rig.send(cmd("iso", "ping", ts=iso)).ok
    old = datetime.fromtimestamp(NOW - 3600, UTC).isoformat().replace("+00:00", "Z")
    refused(rig.send(cmd("iso-old", "ping", ts=old)), "too old")


@pytest.mark.parametrize(
    ("name", "args", "fragment"),
    [
        ("ping", [1], '"args"'),
        ("ping", "x", '"args"'),
        ("collect", {}, "unknown collector"),
        ("collect", {"collector": "recordings"}, "unknown collector"),
        ("collect", {"collector": 5}, "unknown collector"),
        ("narrow", {}, "unknown data class"),
        ("narrow", {"class": "voicemail"}, "unknown data class"),
        ("narrow", {"class": ["health"]}, "unknown data class"),
    ],
)
def test_bad_args(rig: Rig, name: str, args: Any, fragment: str) -> None:
    """Malformed or unknown arguments are refused and change nothing."""
    refused(rig.send(cmd("a", name, args=args)), fragment)
    assert rig.host.collected == []
    assert rig.host.gate.narrowed == set()


def test_replay_refused(rig: Rig) -> None:
    """The same id twice: the second is refused as a replay and does not run."""
    assert rig.send(cmd("once", "collect", args={"collector": "health"})).ok
    refused(rig.send(cmd("once", "collect", args={"collector": "health"})), "replay")
    assert rig.host.collected == ["health"]


def test_replay_refused_across_restart(rig: Rig) -> None:
    """An id handled before a restart is still refused after it (the seen ids are on disk)."""
    assert rig.send(cmd("persist", "ping")).ok
    rig.restart()
    refused(rig.send(cmd("persist", "ping", ts=NOW + 1), now=NOW + 2), "replay")
    assert rig.send(cmd("other", "ping", ts=NOW + 1), now=NOW + 2).ok


# -- each allowed command -------------------------------------------------------------------


def test_ping(rig: Rig) -> None:
    """ping answers pong with a time, in the v1 reply shape."""
    before = time.time()
    reply = rig.send(cmd("p", "ping"))
    assert reply.ok and reply.cmd == "ping"
    body = json.loads(reply.payload())
    assert set(body) == {"v", "id", "ok", "result"}
    assert body["id"] == "p" and body["ok"] is True
    assert before <= body["result"]["pong"] <= time.time()


def test_policy_reports_effective_policy(tmp_path: Path) -> None:
    """policy reports the local send list, what is effective after narrowing, and the switch."""
    r = Rig(tmp_path / "s", Host(frozenset({DataClass.HEALTH, DataClass.CONFIG})))
    try:
        r.host.gate.narrow(DataClass.CONFIG)
        r.host.switch = False
        reply = r.send(cmd("pol", "policy"))
        assert reply.ok
        assert reply.result == {
            "send": ["config", "health"],
            "effective": ["health"],
            "narrowed": ["config"],
            "switch": "off",
        }
    finally:
        r.conn.close()


def test_collect_runs_the_named_collector(rig: Rig) -> None:
    """collect asks the host to run exactly the named collector."""
    reply = rig.send(cmd("c", "collect", args={"collector": "callstats"}))
    assert reply.ok and reply.result == {"collecting": "callstats"}
    assert rig.host.collected == ["callstats"]


def test_update_check_asks_and_never_forces(rig: Rig) -> None:
    """update.check only requests a check; with updates: off on the box it is refused."""
    reply = rig.send(cmd("u1", "update.check"))
    assert reply.ok and reply.result == {"requested": "check", "updates": "notify"}
    assert rig.host.update_requests == 1
    rig.host.updates = "off"
    refused = rig.send(cmd("u2", "update.check"))
    assert not refused.ok and "updates: off" in (refused.error or "")
    assert rig.host.update_requests == 1


def test_narrow_only_narrows(tmp_path: Path) -> None:
    """narrow removes a class from what is sent; it never adds one, whatever the args say."""
    r = Rig(tmp_path / "s", Host(frozenset({DataClass.HEALTH, DataClass.CONFIG})))
    try:
        gate = r.host.gate
        reply = r.send(
            cmd("n1", "narrow", args={"class": "health", "send": ["callstats"], "switch": "on"})
        )
        assert reply.ok and reply.result == {"narrowed": "health", "effective": ["config"]}
        with pytest.raises(PolicyRefused, match="narrowed-by-noc"):
            gate.approve(Record(DataClass.HEALTH, {}))
        # Narrowing a class that was never allowed does not make it allowed.
        assert r.send(cmd("n2", "narrow", args={"class": "callstats"})).ok
        assert gate.effective() == ["config"]
        with pytest.raises(PolicyRefused, match="not-in-policy"):
            gate.approve(Record(DataClass.CALLSTATS, {}))
        assert gate.policy.send == frozenset({DataClass.HEALTH, DataClass.CONFIG})
    finally:
        r.conn.close()


def test_no_command_turns_the_switch_on_or_widens(rig: Rig) -> None:
    """With the switch off, no command sequence turns it on or makes the gate approve anything."""
    rig.host.switch = False
    gate = rig.host.gate
    attempts: list[dict[str, Any]] = [
        cmd(f"w{i}", name, args=args)
        for i, (name, args) in enumerate(
            [
                ("uplink", {"state": "on"}),
                ("switch", {"on": True}),
                ("policy", {"send": ["health", "config", "callstats", "voicemail"]}),
                ("narrow", {"class": "health", "undo": True}),
                ("ping", {"switch": "on"}),
                ("collect", {"collector": "health", "force": True}),
                ("widen", {"class": "voicemail"}),
                ("policy", {"set": {"switch": "on"}}),
            ]
        )
    ]
    for msg in attempts:
        rig.send(msg)
    assert rig.host.switch is False
    assert rig.send(cmd("last", "policy")).result["switch"] == "off"
    for data_class in DataClass:
        with pytest.raises(PolicyRefused):
            gate.approve(Record(data_class, {}))
    rig.host.switch = True  # the local administrator: narrowing still holds
    assert gate.effective() == ["callstats", "config"]
    for name in HARD_DENIED:
        with pytest.raises(PolicyRefused, match="hard-denied"):
            gate.approve(Record(name, {}))  # type: ignore[arg-type]


def test_every_command_has_exactly_one_ledger_entry(rig: Rig) -> None:
    """Accepted or refused, each payload adds one "command" entry with its id, cmd, ok, size."""
    payloads: list[dict[str, Any] | bytes] = [
        cmd("l1", "ping"),
        cmd("l1", "ping"),
        b"\x00garbage",
        cmd("l2", "narrow", args={"class": "config"}),
        cmd("l3", "nope"),
        cmd("l4", "ping", ts=NOW - 10_000),
    ]
    replies, sizes = [], []
    for p in payloads:
        replies.append(rig.send(p))
        sizes.append(rig.last_size)
    entries = rig.commands()
    assert len(entries) == len(payloads)
    for entry, reply, size in zip(entries, replies, sizes, strict=True):
        assert entry["id"] == reply.id and entry["ok"] == reply.ok
        assert entry["size"] == size
        assert entry.get("error") == reply.error
    assert [e["ok"] for e in entries] == [True, False, False, True, False, False]
    assert ledger.verify(rig.conn).ok
    assert rig.handler.handled == 2 and rig.handler.refused == 4


# -- payloads that must not escape handle() ----------------------------------------------


def test_deeply_nested_json_gets_error_reply(rig: Rig) -> None:
    """A 10 KiB run of '[' (valid size, too deep to parse) gets an error reply, not an exception."""
    refused(rig.send(b"[" * 10_000), "JSON")
    assert len(rig.commands()) == 1


def test_huge_integer_gets_error_reply(rig: Rig) -> None:
    """A ts of 5,000 digits gets an error reply, not an exception."""
    payload = b'{"v":1,"id":"big","cmd":"ping","ts":' + b"9" * 5000 + b"}"
    refused(rig.send(payload), "")
    assert len(rig.commands()) == 1


def test_nan_timestamp_refused(rig: Rig) -> None:
    """A ts of NaN is not a time: refused, so the age check cannot be sidestepped."""
    reply = rig.send(b'{"v":1,"id":"nan","ts":NaN,"cmd":"ping"}')
    assert not reply.ok


def test_version_true_refused(rig: Rig) -> None:
    """ "v": true is not protocol version 1."""
    assert not rig.send(cmd("vt", "ping", v=True)).ok


# -- hypothesis: arbitrary input never escapes, and only well-formed input is accepted -------


class FuzzRig(Rig):
    """One handler shared by every example (opening a database per example is the slow part).

    It remembers the ids it accepted past the checks, as the handler does, so that
    the expectation for a replay holds across examples too.
    """

    def __init__(self, state: Path) -> None:
        super().__init__(state)
        self.conn.execute("PRAGMA synchronous=OFF")  # durability is not under test here
        self.seen: set[str] = set()

    def count(self) -> int:
        """How many "command" entries the ledger holds."""
        return int(
            self.conn.execute("SELECT COUNT(*) FROM ledger WHERE kind = 'command'").fetchone()[0]
        )


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzRig]:
    """The shared handler for the hypothesis tests."""
    r = FuzzRig(tmp_path_factory.mktemp("fuzz") / "state")
    yield r
    r.conn.close()


json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**12), max_value=10**12)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)
ts_values = (
    st.floats(min_value=NOW - 2 * MAX_AGE, max_value=NOW + 2 * FUTURE_SKEW)
    | st.floats(min_value=NOW - 2 * MAX_AGE, max_value=NOW + 2 * FUTURE_SKEW).map(
        lambda t: datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")
    )
    | st.sampled_from([math.inf, -math.inf, "yesterday", "", True, False, None, 0])
    | json_value
)
arbitrary_commands = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 2, 0, 1.0, "1", None, True]) | json_value,
        "id": st.text(min_size=0, max_size=MAX_ID_LENGTH + 2) | json_value,
        "ts": ts_values,
        "cmd": st.sampled_from([*ALLOWED, "uplink", "switch", ""]) | json_value,
        "args": st.sampled_from(
            [
                {"collector": "health"},
                {"collector": "nope"},
                {"class": "health"},
                {"class": "voicemail"},
                {},
                None,
            ]
        )
        | json_value,
    },
)


well_formed_commands = st.fixed_dictionaries(
    {
        "v": st.just(1),
        "id": st.text(
            st.characters(categories=["L", "N", "P", "S"]), min_size=1, max_size=MAX_ID_LENGTH
        ),
        "ts": st.floats(min_value=NOW - MAX_AGE + 1, max_value=NOW + FUTURE_SKEW - 1),
        "cmd": st.sampled_from(ALLOWED),
    },
    optional={
        "args": st.sampled_from(
            [{"collector": "health"}, {"collector": "nope"}, {"class": "config"}, {}, None]
        )
    },
)
# One field of a well-formed command replaced by anything: the interesting border.
mutated_commands = st.tuples(
    well_formed_commands, st.sampled_from(["v", "id", "ts", "cmd", "args"]), json_value
).map(lambda t: {**t[0], t[1]: t[2]})
commands = well_formed_commands | mutated_commands | arbitrary_commands


def _time_of(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value.endswith("Z") and "T" in value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _strict(value: Any, depth: int = 0) -> bool:
    """Finite numbers only, nested at most MAX_DEPTH containers deep."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict | list):
        children = value.values() if isinstance(value, dict) else value
        return depth < MAX_DEPTH and all(_strict(c, depth + 1) for c in children)
    return True


def _passes_checks(msg: dict[str, Any]) -> bool:
    """The protocol's rules for a command, written independently of the handler."""
    if not _strict(msg):
        return False
    ident = msg.get("id")
    if not (isinstance(ident, str) and 1 <= len(ident) <= MAX_ID_LENGTH and ident.isprintable()):
        return False
    version = msg.get("v")
    if type(version) is not int or version != 1:  # an integer 1: not true, not 1.0
        return False
    if msg.get("cmd") not in ALLOWED:
        return False
    ts = _time_of(msg.get("ts"))
    if ts is None or NOW - ts > MAX_AGE or ts - NOW > FUTURE_SKEW:
        return False
    args = msg.get("args", {})
    return args is None or isinstance(args, dict)


def _runs(msg: dict[str, Any]) -> bool:
    args = msg.get("args") or {}
    if msg["cmd"] == "collect":
        return args.get("collector") in KNOWN
    if msg["cmd"] == "narrow":
        return args.get("class") in {c.value for c in DataClass}
    # This host has no remote support (tests/test_support.py has): support.* is refused.
    return not msg["cmd"].startswith("support.")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=st.lists(st.binary(max_size=200) | st.just(b"{}"), min_size=1, max_size=5))
def test_arbitrary_bytes_never_escape(fuzz: FuzzRig, payloads: list[bytes]) -> None:
    """Arbitrary bytes always yield an error Reply and one ledger entry each, never an exception."""
    before = fuzz.count()
    for payload in payloads:
        reply = fuzz.handler.handle(payload, now=NOW)
        assert isinstance(reply, Reply) and reply.ok is False
        assert json.loads(reply.payload())["ok"] is False
    assert fuzz.count() == before + len(payloads)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=st.lists(commands, min_size=1, max_size=6))
def test_arbitrary_commands_accepted_only_when_well_formed(
    fuzz: FuzzRig, msgs: list[dict[str, Any]]
) -> None:
    """JSON-ish commands never raise; ok is True exactly for well-formed, fresh, valid ones."""
    before = fuzz.count()
    for msg in msgs:
        # Signed, so that what is checked after the signature is what varies here.
        try:
            payload = signed(msg)
        except ValueError:  # not finite: cannot be signed (nor is it acceptable JSON)
            payload = json.dumps(msg).encode()
        reply = fuzz.handler.handle(payload, now=NOW)
        assert isinstance(reply, Reply)
        body = json.loads(reply.payload())
        assert body["ok"] is reply.ok
        expect = _passes_checks(msg) and msg["id"] not in fuzz.seen
        if expect:
            fuzz.seen.add(msg["id"])  # remembered once past the checks, even if it then fails
            expect = _runs(msg)
        assert reply.ok is expect, (msg, reply)
        error = reply.error or ""
        event("accepted" if reply.ok else "replay" if "replay" in error else error[:16])
    assert fuzz.count() == before + len(msgs)
    assert fuzz.host.gate.policy.send == frozenset(DataClass)
