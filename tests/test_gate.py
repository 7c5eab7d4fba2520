"""The policy gate: the only way a record becomes an envelope, and the only thing the outbox takes.

Real Gate, real Outbox on a real SQLite file in tmp_path; the bypass check runs
the real mypy on a snippet, because "a bypass is a type error" is a claim about
the type checker, not about run time alone.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import PolicyConfig, loads
from agent.errors import ConfigError, PolicyRefused
from agent.ledger import Ledger
from agent.outbox import Outbox
from agent.policy.classes import HARD_DENIED, DataClass, Record
from agent.policy.gate import SCHEMA_VERSION, Envelope, Gate, new_id
from agent.policy.redact import find_secret_material
from agent.policy.wire import decode_body
from agent.store import open_db

REPO = Path(__file__).resolve().parents[1]
PEM_KEY = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n"
    "-----END PRIVATE KEY-----\n"
)


class Switch:
    """The customer's switch, as a plain flag the gate reads through a callable."""

    def __init__(self) -> None:
        self.on = True

    def __call__(self) -> bool:
        return self.on


def make_gate(
    send: set[DataClass] | None = None, switch: Switch | None = None, last_seq: int = 0
) -> Gate:
    """A gate with the daemon's secret check and the given policy (default: everything)."""
    return Gate(
        policy=PolicyConfig(send=frozenset(DataClass if send is None else send)),
        switch_on=switch or Switch(),
        last_seq=last_seq,
        secret_check=find_secret_material,
    )


def health(i: int = 0) -> Record:
    """A small health record."""
    return Record(DataClass.HEALTH, {"cpu": {"percent": 1.5}, "i": i})


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """The agent's real database in tmp_path."""
    conn, moved = open_db(tmp_path / "state")
    assert moved is None
    yield conn
    conn.close()


def test_approves_allowed_class_in_v1_shape() -> None:
    """An allowed class becomes an envelope whose payload is the v1 wire shape."""
    gate = make_gate({DataClass.HEALTH})
    env = gate.approve(health(7))
    assert type(env) is Envelope
    msg = json.loads(env.payload)
    # Compressed when that is smaller (agent/policy/wire.py, tests/test_wire.py).
    fields = {"v", "id", "ts", "class", "seq", "body"}
    assert fields <= set(msg) <= fields | {"enc", "zdict"}
    assert msg["v"] == SCHEMA_VERSION == 1
    assert msg["id"] == env.id and msg["ts"] == env.ts and msg["seq"] == env.seq == 1
    assert msg["class"] == "health"
    assert decode_body(msg) == {"cpu": {"percent": 1.5}, "i": 7}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", env.ts)
    assert gate.stats()["approved"] == {"health": 1}


def test_class_not_in_policy_refused_and_counted() -> None:
    """A sendable class the customer did not list is refused with reason not-in-policy."""
    gate = make_gate({DataClass.HEALTH})
    with pytest.raises(PolicyRefused, match="not-in-policy"):
        gate.approve(Record(DataClass.CALLSTATS, {"n": 1}))
    assert gate.refused[("callstats", "not-in-policy")] == 1
    assert gate.stats()["refused"] == {"callstats:not-in-policy": 1}


@pytest.mark.parametrize("name", sorted(HARD_DENIED))
def test_hard_denied_classes_refused_whatever_the_policy(name: str) -> None:
    """A record claiming a hard-denied class is refused even with every class allowed."""
    gate = make_gate()
    record = Record(name, {"audio": "RIFF...."})  # type: ignore[arg-type]
    with pytest.raises(PolicyRefused, match="hard-denied"):
        gate.approve(record)
    assert gate.refused[(name, "hard-denied")] == 1
    assert gate.stats()["last_seq"] == 0


def test_unknown_class_string_refused() -> None:
    """A class the code does not know, even one spelt like a real one, is refused."""
    gate = make_gate()
    for name in ("sms", "health"):  # a plain str is not the DataClass enum
        with pytest.raises(PolicyRefused, match="unknown-class"):
            gate.approve(Record(name, {}))  # type: ignore[arg-type]
    assert gate.refused[("sms", "unknown-class")] == 1
    assert gate.refused[("health", "unknown-class")] == 1


