"""FreePBX's own settings files: /etc/freepbx.conf (PHP) and /etc/amportal.conf (KEY=value).

FreePBX keeps its database and manager passwords here. Neither file is
Asterisk syntax, so each has its own small reader; a line that mentions a
secret but does not fit the one form we understand is masked whole (fail
closed) rather than guessed at.
"""

from __future__ import annotations

import re

from agent.policy.redact import Redactor, is_secretish_key

# $amp_conf['AMPDBPASS'] = 'value';   (either quote, optional spaces, trailing comment)
_PHP_ASSIGN = re.compile(
    r"""^(\s*\$amp_conf\s*\[\s*(['"])(\w+)\2\s*\]\s*=\s*)(['"])((?:\\.|(?!\4).)*)\4(\s*;.*)$""",
    re.S,
)
_PHP_COMMENT = re.compile(r"^\s*(?://|#|/\*|\*)")
_SHELL_ASSIGN = re.compile(r"^(\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*)(.*?)(\s*)$", re.S)
_SECRET_WORD = re.compile(r"(?i)pass|secret|pwd|token|cred|key|pin(?:code)?(?![a-z])")


def _lines(text: str) -> list[tuple[str, str]]:
    out = []
    for raw in text.splitlines(keepends=True):
        body = raw.rstrip("\r\n")
        out.append((body, raw[len(body) :]))
    return out


def redact_php(text: str, redactor: Redactor) -> str:
    """Mask secrets in freepbx.conf: ``$amp_conf['KEY'] = '…';`` lines and anything else."""
    out: list[str] = []
    for body, ending in _lines(text):
        out.append(_php_line(body, redactor) + ending)
    return "".join(out)


def _php_line(body: str, redactor: Redactor) -> str:
    m = _PHP_ASSIGN.match(body)
    if m is not None:
        key, value = m.group(3), m.group(5)
        new = redactor.assignment(key, value) if value else None
        if new is None:
            return body
        return f"{m.group(1)}{m.group(4)}{new}{m.group(4)}{m.group(6)}"
    changed = redactor.free_text(body)
    if _PHP_COMMENT.match(body):
        return changed if changed is not None else body
    if _SECRET_WORD.search(body):
        # PHP we do not model (define(), getenv(), arrays): never guess, mask it all.
        return redactor.whole_line(body)
    return changed if changed is not None else body


def redact_shell(text: str, redactor: Redactor) -> str:
    """Mask secrets in amportal.conf-style ``KEY=value`` files."""
    out: list[str] = []
    for body, ending in _lines(text):
        out.append(_shell_line(body, redactor) + ending)
    return "".join(out)


def _shell_line(body: str, redactor: Redactor) -> str:
    stripped = body.strip()
    if not stripped:
        return body
    if stripped.startswith("#"):
        return redactor.free_text(body) or body
    m = _SHELL_ASSIGN.match(body)
    if m is None:
        if _SECRET_WORD.search(body):
            return redactor.whole_line(body)
        return redactor.free_text(body) or body
    key, value = m.group(2), m.group(3)
    if not value:
        return body
    if is_secretish_key(key):
        new: str | None = redactor.assignment(key, value)
        if new is not None and not new.startswith("<redacted:"):
            # A secret-looking key the tables let through (a setting): still whole.
            new = redactor.marker("secretish-key", value)
    else:
        new = redactor.assignment(key, value)
    if new is None:
        return body
    return f"{m.group(1)}{new}{m.group(4)}"


def parse_amp_conf(text: str) -> dict[str, str]:
    """The ``$amp_conf`` settings of a freepbx.conf, for tools and tests (values as written)."""
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
        m = _SHELL_ASSIGN.match(body)
        if m is not None:
            found[m.group(2)] = m.group(3)
    return found
