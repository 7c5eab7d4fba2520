"""PHP files (FreePBX's /etc/freepbx.conf, any ``*.php`` under the roots), read as PHP reads them.

FreePBX keeps its database password in ``$amp_conf['AMPDBPASS']``, and
administrators write it every way PHP allows: the value on the next line, in a
heredoc, concatenated, through ``define()`` or an array. Line patterns miss
those, so this module tokenizes by PHP's own rules (Zend's language scanner,
studied, written anew here):

- text outside ``<?php`` / ``<?=`` / ``<?`` … ``?>`` is inline HTML; ``?>``
  eats one newline after it;
- comments ``#`` (but not ``#[``, an attribute) and ``//`` run to the end of
  the line or to ``?>``; ``/* … */`` spans lines;
- ``'…'`` knows only ``\\\\`` and ``\\'``; ``"…"`` and backticks know every
  backslash escape and ``{$…}`` interpolation (which may hold quotes);
- ``<<<ID`` / ``<<<"ID"`` heredoc and ``<<<'ID'`` nowdoc end at a line whose
  first word (indentation allowed, PHP 7.3+) is ``ID``.

What is masked (rules in :mod:`agent.policy.redact`): every literal of the
value assigned (``=``, ``.=``, ``??=``) to a target with a secret-looking part
(``$amp_conf['AMPDBPASS']``, ``$db_password``, ``$cfg->secret``,
``const API_KEY``), of an array element with a secret-looking key
(``'password' => …``), of the arguments after a secret-named first argument
(``define('DB_PASS', …)``, ``ini_set('…password', …)``, ``putenv('TOKEN=…')``),
and the password argument of PHP's database and network clients
(:data:`PHP_ARGUMENTS`); every string and comment is checked for shapes.

Fail closed: when the file cannot be tokenized (an unterminated string,
comment or heredoc), every line from the broken statement on is masked whole
if that part of the file mentions a secret.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from agent.policy.masks import Mask, shift
from agent.policy.redact import Redactor
from agent.policy.secret_names import FREEPBX_SECRET_KEYS, is_secret_variable
from agent.policy.value_shapes import shape_masks, user_password_masks

__all__ = ["PHP_ARGUMENTS", "Token", "redact_php", "tokenize"]

#: PHP functions and methods that take a password (or key) by position (1-based).
PHP_ARGUMENTS: dict[str, int] = {
    "pdo": 3,  # new PDO($dsn, $username, $password, $options)
    "mysqli": 3,  # new mysqli($host, $user, $password, $db, …)
    "mysqli_connect": 3,
    "real_connect": 3,  # $mysqli->real_connect($host, $user, $password, …)
    "mysqli_real_connect": 4,  # mysqli_real_connect($link, $host, $user, $password, …)
    "mysql_connect": 3,
    "mysql_pconnect": 3,
    "mssql_connect": 3,
    "odbc_connect": 3,
    "odbc_pconnect": 3,
    "oci_connect": 2,
    "ldap_bind": 3,
    "ftp_login": 3,
    "imap_open": 3,
    "ssh2_auth_password": 3,
    "hash_hmac": 3,  # hash_hmac($algo, $data, $key)
    "openssl_encrypt": 3,  # openssl_encrypt($data, $cipher, $key, …)
    "openssl_decrypt": 3,
    "openssl_pkey_get_private": 2,  # ($key, $passphrase)
}
#: curl_setopt($ch, OPTION, $value) options whose value is a credential.
_CURL_SECRET_OPTIONS = frozenset(
    {
        "curlopt_userpwd",
        "curlopt_proxyuserpwd",
        "curlopt_password",
        "curlopt_proxypassword",
        "curlopt_keypasswd",
        "curlopt_sslkeypasswd",
        "curlopt_sslcertpasswd",
        "curlopt_xoauth2_bearer",
        "curlopt_cookie",
    }
)

_OPS = sorted(
    [
        "<=>",
        "===",
        "!==",
        "**=",
        "...",
        "<<=",
        ">>=",
        "??=",
        "?->",
        "=>",
        "==",
        "!=",
        "<>",
        "<=",
        ">=",
        "&&",
        "||",
        "++",
        "--",
        "+=",
        "-=",
        "*=",
        "/=",
        ".=",
        "%=",
        "&=",
        "|=",
        "^=",
        "->",
        "::",
        "<<",
        ">>",
        "??",
        "**",
        "#[",
    ],
    key=len,
    reverse=True,
)
_NAME = re.compile(r"[A-Za-z_\x80-\U0010ffff][\w\x80-\U0010ffff]*")
_NUMBER = re.compile(r"0[xX][0-9a-fA-F_]+|0[bB][01_]+|(?:\d[\d_]*)?\.?\d[\d_]*(?:[eE][+-]?\d+)?")
_HEREDOC = re.compile(r"<<<[ \t]*([\"']?)([A-Za-z_][A-Za-z0-9_]*)\1\r?\n")
_WORDS = re.compile(r"(?i)pass|secret|pwd|token|cred|key|pin|auth|cookie|bearer")
_ASSIGN = frozenset({"=", ".=", "??="})
_LITERALS = frozenset({"str", "num", "heredoc"})


class Token(NamedTuple):
    """One PHP token; for strings, ``[cstart, cend)`` is the content between the quotes."""

    kind: str  # html open close ws comment var name str heredoc num op
    start: int
    end: int
    cstart: int = 0
    cend: int = 0


class _Unterminated(Exception):
    def __init__(self, pos: int) -> None:
        super().__init__(pos)
        self.pos = pos


def _quoted(text: str, start: int, quote: str) -> int:
    """The index just past the closing ``quote`` of a string opened at ``start``."""
    i = start + 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == quote:
            return i + 1
        if quote != "'" and c == "{" and text.startswith("$", i + 1):
            i = _interpolation(text, i + 1)
            continue
        i += 1
    raise _Unterminated(start)


def _interpolation(text: str, start: int) -> int:
    """Past the ``}`` closing ``{$…`` (quotes inside it are strings of their own)."""
    depth = 1
    i = start
    while i < len(text):
        c = text[i]
        if c in "'\"":
            i = _quoted(text, i, c)
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise _Unterminated(start)


def tokenize(text: str) -> tuple[list[Token], int | None]:
    """PHP's tokens of ``text``; the position where tokenizing failed, or None."""
    toks: list[Token] = []
    n = len(text)
    i = 0
    php = False
    try:
        while i < n:
            if not php:
                j = text.find("<?", i)
                if j < 0:
                    toks.append(Token("html", i, n))
                    break
                if j > i:
                    toks.append(Token("html", i, j))
                if text[j : j + 5].lower() == "<?php" and (j + 5 == n or text[j + 5].isspace()):
                    end = j + 6 if j + 5 < n else j + 5
                elif text.startswith("<?=", j):
                    end = j + 3
                else:
                    end = j + 2
                toks.append(Token("open", j, end))
                i, php = end, True
                continue
            c = text[i]
            if c.isspace():
                j = i + 1
                while j < n and text[j].isspace():
                    j += 1
                toks.append(Token("ws", i, j))
                i = j
            elif text.startswith("?>", i):
                end = i + 2
                if text.startswith("\r\n", end):
                    end += 2
                elif text.startswith("\n", end):
                    end += 1
                toks.append(Token("close", i, end))
                i, php = end, False
            elif (c == "#" and not text.startswith("#[", i)) or text.startswith("//", i):
                j = i
                while j < n and text[j] != "\n" and not text.startswith("?>", j):
                    j += 1
                toks.append(Token("comment", i, j))
                i = j
            elif text.startswith("/*", i):
                j = text.find("*/", i + 2)
                if j < 0:
                    raise _Unterminated(i)
                toks.append(Token("comment", i, j + 2))
                i = j + 2
            elif c in "'\"`":
                j = _quoted(text, i, c)
                toks.append(Token("str", i, j, i + 1, j - 1))
                i = j
            elif text.startswith("<<<", i):
                m = _HEREDOC.match(text, i)
                if m is None:
                    toks.append(Token("op", i, i + 2))
                    i += 2
                    continue
                ident = re.escape(m.group(2))
                close = re.compile(rf"^[ \t]*{ident}(?![A-Za-z0-9_\x80-\U0010ffff])", re.M)
                c_m = close.search(text, m.end())
                if c_m is None:
                    raise _Unterminated(i)
                body_end = max(m.end(), c_m.start() - 1)
                if text[body_end - 1 : body_end] == "\r":
                    body_end -= 1
                end = c_m.end()
                toks.append(Token("heredoc", i, end, m.end(), body_end))
                i = end
            elif c == "$" and i + 1 < n and _NAME.match(text, i + 1):
                m2 = _NAME.match(text, i + 1)
                assert m2 is not None
                toks.append(Token("var", i, m2.end()))
                i = m2.end()
            elif c.isdigit() or (c == "." and i + 1 < n and text[i + 1].isdigit()):
                m3 = _NUMBER.match(text, i)
                end = m3.end() if m3 is not None and m3.end() > i else i + 1
                toks.append(Token("num", i, end))
                i = end
            elif _NAME.match(text, i):
                m4 = _NAME.match(text, i)
                assert m4 is not None
                toks.append(Token("name", i, m4.end()))
                i = m4.end()
            else:
                op = next((o for o in _OPS if text.startswith(o, i)), c)
                toks.append(Token("op", i, i + len(op)))
                i += len(op)
    except _Unterminated as exc:
        return toks, exc.pos
    return toks, None


def redact_php(text: str, redactor: Redactor) -> str:
    """``text`` with every secret masked (see the module docstring)."""
    toks, error = tokenize(text)
    masks: list[Mask] = []
    sig = [t for t in toks if t.kind not in ("ws", "comment", "html")]
    _Reader(text, sig, redactor, masks).read()
    for t in toks:
        if t.kind in ("str", "heredoc"):
            masks += shift(shape_masks(text[t.cstart : t.cend]), t.cstart)
        elif t.kind in ("comment", "html"):
            masks += shift(shape_masks(text[t.start : t.end]), t.start)
    if error is not None:
        masks += _fail_closed(text, sig, error)
    return redactor.render(text, masks, first_line=1)


def _fail_closed(text: str, sig: list[Token], error: int) -> list[Mask]:
    """Lines from the statement that could not be tokenized on, when they mention a secret."""
    start = 0
    for t in reversed(sig):
        if t.start < error and (t.kind == "open" or text[t.start : t.end] in (";", "{", "}")):
            start = t.end
            break
    eol = text.find("\n", start)
    # The statement before ended its line: start at the next one, else at this line.
    blank = eol >= 0 and not text[start:eol].strip()
    start = eol + 1 if blank else text.rfind("\n", 0, start) + 1
    rest = text[start:]
    if not _WORDS.search(rest):
        return shift(shape_masks(rest), start)
    out: list[Mask] = []
    pos = start
    for line in rest.split("\n"):
        body = line.rstrip("\r")
        if body.strip():
            lead = len(body) - len(body.lstrip())
            out.append(Mask(pos + lead, pos + len(body), "unparsed-line", "could not be read"))
        pos += len(line) + 1
    return out


class _Reader:
    """Finds assignments, array pairs and calls in the significant tokens."""

    def __init__(self, text: str, sig: list[Token], redactor: Redactor, out: list[Mask]) -> None:
        self.text = text
        self.sig = sig
        self.local = redactor.local
        self.out = out

    def s(self, i: int) -> str:
        """The source text of token ``i`` ("" outside the list)."""
        if 0 <= i < len(self.sig):
            t = self.sig[i]
            return self.text[t.start : t.end]
        return ""

    def content(self, i: int) -> str:
        t = self.sig[i]
        return self.text[t.cstart : t.cend] if t.kind in ("str", "heredoc") else self.s(i)

    def read(self) -> None:
        for i, t in enumerate(self.sig):
            if t.kind != "op":
                continue
            op = self.s(i)
            if op in _ASSIGN:
                self.assignment(i)
            elif op == "=>":
                self.pair(i)
            elif op == "(" and i > 0 and self.sig[i - 1].kind == "name":
                self.call(i)

    # -- helpers ----------------------------------------------------------------------

    def secret_name(self, names: list[str]) -> tuple[str, str] | None:
        """(rule, name) when one of ``names`` looks secret, else None."""
        for name in reversed(names):
            low = name.lower()
            if self.local.key_matches(name):
                return "local-key", name
            if low in FREEPBX_SECRET_KEYS:
                return "freepbx-key", name
            if is_secret_variable(name):
                return "secret-variable", name
        return None

    def expression_end(self, i: int, stops: tuple[str, ...] = (";", ",")) -> int:
        """The index after the last token of the expression starting at ``i``."""
        depth = 0
        j = i
        while j < len(self.sig):
            t = self.sig[j]
            if t.kind in ("close", "open"):
                break
            s = self.s(j)
            if s in ("(", "[", "{"):
                depth += 1
            elif s in (")", "]", "}"):
                if depth == 0:
                    break
                depth -= 1
            elif depth == 0 and s in stops:
                break
            j += 1
        return j

    def literals(self, i: int, j: int, rule: str, why: str) -> None:
        """Mask every literal among tokens ``[i, j)``."""
        for t in self.sig[i:j]:
            if t.kind in ("str", "heredoc") and t.cend > t.cstart:
                self.out.append(Mask(t.cstart, t.cend, rule, why))
            elif t.kind == "num":
                self.out.append(Mask(t.start, t.end, rule, why))

    def args(self, open_: int) -> list[tuple[int, int]]:
        """Token ranges of the arguments of the call whose ``(`` is at ``open_``."""
        ranges: list[tuple[int, int]] = []
        j = open_ + 1
        while j < len(self.sig) and self.s(j) != ")":
            end = self.expression_end(j, (",",))
            ranges.append((j, end))
            j = end + 1 if self.s(end) == "," else end
            if j >= len(self.sig) or self.sig[j].kind in ("close", "open"):
                break
        return ranges

    # -- constructs ---------------------------------------------------------------------

    def target(self, i: int) -> list[str] | None:
        """The names making up the assignment target before ``i`` (None: not understood)."""
        names: list[str] = []
        j = i - 1
        while j >= 0:
            t, s = self.sig[j], self.s(j)
            if s == "]":
                depth, k = 1, j - 1
                while k >= 0 and depth:
                    if self.s(k) == "]":
                        depth += 1
                    elif self.s(k) == "[":
                        depth -= 1
                    k -= 1
                if depth:
                    return None
                names += [self.content(x) for x in range(k + 2, j) if self.sig[x].kind != "op"]
                j = k
                continue
            if t.kind == "name" and self.s(j - 1) in ("->", "?->", "::"):
                names.append(s)
                j -= 2
                continue
            if t.kind == "var":
                names.append(s[1:])
                return names
            if t.kind == "name" and self.s(j - 1).lower() in ("const", "", ";", "{", "}", ","):
                names.append(s)
                return names
            if t.kind == "name" and self.sig[j - 1].kind == "open":
                names.append(s)
                return names
            return None
        return None

    def assignment(self, i: int) -> None:
        end = self.expression_end(i + 1)
        names = self.target(i)
        if names is None:
            # list($user, $pass) = …, [$a, $b] = …: not understood; fail closed if secret.
            head = max(0, i - 40)
            if any(
                self.sig[x].kind in ("var", "str", "name") and is_secret_variable(self.content(x))
                for x in range(head, i)
            ):
                self.literals(i + 1, end, "unparsed-line", "assignment not understood")
            return
        found = self.secret_name(names)
        if found is not None:
            self.literals(i + 1, end, found[0], found[1])
        elif end == i + 2 and self.sig[i + 1].kind == "str":
            t = self.sig[i + 1]
            self.out.extend(shift(user_password_masks(self.text[t.cstart : t.cend]), t.cstart))

    def pair(self, i: int) -> None:
        if i == 0 or self.sig[i - 1].kind not in ("str", "name", "num"):
            return
        found = self.secret_name([self.content(i - 1)])
        if found is not None:
            self.literals(i + 1, self.expression_end(i + 1, (",",)), found[0], found[1])

    def call(self, i: int) -> None:
        name = self.s(i - 1).lower()
        args = self.args(i)
        if not args:
            return
        pos = PHP_ARGUMENTS.get(name)
        if name == "curl_setopt" and len(args) >= 3:
            a, b = args[1]
            if b == a + 1 and self.s(a).lower() in _CURL_SECRET_OPTIONS:
                pos = 3
        if pos is not None and pos <= len(args):
            self.literals(*args[pos - 1], "secret-argument", f"{self.s(i - 1)} argument {pos}")
        a, b = args[0]
        if b != a + 1 or self.sig[a].kind != "str":
            return
        first = self.content(a)
        if "=" in first and len(args) == 1:  # putenv('DB_PASS=…')
            eq = first.find("=")
            found = self.secret_name([first[:eq]])
            t = self.sig[a]
            if found is not None and first[eq + 1 :]:
                self.out.append(Mask(t.cstart + eq + 1, t.cend, found[0], found[1]))
            return
        found = self.secret_name([first])
        if found is not None:
            for x, y in args[1:]:
                self.literals(x, y, found[0], f"{self.s(i - 1)}({first!r})")
