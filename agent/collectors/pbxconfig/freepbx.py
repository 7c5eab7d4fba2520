"""FreePBX's shell-style settings (/etc/amportal.conf, ``*.env``) and helpers for its PHP.

amportal.conf is read by FreePBX's scripts as ``KEY=value`` lines, with shell
quoting: ``'…'`` takes everything up to the next ``'`` (lines included),
``"…"`` knows backslash escapes, a bare value ends at a blank and a trailing
backslash continues it on the next line. A value whose name looks secret (or
is one of FreePBX's password settings) is masked; a line that mentions a
secret but is no assignment is masked whole (fail closed). /etc/freepbx.conf
is PHP and is read by :mod:`agent.collectors.pbxconfig.php`.
"""

from __future__ import annotations

import re

from agent.policy.masks import Mask, shift
from agent.policy.redact import Redactor
from agent.policy.secret_names import FREEPBX_SECRET_KEYS, is_secret_variable
from agent.policy.value_shapes import shape_masks, user_password_masks

__all__ = ["parse_amp_conf", "parse_shell_vars", "redact_shell", "shell_value_end"]

# $amp_conf['AMPDBPASS'] = 'value';   (either quote, optional spaces, trailing comment)
_PHP_ASSIGN = re.compile(
    r"""^(\s*\$amp_conf\s*\[\s*(['"])(\w+)\2\s*\]\s*=\s*)(['"])((?:\\.|(?!\4).)*)\4(\s*;.*)$""",
    re.S,
)
_SHELL_ASSIGN = re.compile(r"[ \t]*(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_]*)=")
_SHELL_LINE = re.compile(r"^(\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*)(.*?)(\s*)$", re.S)
_SECRET_WORD = re.compile(r"(?i)pass|secret|pwd|token|cred|key|pin|auth|cookie|bearer")


def shell_value_end(text: str, start: int) -> int:
    """Where the shell word starting at ``start`` ends (quotes and continuations followed)."""
    i, n = start, len(text)
    while i < n:
        c = text[i]
        if c == "'":
            j = text.find("'", i + 1)
            i = n if j < 0 else j + 1
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            i = min(n, j + 1)
        elif c == "\\":
            i += 2
        elif c in " \t\n;&|":
            break
        else:
            i += 1
    return min(i, n)


def _content(text: str, a: int, b: int) -> tuple[int, int]:
    """The value without one pair of surrounding quotes."""
    if b - a >= 2 and text[a] in "'\"" and text[b - 1] == text[a]:
        return a + 1, b - 1
    return a, b


def redact_shell(text: str, redactor: Redactor) -> str:
    """Mask secrets in amportal.conf-style ``KEY=value`` files."""
    masks: list[Mask] = []
    pos, n = 0, len(text)
    while pos < n:
        eol = text.find("\n", pos)
        eol = n if eol < 0 else eol
        line = text[pos:eol]
        stripped = line.strip()
        m = _SHELL_ASSIGN.match(text, pos)
        if stripped.startswith("#") or not stripped:
            masks += shift(shape_masks(line), pos)
        elif m is not None and m.end() <= eol:
            name = m.group(1)
            end = shell_value_end(text, m.end())
            a, b = _content(text, m.end(), end)
            if b > a:
                if name.lower() in FREEPBX_SECRET_KEYS:
                    masks.append(Mask(a, b, "freepbx-key", name))
                elif redactor.local.key_matches(name):
                    masks.append(Mask(a, b, "local-key", name))
                elif is_secret_variable(name):
                    masks.append(Mask(a, b, "secret-variable", name))
                else:
                    masks += shift(user_password_masks(text[a:b]), a)
            eol = text.find("\n", end)
            eol = n if eol < 0 else eol
            masks += shift(shape_masks(text[m.end() : eol]), m.end())
        elif _SECRET_WORD.search(line):
            lead = len(line) - len(line.lstrip())
            masks.append(Mask(pos + lead, pos + len(line.rstrip()), "unparsed-line"))
        else:
            masks += shift(shape_masks(line), pos)
        pos = eol + 1
    return redactor.render(text, masks, first_line=1)


def _lines(text: str) -> list[tuple[str, str]]:
    out = []
    for raw in text.splitlines(keepends=True):
        body = raw.rstrip("\r\n")
        out.append((body, raw[len(body) :]))
    return out


def parse_amp_conf(text: str) -> dict[str, str]:
    """The one-line ``$amp_conf`` settings of a freepbx.conf, for tools and tests."""
    found: dict[str, str] = {}
    for body, _ in _lines(text):
        m = _PHP_ASSIGN.match(body)
        if m is not None:
            found[m.group(3)] = m.group(5)
    return found


def parse_shell_vars(text: str) -> dict[str, str]:
    """The ``KEY=value`` settings of an amportal.conf, for tools and tests."""
    found: dict[str, str] = {}
    for body, _ in _lines(text):
        if body.strip().startswith("#"):
            continue
        m = _SHELL_LINE.match(body)
        if m is not None:
            found[m.group(2)] = m.group(3)
    return found
