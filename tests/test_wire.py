"""Envelope bodies travel compressed when that is smaller, and every receiver reads them back."""

from __future__ import annotations

import base64
import json
import random
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.policy import wire
from agent.policy.classes import DataClass, Record
from agent.policy.gate import Gate
from agent.policy.settings import PolicyConfig
from noc import wire as noc_wire
from noc.store import Rejected, parse_envelope

HEALTH = {
    "cpu": {"percent": 3.5, "count": 2},
    "load": [0.31, 0.22, 0.2],
    "memory": {"total": 4_126_412_800, "available": 3_021_139_968, "percent": 26.8},
    "swap": {"total": 0, "used": 0, "percent": 0.0},
    "disks": [
        {"mount": "/", "fstype": "ext4", "total": 41_555_521_536, "used": 9e9, "percent": 22}
    ],
    "uptime": 86_400,
    "net": {"errin": 0, "errout": 0, "dropin": 12, "dropout": 0},
    "agent": {"pid": 812, "rss": 30_000_000, "cpu_percent": 0.0, "threads": 4, "switch": "on"},
    "pbx": {"state": "not_configured", "reason": None, "processes": {}},
}


def gate() -> Gate:
    return Gate(policy=PolicyConfig(send=frozenset(DataClass)), switch_on=lambda: True, last_seq=0)


def test_the_noc_holds_the_agents_dictionaries_byte_for_byte() -> None:
    """A preset dictionary is part of the wire protocol: the NOC's copy is the agent's."""
    assert noc_wire.DICTIONARIES == wire.DICTIONARIES
    assert noc_wire.ENCODING == wire.ENCODING


def test_health_is_compressed_with_its_dictionary_and_reads_back() -> None:
    """A health envelope is far smaller than its JSON, and the NOC's parser gets the body."""
    env = gate().approve(Record(DataClass.HEALTH, HEALTH))
    plain = len(json.dumps(HEALTH, separators=(",", ":")))
    msg = json.loads(env.payload)
    assert msg["enc"] == "zlib+base64" and msg["zdict"] == "health/1"
    assert len(msg["body"]) < plain / 2  # base64 included
    assert wire.decode_body(msg) == HEALTH
    assert parse_envelope("pbx-test-1", "health", env.payload).body == HEALTH


def test_a_body_compression_would_not_shrink_stays_plain_json() -> None:
    """Small or incompressible bodies are sent as they were: a JSON object under "body"."""
    g = gate()
    for body in ({"a": 1}, {"blob": base64.b64encode(random.Random(1).randbytes(1024)).decode()}):
        msg = json.loads(g.approve(Record(DataClass.CALLSTATS, body)).payload)
        assert "enc" not in msg and msg["body"] == body


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(list(DataClass)),
    st.dictionaries(
        st.text(max_size=12),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=40),
            lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner),
            max_leaves=30,
        ),
        max_size=12,
    ),
)
def test_any_body_reads_back_identical(data_class: DataClass, body: dict[str, object]) -> None:
    """Whatever the gate sends, plain or compressed, both receivers decode the same body."""
    msg = json.loads(gate().approve(Record(data_class, body)).payload)
    assert wire.decode_body(msg) == body == noc_wire.decode_body(msg)


def _env(body: str, **extra: str) -> bytes:
    fields = {"v": 1, "id": "x1", "ts": "2026-12-01T00:00:00Z", "class": "health", "seq": 1}
    return json.dumps({**fields, "enc": "zlib+base64", **extra, "body": body}).encode()


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (_env("not base64!"), "cannot be decoded"),
        (_env(base64.b64encode(b"not zlib").decode()), "cannot be decoded"),
        (_env(base64.b64encode(zlib.compress(b"{}")).decode(), zdict="health/9"), "dictionary"),
        (_env(base64.b64encode(zlib.compress(b"{}")[:-3]).decode()), "truncated"),
        (
            _env(base64.b64encode(zlib.compress(b"[" + b"0," * (9 * 2**20) + b"0]")).decode()),
            "over",
        ),
    ],
)
def test_the_noc_rejects_bodies_it_cannot_decode(payload: bytes, why: str) -> None:
    """Bad base64, not zlib, an unknown dictionary, a cut stream, a bomb: rejected, named."""
    with pytest.raises(Rejected, match=why):
        parse_envelope("pbx-test-1", "health", payload)
