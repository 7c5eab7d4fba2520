"""Padding that stays its size on the wire.

The gate compresses a body when that makes it smaller (``agent/policy/wire.py``):
``"x" * 900`` leaves as a few dozen bytes. Tests and benches that need
envelopes of a given size pad with text that does not compress.
"""

from __future__ import annotations

import random
import string

_ALPHABET = "".join(c for c in string.printable if c not in '"\\\t\n\r\x0b\x0c')


def incompressible(n: int, seed: int = 0) -> str:
    """``n`` printable characters that zlib cannot shrink (the same for the same seed)."""
    return "".join(random.Random(seed).choices(_ALPHABET, k=n))