@pytest.mark.parametrize("name", sorted(HARD_DENIED))
def test_hard_denied_class_in_policy_is_a_config_error(name: str) -> None:
    """Listing a hard-denied class in policy.send is a configuration error naming it."""
    with pytest.raises(ConfigError) as err:
        loads(f"device_id: pbx-1\npolicy:\n  send: [health, {name}]\n")
    assert name in str(err.value)
    assert "policy.send" in str(err.value)


def test_switch_off_refuses_and_on_resumes() -> None:
    """With the switch off every record is refused (switch-off); turning it on resumes."""
    switch = Switch()
    gate = make_gate(switch=switch)
    gate.approve(health())
    switch.on = False
    for data_class in DataClass:
        with pytest.raises(PolicyRefused, match="switch-off"):
            gate.approve(Record(data_class, {}))
    assert gate.refused[("health", "switch-off")] == 1
    assert gate.refused[("config", "switch-off")] == 1
    switch.on = True
    assert gate.approve(health()).seq == 2  # refusals consumed no sequence number


def test_narrowing_refuses_until_local_change() -> None:
    """A NOC narrow refuses that class (narrowed-by-noc) until the local policy changes."""
    gate = make_gate({DataClass.HEALTH, DataClass.CONFIG})
    gate.narrow(DataClass.HEALTH)
    assert gate.effective() == ["config"]
    with pytest.raises(PolicyRefused, match="narrowed-by-noc"):
        gate.approve(health())
    gate.approve(Record(DataClass.CONFIG, {"files": []}))
    assert gate.refused[("health", "narrowed-by-noc")] == 1
    assert gate.stats()["narrowed"] == ["health"]
    gate.set_policy(PolicyConfig(send=frozenset({DataClass.HEALTH})))
    assert gate.effective() == ["health"]
    assert gate.approve(health()).data_class is DataClass.HEALTH


def test_every_refusal_counted_by_class_and_reason() -> None:
    """Each refusal increments exactly its (class, reason) counter."""
    switch = Switch()
    gate = make_gate({DataClass.HEALTH, DataClass.CONFIG}, switch=switch)
    gate.narrow(DataClass.CONFIG)
    attempts: list[Record] = [
        Record(DataClass.CALLSTATS, {}),
        Record(DataClass.CALLSTATS, {}),
        Record(DataClass.CONFIG, {}),
        Record("voicemail", {}),  # type: ignore[arg-type]
        Record(DataClass.HEALTH, {"key": PEM_KEY}),
    ]
    for record in attempts:
        with pytest.raises(PolicyRefused):
            gate.approve(record)
    switch.on = False
    with pytest.raises(PolicyRefused):
        gate.approve(health())
    assert gate.stats()["refused"] == {
        "callstats:not-in-policy": 2,
        "config:narrowed-by-noc": 1,
        "health:secret-material": 1,
        "health:switch-off": 1,
        "voicemail:hard-denied": 1,
    }
    assert gate.stats()["approved"] == {}


def test_pem_private_key_in_body_refused() -> None:
    """A body holding a PEM private key block is refused and takes no sequence number."""
    gate = make_gate()
    with pytest.raises(PolicyRefused, match="secret material"):
        gate.approve(Record(DataClass.CONFIG, {"files": {"/etc/asterisk/keys/a.key": PEM_KEY}}))
    rsa = PEM_KEY.replace("PRIVATE KEY", "RSA PRIVATE KEY")
    with pytest.raises(PolicyRefused, match="secret material"):
        gate.approve(Record(DataClass.CONFIG, {"nested": [{"deep": rsa}]}))
    assert gate.refused[("config", "secret-material")] == 2
    assert gate.approve(Record(DataClass.CONFIG, {"note": "PRIVATE KEY rotation"})).seq == 1


def test_ids_unique_and_sort_by_time() -> None:
    """Ids are unique, 26 Crockford characters, and sorting them sorts by creation time."""
    gate = make_gate()
    envs: list[Envelope] = []
    deadline = time.monotonic() + 5
    # Span several milliseconds so that the time part of the ids really varies.
    while len({e.ts for e in envs}) < 5 and time.monotonic() < deadline:
        envs.extend(gate.approve(health(i)) for i in range(200))
    ids = [e.id for e in envs]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", i) for i in ids)
    by_id = sorted(envs, key=lambda e: e.id)
    assert [e.ts for e in by_id] == sorted(e.ts for e in envs)
    assert len({e.ts for e in envs}) >= 5
    # The time part alone orders: one millisecond later always sorts after.
    base = 1_700_000_000.0
    stamped = [new_id(base + k / 1000) for k in range(0, 2000, 7)]
    assert stamped == sorted(stamped)


