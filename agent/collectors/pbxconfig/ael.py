"""AEL dialplans (``extensions.ael``), read as pbx_ael reads them.

AEL (pbx/ael/ael.flex and ael.y in Asterisk) writes the dialplan as blocks:
``globals { NAME=value; }``, ``context name { pattern => statement; }``,
``macro name(args) { … }``; statements end with ``;`` and ``{``/``}`` group
them; ``//`` comments run to the end of the line and ``/* … */`` span lines;
double quotes group text. An assignment ``NAME=value;`` (``local NAME=…``
too) becomes ``Set(NAME=value)``; applications are called as ``App(args);``.

Each statement goes through the same rules as an ``exten =>`` line
(:func:`agent.policy.dialplan.dialplan_masks`); assignments to secret-looking
variables, and literals an ``if``/``while`` compares with one, are masked;
comments are read as free text.
"""

from __future__ import annotations

import re

from agent.policy.dialplan import assignment_masks, comparison_masks, dialplan_masks
from agent.policy.local_rules import LocalRules
from agent.policy.masks import Mask, shift
from agent.policy.redact import Redactor
from agent.policy.value_shapes import shape_masks

__all__ = ["redact_ael", "split_code", "statements"]

_LABELS = re.compile(r"\s*(?:(?:case[ \t]+[^:;{}\n]+|default|[\w-]+)[ \t]*:(?!:)\s*)*")
_ASSIGN = re.compile(r"\s*(?:local\s+)?([A-Za-z_$][\w${}()\[\]\-.,]*?)[ \t]*=(?![=>])[ \t]*")


def split_code(text: str) -> tuple[str, list[tuple[int, int]]]:
    """``text`` with its comments blanked (same length and lines), and the comments' spans."""
    code = list(text)
    comments: list[tuple[int, int]] = []
    i, n = 0, len(text)
    quote = False
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            quote = not quote
        elif c == "\n":
            quote = False  # AEL words do not span lines
        elif not quote and text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            comments.append((i, j))
            i = j
            continue
        elif not quote and text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2  # unterminated: the rest is comment, read as text
            comments.append((i, j))
            i = j
            continue
        i += 1
    for a, b in comments:
        for k in range(a, b):
            if code[k] != "\n":
                code[k] = " "
    return "".join(code), comments


def statements(code: str) -> list[tuple[int, int]]:
    """Spans of the statements of comment-free AEL code (split at ``;``, ``{``, ``}``)."""
    spans: list[tuple[int, int]] = []
    depth = 0
    quote = False
    start = 0
    for i, c in enumerate(code):
        if c == '"':
            quote = not quote
        elif c == "\n":
            quote = False
        elif quote:
            continue
        elif c == "(":
            depth += 1
        elif c == ")":
            depth = max(0, depth - 1)
        elif c in ";{}" and depth == 0:
            if code[start:i].strip():
                spans.append((start, i))
            start = i + 1
    if code[start:].strip():
        spans.append((start, len(code)))
    return spans


def _unquoted(code: str, a: int, b: int) -> tuple[int, int]:
    while a < b and code[a].isspace():
        a += 1
    while b > a and code[b - 1].isspace():
        b -= 1
    if b - a >= 2 and code[a] == '"' and code[b - 1] == '"':
        return a + 1, b - 1
    return a, b


def statement_masks(code: str, a: int, b: int, local: LocalRules) -> list[Mask]:
    """Masks for one AEL statement ``code[a:b]``."""
    m = _LABELS.match(code, a, b)
    start = m.end() if m is not None else a
    arrow = code.find("=>", start, b)
    if arrow >= 0 and code.count("(", start, arrow) == code.count(")", start, arrow):
        return statement_masks(code, arrow + 2, b, local)
    out: list[Mask] = []
    asg = _ASSIGN.match(code, start, b)
    if asg is not None and asg.group(1).count("(") == asg.group(1).count(")"):
        va, vb = _unquoted(code, asg.end(), b)
        out += assignment_masks(asg.group(1), va, vb, code, local=local)
    out += dialplan_masks(code, start, b, local=local, ael=True)
    out += comparison_masks(code, start, b)
    out += shift(shape_masks(code[start:b], colon=False), start)
    return out


def redact_ael(text: str, redactor: Redactor) -> str:
    """``text`` with every secret masked."""
    code, comments = split_code(text)
    masks: list[Mask] = []
    for a, b in comments:
        masks += shift(shape_masks(text[a:b]), a)
    for a, b in statements(code):
        masks += statement_masks(code, a, b, redactor.local)
    return redactor.render(text, masks, first_line=1)
