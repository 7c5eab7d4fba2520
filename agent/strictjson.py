"""JSON from people we do not trust: the NOC's commands and local control requests.

``json.loads`` accepts more than a peer should send and fails in more ways than
``JSONDecodeError``: integers past ``sys.int_max_str_digits`` raise
``ValueError``, deep nesting ``RecursionError``, ``NaN`` and ``Infinity`` parse
into floats that poison comparisons, duplicate keys silently keep the last,
bytes are read as UTF-16 or UTF-32 when they look like it, and an escaped lone
surrogate (``"\\ud800"``) becomes a string that SQLite and UTF-8 writers refuse
later, far from here. :func:`loads` takes the I-JSON subset (RFC 7493) with
bounds, and every way it refuses is one exception, :class:`MalformedJSON`, whose
message says what was wrong. Work is linear in the input, whose size the
caller bounds before calling.
"""

from __future__ import annotations

import json
import math
from typing import Any

from agent.errors import MalformedJSON

DEFAULT_MAX_DEPTH = 16
DEFAULT_MAX_INT_DIGITS = 32


def loads(
    data: bytes,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_int_digits: int = DEFAULT_MAX_INT_DIGITS,
) -> Any:
    """Parse ``data`` (UTF-8 JSON) or raise :class:`MalformedJSON`.

    Refused: bytes that are not UTF-8; text that is not JSON; duplicate keys in
    an object; ``NaN``, ``Infinity``, ``-Infinity`` and numbers that overflow
    to them; integers of more than ``max_int_digits`` digits; strings (keys
    included) holding a lone surrogate; arrays and objects nested deeper than
    ``max_depth``.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedJSON(f"not UTF-8 (invalid byte at offset {exc.start})") from None

    def parse_int(digits: str) -> int:
        if len(digits.lstrip("-")) > max_int_digits:
            raise MalformedJSON(f"an integer has more than {max_int_digits} digits")
        return int(digits)

    def parse_float(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            raise MalformedJSON("a number is out of range")
        return value

    def parse_constant(name: str) -> Any:
        raise MalformedJSON(f"{name} is not a JSON number")

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(items)
        if len(obj) != len(items):
            seen: set[str] = set()
            for key, _ in items:
                if key in seen:
                    raise MalformedJSON(f"duplicate key {_short(key)} in an object")
                seen.add(key)
        return obj

    try:
        value = json.loads(
            text,
            parse_int=parse_int,
            parse_float=parse_float,
            parse_constant=parse_constant,
            object_pairs_hook=pairs,
        )
    except json.JSONDecodeError as exc:
        raise MalformedJSON(f"not JSON: {exc.msg} at offset {exc.pos}") from None
    except RecursionError:
        # The C scanner counts its depth against the interpreter's limit and stops cleanly.
        raise MalformedJSON(f"nested deeper than {max_depth} levels") from None
    _check_shape(value, max_depth)
    return value


def _check_shape(value: Any, max_depth: int) -> None:
    """Depth and string checks, without recursion (the value may be ~1,000 levels deep)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict | list):
            if depth >= max_depth:
                raise MalformedJSON(f"nested deeper than {max_depth} levels")
            if isinstance(item, dict):
                for key, child in item.items():
                    _check_text(key)
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)


def _check_text(text: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MalformedJSON(f"a string holds a lone surrogate (at character {exc.start})") from None


def _short(text: str, limit: int = 32) -> str:
    """A bounded, printable quotation of untrusted text for an error message."""
    quoted = ascii(text[:limit])
    return quoted if len(text) <= limit else quoted[:-1] + "...'"


def printable(text: str, limit: int = 64) -> str:
    """``text`` cut to ``limit`` characters, every non-printable one written as an escape.

    For values from a peer that go into replies, logs and the ledger: no control
    characters, no lone surrogates, nothing longer than ``limit``.
    """
    cut = text[:limit]
    if cut.isprintable() and cut.isascii():
        return cut
    # Lone surrogates are not printable (category Cs), so they are escaped too.
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in cut)
