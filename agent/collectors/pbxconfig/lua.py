"""Lua dialplans (``extensions.lua``), read as pbx_lua (and Lua's own lexer) reads them.

pbx_lua runs the file as Lua: the dialplan is the ``extensions`` table of
functions, applications are called through the ``app`` table
(``app.Authenticate("1234")``, ``app["meetme"]("100", "", "4321")``; the
arguments are joined with commas, so ``app.meetme("100,,4321")`` is the same
call), and channel variables are set through the ``channel`` table
(``channel.DB_PASS = "…"``, ``channel.DB_PASS:set("…")``,
``channel.CURLOPT("userpwd"):set("…")``). Plain Lua variables and table fields
hold settings too (``TRUNK_PASS = "…"``, ``{ password = "…" }``).

Tokens follow Lua 5.x: ``--`` comments and ``--[==[ … ]==]`` long comments,
``"…"`` and ``'…'`` strings with backslash escapes, ``[==[ … ]==]`` long
strings. A value assigned to a secret-looking name (any part of the target)
has every literal masked; application calls go through the dialplan table
(:mod:`agent.policy.dialplan`); every string and comment is checked for shapes.
When the file cannot be tokenized, every line from the broken token on that
mentions a secret is masked whole (fail closed).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from agent.policy.dialplan import call_masks
from agent.policy.masks import Mask, shift
from agent.policy.redact import Redactor
from agent.policy.secret_names import is_secret_variable
from agent.policy.value_shapes import shape_masks, user_password_masks

__all__ = ["Token", "redact_lua", "tokenize"]

_NAME = re.compile(r"[A-Za-z_]\w*")
_NUMBER = re.compile(
    r"0[xX][0-9a-fA-F]*\.?[0-9a-fA-F]*(?:[pP][+-]?\d+)?|\d*\.?\d+(?:[eE][+-]?\d+)?|\d+\.?"
)
_LONG_OPEN = re.compile(r"\[(=*)\[")
_OPS = ("...", "..", "==", "~=", "<=", ">=", "//", "::", "<<", ">>")
_WORDS = re.compile(r"(?i)pass|secret|pwd|token|cred|key|pin|auth|cookie|bearer")
_KEYWORDS = frozenset(
    {
        *("and", "break", "do", "else", "elseif", "end", "false", "for", "function", "goto"),
        *("if", "in", "local", "nil", "not", "or", "repeat", "return", "then", "true"),
        *("until", "while"),
    }
)
#: Keywords that start a statement: an expression never runs past one.
_STOP_WORDS = frozenset(
    {
        *("break", "do", "else", "elseif", "end", "for", "goto", "if", "local", "repeat"),
        *("return", "then", "until", "while"),
    }
)
_COMPLETE = frozenset({")", "]", "}"})


class Token(NamedTuple):
    """One Lua token; for strings, ``[cstart, cend)`` is the content inside the quotes."""

    kind: str  # name str num op comment
    start: int
    end: int
    cstart: int = 0
    cend: int = 0


class _Unfinished(Exception):
    def __init__(self, pos: int) -> None:
        super().__init__(pos)
        self.pos = pos


def _long_bracket(text: str, i: int) -> tuple[int, int, int] | None:
    """For ``[==[`` at ``i``: (content start, content end, end) or None when not one."""
    m = _LONG_OPEN.match(text, i)
    if m is None:
        return None
    close = "]" + m.group(1) + "]"
    j = text.find(close, m.end())
    if j < 0:
        raise _Unfinished(i)
    start = m.end()
    if text.startswith("\r\n", start):
        start += 2
    elif text.startswith("\n", start):
        start += 1
    return start, j, j + len(close)


def tokenize(text: str) -> tuple[list[Token], int | None]:
    """Lua's tokens of ``text``; the position where tokenizing failed, or None."""
    toks: list[Token] = []
    i, n = 0, len(text)
    try:
        while i < n:
            c = text[i]
            if c.isspace():
                i += 1
            elif text.startswith("--", i):
                long = _long_bracket(text, i + 2) if text.startswith("[", i + 2) else None
                if long is not None:
                    toks.append(Token("comment", i, long[2]))
                    i = long[2]
                else:
                    j = text.find("\n", i)
                    j = n if j < 0 else j
                    toks.append(Token("comment", i, j))
                    i = j
            elif c in "\"'":
                j = i + 1
                while True:
                    if j >= n or text[j] == "\n":
                        raise _Unfinished(i)
                    if text[j] == "\\":
                        j += 2
                        continue
                    if text[j] == c:
                        break
                    j += 1
                toks.append(Token("str", i, j + 1, i + 1, j))
                i = j + 1
            elif c == "[" and _LONG_OPEN.match(text, i):
                long = _long_bracket(text, i)
                assert long is not None
                toks.append(Token("str", i, long[2], long[0], long[1]))
                i = long[2]
            elif c.isdigit() or (c == "." and i + 1 < n and text[i + 1].isdigit()):
                m = _NUMBER.match(text, i)
                end = m.end() if m is not None and m.end() > i else i + 1
                toks.append(Token("num", i, end))
                i = end
            elif c.isalpha() or c == "_":
                m2 = _NAME.match(text, i)
                assert m2 is not None
                toks.append(Token("name", i, m2.end()))
                i = m2.end()
            else:
                op = next((o for o in _OPS if text.startswith(o, i)), c)
                toks.append(Token("op", i, i + len(op)))
                i += len(op)
    except _Unfinished as exc:
        return toks, exc.pos
    return toks, None


def redact_lua(text: str, redactor: Redactor) -> str:
    """``text`` with every secret masked (see the module docstring)."""
    toks, error = tokenize(text)
    masks: list[Mask] = []
    code = [t for t in toks if t.kind != "comment"]
    _Reader(text, code, redactor, masks).read()
    for t in toks:
        if t.kind == "str":
            masks += shift(shape_masks(text[t.cstart : t.cend], colon=False), t.cstart)
        elif t.kind == "comment":
            masks += shift(shape_masks(text[t.start : t.end]), t.start)
    if error is not None:
        line = text.rfind("\n", 0, error) + 1
        rest = text[line:]
        if _WORDS.search(rest):
            pos = line
            for raw in rest.split("\n"):
                body = raw.rstrip("\r")
                if body.strip():
                    lead = len(body) - len(body.lstrip())
                    masks.append(Mask(pos + lead, pos + len(body), "unparsed-line"))
                pos += len(raw) + 1
        else:
            masks += shift(shape_masks(rest), line)
    return redactor.render(text, masks, first_line=1)


class _Reader:
    """Assignments, ``:set()`` calls and ``app`` calls over the code tokens."""

    def __init__(self, text: str, toks: list[Token], redactor: Redactor, out: list[Mask]) -> None:
        self.text = text
        self.toks = toks
        self.local = redactor.local
        self.out = out

    def s(self, i: int) -> str:
        if 0 <= i < len(self.toks):
            t = self.toks[i]
            return self.text[t.start : t.end]
        return ""

    def content(self, i: int) -> str:
        t = self.toks[i]
        return self.text[t.cstart : t.cend] if t.kind == "str" else self.s(i)

    def read(self) -> None:
        for i, t in enumerate(self.toks):
            if t.kind != "op":
                continue
            op = self.s(i)
            if op == "=":
                self.assignment(i)
            elif op == ":" and self.s(i + 1) == "set" and self.s(i + 2) == "(":
                self.setter(i)
            elif op == "(" and (self.s(i - 2) == "." or self.s(i - 1) == "]"):
                self.app_call(i)

    def secret(self, names: list[str]) -> tuple[str, str] | None:
        for name in reversed(names):
            if self.local.key_matches(name):
                return "local-key", name
            if is_secret_variable(name):
                return "secret-variable", name
        return None

    def _complete(self, i: int) -> bool:
        t = self.toks[i]
        s = self.s(i)
        if t.kind in ("str", "num"):
            return True
        if t.kind == "name":
            return s not in _KEYWORDS or s in ("nil", "true", "false", "end")
        return s in _COMPLETE

    def expression_end(self, i: int, stops: tuple[str, ...] = (",", ";")) -> int:
        """The index after the last token of the expression starting at ``i``."""
        depth = 0
        j = i
        while j < len(self.toks):
            t, s = self.toks[j], self.s(j)
            if t.kind == "op" and s in ("(", "[", "{"):
                # f(x) or t[x] continue an expression; "(" starting a line after a
                # complete one is Lua's ambiguity: taken as a call, as Lua does.
                depth += 1
            elif t.kind == "op" and s in (")", "]", "}"):
                if depth == 0:
                    break
                depth -= 1
            elif depth == 0:
                if t.kind == "op" and s in stops:
                    break
                if t.kind == "name" and s in _STOP_WORDS:
                    break
                if j > i and t.kind in ("name", "str", "num") and self._complete(j - 1):
                    break  # two operands side by side: a new statement began
            j += 1
        return j

    def literals(self, i: int, j: int, rule: str, why: str) -> None:
        for t in self.toks[i:j]:
            if t.kind == "str" and t.cend > t.cstart:
                self.out.append(Mask(t.cstart, t.cend, rule, why))
            elif t.kind == "num":
                self.out.append(Mask(t.start, t.end, rule, why))

    def chain(self, j: int) -> tuple[list[str], int] | None:
        """The names of the target chain ending at token ``j``, and where it starts."""
        names: list[str] = []
        while j >= 0:
            t, s = self.toks[j], self.s(j)
            if s in ("]", ")"):
                opener = "[" if s == "]" else "("
                depth, k = 1, j - 1
                while k >= 0 and depth:
                    if self.s(k) == s:
                        depth += 1
                    elif self.s(k) == opener:
                        depth -= 1
                    k -= 1
                if depth:
                    return None
                k += 1  # the opener
                inner = [self.content(x) for x in range(k + 1, j) if self.toks[x].kind != "op"]
                if s == "]":
                    names += inner
                    j = k - 1
                    if j >= 0 and (self.toks[j].kind == "name" or self.s(j) in ("]", ")")):
                        continue
                    return names, k  # ["key"] = … in a table constructor
                if k == 0 or self.toks[k - 1].kind != "name":
                    return None
                names.append(f"{self.s(k - 1)}({','.join(inner)})")
                j = k - 2
                if self.s(j) in (".", ":"):
                    j -= 1
                    continue
                return names, k - 1
            if t.kind == "name" and s not in _KEYWORDS:
                names.append(s)
                if self.s(j - 1) in (".", ":"):
                    j -= 2
                    continue
                return names, j
            return None
        return None

    def assignment(self, i: int) -> None:
        names: list[str] = []
        targets = 0
        j = i - 1
        while True:  # a, b.c, d["e"] = …
            found = self.chain(j)
            if found is None:
                break
            names += found[0]
            targets += 1
            j = found[1] - 1
            if self.s(j) != ",":
                break
            j -= 1
        if not names:
            return
        # Several targets take the values in order: mask the whole list of values.
        end = self.expression_end(i + 1, (";",) if targets > 1 else (",", ";"))
        secret = self.secret(names)
        if secret is not None:
            self.literals(i + 1, end, *secret)
        elif end == i + 2 and self.toks[i + 1].kind == "str":
            t = self.toks[i + 1]
            self.out.extend(shift(user_password_masks(self.text[t.cstart : t.cend]), t.cstart))

    def setter(self, i: int) -> None:
        found = self.chain(i - 1)
        if found is None:
            return
        secret = self.secret(found[0])
        if secret is not None:
            close = self.expression_end(i + 3, ())
            self.literals(i + 3, close, *secret)

    def app_call(self, i: int) -> None:
        """``app.name(…)`` / ``app["name"](…)``: the dialplan table over the joined arguments."""
        if self.s(i - 2) == ".":
            if self.s(i - 3) != "app" or self.toks[i - 1].kind != "name":
                return
            name = self.s(i - 1)
        else:  # app["name"](…)
            if not (self.s(i - 3) == "[" and self.s(i - 4) == "app"):
                return
            if self.toks[i - 2].kind != "str":
                return
            name = self.content(i - 2)
        close = self.expression_end(i + 1, ())
        data: list[str] = []
        pieces: list[tuple[int, int, int]] = []  # (start in data, start in file, length)
        j = i + 1
        first = True
        while j < close:
            end = self.expression_end(j, (",",))
            if not first:
                data.append(",")
            first = False
            depth = 0
            for x in range(j, end):
                t = self.toks[x]
                s = self.s(x)
                if t.kind == "op" and s in ("(", "[", "{"):
                    depth += 1
                elif t.kind == "op" and s in (")", "]", "}"):
                    depth -= 1
                if depth or s in (")", "]", "}"):
                    # An index or a call's own arguments: not the value itself.
                    if not (data and data[-1] == "${_}"):
                        data.append("${_}")
                    continue
                if t.kind in ("str", "num"):
                    a, b = (t.cstart, t.cend) if t.kind == "str" else (t.start, t.end)
                    pieces.append((sum(map(len, data)), a, b - a))
                    data.append(self.text[a:b])
                elif self.s(x) != ".." and not (data and data[-1] == "${_}"):
                    data.append("${_}")  # a variable or call: a reference, never masked
            j = end + 1
        virtual = "".join(data)
        for m in call_masks(name, virtual, 0, len(virtual), local=self.local):
            for at, file_at, length in pieces:
                a, b = max(m.start, at), min(m.end, at + length)
                if a < b:
                    self.out.append(Mask(file_at + a - at, file_at + b - at, m.rule, m.why))