def test_seq_strictly_increasing() -> None:
    """Sequence numbers go up by one per approval across classes."""
    gate = make_gate()
    seqs = [gate.approve(Record(c, {})).seq for _ in range(50) for c in DataClass]
    assert seqs == list(range(1, 151))


def test_seq_continues_after_restart(tmp_path: Path) -> None:
    """After delivery and a reopen, the gate continues from the outbox's persisted last_seq."""
    state = tmp_path / "state"
    conn, _ = open_db(state)
    outbox = Outbox(conn, Ledger(conn), max_bytes=1 << 20)
    gate = make_gate(last_seq=outbox.last_seq)
    for i in range(5):
        outbox.put(gate.approve(health(i)))
    outbox.delivered(outbox.pending(100))
    assert outbox.count == 0
    conn.close()

    conn, _ = open_db(state)
    try:
        outbox = Outbox(conn, Ledger(conn), max_bytes=1 << 20)
        assert outbox.last_seq == 5
        gate = make_gate(last_seq=outbox.last_seq)
        assert gate.approve(health()).seq == 6
    finally:
        conn.close()


def test_envelope_needs_the_gate_key() -> None:
    """Constructing an Envelope without the gate's private key raises TypeError."""
    fields: dict[str, Any] = {
        "id": new_id(),
        "ts": "2026-01-01T00:00:00.000Z",
        "data_class": DataClass.HEALTH,
        "seq": 1,
        "payload": b"{}",
    }
    with pytest.raises(TypeError, match="policy gate"):
        Envelope(object(), **fields)
    with pytest.raises(TypeError, match="policy gate"):
        Envelope(None, **fields)


def test_outbox_put_accepts_only_envelopes(db: sqlite3.Connection) -> None:
    """Outbox.put refuses dicts, bytes, look-alikes and subclasses (TypeError), storing nothing."""
    outbox = Outbox(db, Ledger(db), max_bytes=1 << 20)
    real = make_gate().approve(health())

    class LookAlike:
        def __init__(self) -> None:
            self.id, self.ts, self.seq = real.id, real.ts, real.seq
            self.data_class, self.payload = real.data_class, real.payload

    class Sub(Envelope):
        __slots__ = ()

        def __init__(self) -> None:  # skips the key check on purpose
            pass

    fakes: list[Any] = [
        {"v": 1, "id": "x", "class": "voicemail", "seq": 1, "body": {}},
        real.payload,
        LookAlike(),
        Sub(),
        None,
    ]
    for fake in fakes:
        with pytest.raises(TypeError, match="policy gate"):
            outbox.put(fake)
    assert outbox.count == 0
    assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
    outbox.put(real)
    assert outbox.count == 1


def test_approved_envelope_cannot_be_altered(db: sqlite3.Connection) -> None:
    """An approved envelope's payload cannot be replaced before it reaches the outbox."""
    outbox = Outbox(db, Ledger(db), max_bytes=1 << 20)
    env = make_gate({DataClass.HEALTH}).approve(health())
    try:
        env.payload = b'{"class":"voicemail","body":"RIFF"}'
    except AttributeError:
        return
    outbox.put(env)
    stored = outbox.pending(1)[0].payload
    assert b"voicemail" not in stored


def test_mypy_rejects_outbox_put_of_a_dict(tmp_path: Path) -> None:
    """Real mypy: an arg-type error for outbox.put({...}), none for the path through the gate."""
    snippet = tmp_path / "bypass.py"
    snippet.write_text(
        textwrap.dedent(
            """\
            from agent.policy.classes import Record
            from agent.outbox import Outbox
            from agent.policy.classes import DataClass
            from agent.policy.gate import Gate


            def through_the_gate(gate: Gate, outbox: Outbox) -> None:
                outbox.put(gate.approve(Record(DataClass.HEALTH, {"cpu": 1})))


            def bypass(outbox: Outbox) -> None:
                outbox.put({"v": 1, "id": "x", "class": "voicemail", "seq": 1, "body": {}})
            """
        )
    )
    # Measured: about 5 s without a cache, so no warm cache is needed.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            "--strict",
            str(snippet),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    assert out.returncode == 1, out.stdout + out.stderr
    assert len(errors) == 1, out.stdout
    assert f"{snippet.name}:12:" in errors[0]
    assert '"put" of "Outbox"' in errors[0] and '"Envelope"' in errors[0]
    assert errors[0].endswith("[arg-type]")


