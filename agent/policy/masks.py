"""Spans of text to mask, and how several of them over one value become one marker each.

Every rule reports *where* a secret is (a :class:`Mask` over the original
text) instead of rewriting the text itself. The spans of all rules are merged
before anything is replaced, so a value two rules agree on yields one marker,
never a marker inside a marker, and the parts no rule claimed (a URL's scheme,
host, port and path) stay as they were.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Mask", "merge", "shift"]


@dataclass(frozen=True, slots=True)
class Mask:
    """``text[start:end]`` is secret by ``rule``; ``why`` names the place, never the value."""

    start: int
    end: int
    rule: str
    why: str = ""


def shift(masks: Iterable[Mask], by: int) -> list[Mask]:
    """The same spans, ``by`` characters further right (from a part to its whole)."""
    return [Mask(m.start + by, m.end + by, m.rule, m.why) for m in masks]


def merge(masks: Iterable[Mask]) -> list[Mask]:
    """Overlapping spans joined into one, sorted; empty spans dropped.

    The joined span keeps the rule of its widest part (the earliest on a tie):
    the key rule that hid a whole value, rather than the shape rule that found
    a password inside it.
    """
    spans = sorted((m for m in masks if m.end > m.start), key=lambda m: (m.start, -m.end))
    out: list[Mask] = []
    widest: list[Mask] = []
    for m in spans:
        if out and m.start < out[-1].end:
            last = out[-1]
            if m.end - m.start > widest[-1].end - widest[-1].start:
                widest[-1] = m
            best = widest[-1]
            out[-1] = Mask(last.start, max(last.end, m.end), best.rule, best.why)
        else:
            out.append(m)
            widest.append(m)
    return out
