"""The strict JSON reader: takes what json.dumps makes of plain values, refuses the rest clearly."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import MalformedJSON
from agent.strictjson import loads, printable

plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**31), max_value=10**31)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=20,
)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


@given(value=plain)
def test_round_trip(value: Any) -> None:
    """Any plain value json.dumps writes (within the depth limit) reads back equal."""
    text = json.dumps(value, ensure_ascii=False).encode()
    if _depth(value) > 16:
        with pytest.raises(MalformedJSON, match="nested deeper"):
            loads(text)
    else:
        assert loads(text) == value


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"a":1,"a":2}', "duplicate key 'a'"),
        (b"[NaN]", "NaN is not a JSON number"),
        (b"[-Infinity]", "-Infinity is not a JSON number"),
        (b"[1e400]", "out of range"),
        (b"[" + b"1" * 33 + b"]", "more than 32 digits"),
        (b"-" + b"1" * 5000, "more than 32 digits"),
        (b'["\\udc00"]', "lone surrogate"),
        (b'{"\\ud800":1}', "lone surrogate"),
        (b'["\xff"]', "not UTF-8 (invalid byte at offset 2)"),
        ('["x"]'.encode("utf-16"), "not UTF-8"),
        (b"[" * 17 + b"]" * 17, "nested deeper than 16"),
        (b"[" * 100_000, "nested deeper than 16"),
        (b"{", "not JSON"),
        (b"", "not JSON"),
    ],
)
def test_refusals_say_why(data: bytes, reason: str) -> None:
    """Each way of being unacceptable is one MalformedJSON whose message names it."""
    with pytest.raises(MalformedJSON) as caught:
        loads(data)
    assert reason in str(caught.value)
    assert len(str(caught.value)) < 120


def test_limits_are_the_callers() -> None:
    """Depth and integer length are parameters."""
    assert loads(b"[[1]]", max_depth=2) == [[1]]
    with pytest.raises(MalformedJSON):
        loads(b"[[1]]", max_depth=1)
    assert loads(b"123456", max_int_digits=6) == 123456
    with pytest.raises(MalformedJSON):
        loads(b"1234567", max_int_digits=6)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("ping", "ping"),
        ("p\x00ng", "p\\x00ng"),
        ("\ud800", "\\ud800"),
        ("\u202eevil", "\\u202eevil"),
        ("caf\u00e9", "caf\u00e9"),
        ("x" * 100, "x" * 64),
    ],
)
def test_printable(text: str, shown: str) -> None:
    """Untrusted text is cut and its non-printable characters escaped; the rest kept."""
    assert printable(text) == shown
    assert printable(text).isprintable()