def test_withdrawn_envelope_gives_its_seq_to_the_next() -> None:
    """An envelope the outbox could not store is withdrawn: no gap in seq, counted as not-stored."""
    gate = make_gate()
    first = gate.approve(health(1))
    lost = gate.approve(health(2))
    gate.withdraw(lost)
    again = gate.approve(health(3))
    assert (first.seq, lost.seq, again.seq) == (1, 2, 2)
    assert gate.stats()["approved"] == {"health": 2}
    assert gate.stats()["refused"] == {"health:not-stored": 1}
    with pytest.raises(RuntimeError, match="only the last approved envelope"):
        gate.withdraw(first)  # not the last: withdrawing it would reuse a stored seq


# -- rules pinned one by one (the mutants `make mutation` found surviving) -----------------


def test_new_id_is_48_bits_of_milliseconds_then_80_random(monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setattr("agent.policy.gate.os.urandom", lambda n: bytes([0xFF] * n))
    crockford = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    ident = new_id(1_700_000_000.123)
    value = 0
    for ch in ident:
        value = value * 32 + crockford.index(ch)
    assert len(ident) == 26
    assert value >> 80 == 1_700_000_000_123
    assert value & ((1 << 80) - 1) == (1 << 80) - 1


def test_iso_now_is_utc_with_milliseconds() -> None:
    from agent.policy.gate import iso_now

    assert iso_now(1_700_000_000.123) == "2023-11-14T22:13:20.123Z"
    assert iso_now(1_700_000_000.9999) == "2023-11-14T22:13:20.999Z"  # truncated, like the id
    assert iso_now(0.0) == "1970-01-01T00:00:00.000Z"


def test_envelope_refusals_say_why() -> None:
    env = make_gate().approve(health())
    with pytest.raises(TypeError) as made:
        Envelope(object(), id="x", ts="t", data_class=DataClass.HEALTH, seq=1, payload=b"")
    assert str(made.value) == "an Envelope can only be made by the policy gate"
    with pytest.raises(AttributeError) as deleted:
        del env.payload
    assert str(deleted.value) == "an approved Envelope cannot be changed (payload)"


def test_approved_needs_both_the_type_and_the_seal() -> None:
    from agent.policy.gate import approved

    env = make_gate().approve(health())
    assert approved(env)
    unsealed = Envelope.__new__(Envelope)  # the constructor never ran
    assert not approved(unsealed)

    class Lookalike:
        _seal = env._seal  # type: ignore[attr-defined]

    assert not approved(Lookalike())


def test_payload_is_compact_utf8_and_refuses_nan() -> None:
    gate = make_gate()
    env = gate.approve(Record(DataClass.HEALTH, {"name": "Zürich", "list": [1, 2]}))
    assert b'"body":{"name":"Z\xc3\xbcrich","list":[1,2]}}' in env.payload
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        gate.approve(Record(DataClass.HEALTH, {"x": float("nan")}))


def test_secret_material_refusal_is_logged_with_its_class() -> None:
    from structlog.testing import capture_logs

    gate = make_gate()
    with capture_logs() as logs, pytest.raises(PolicyRefused):
        gate.approve(Record(DataClass.CONFIG, {"text": PEM_KEY}))
    (event,) = [e for e in logs if e["event"] == "gate_refused_secret_material"]
    assert event["data_class"] == "config" and event["log_level"] == "error"
    assert event["reason"]


def test_withdraw_counts_exactly() -> None:
    gate = make_gate(last_seq=10)
    for i in range(3):
        gate.approve(health(i))
    last = gate.approve(Record(DataClass.CONFIG, {"i": 1}))
    gate.withdraw(last)
    assert gate.stats()["last_seq"] == 13
    assert gate.stats()["approved"] == {"health": 3}
    again = gate.approve(Record(DataClass.HEALTH, {"i": 9}))
    gate.withdraw(again)
    assert gate.stats()["approved"] == {"health": 3}
    assert gate.stats()["refused"] == {"config:not-stored": 1, "health:not-stored": 1}
    third = gate.approve(Record(DataClass.HEALTH, {"i": 10}))
    gate.withdraw(third)
    assert gate.stats()["refused"]["health:not-stored"] == 2
