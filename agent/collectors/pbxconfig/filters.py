"""Redacting whole files: pick the syntax, mask every secret, keep every other byte.

The collector hands each file's text here with its kind (Asterisk, voicemail,
FreePBX's PHP or shell-style files, or text of no known syntax) and gets back
the text to send and the rules that fired. Lines are masked in place so a
reviewer can diff what was sent against the file on the box.

Speed: a full snapshot reads tens of megabytes. A line that matches none of
:data:`agent.policy.redact.TRIGGER` cannot need masking, so files without block
comments are scanned for trigger lines only; voicemail files and files with
``;--`` blocks take the line-by-line path (a test checks both agree).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from agent.collectors.pbxconfig import freepbx
from agent.collectors.pbxconfig.asterisk_conf import Kind, Line, classify, lex, split_comments
from agent.policy.redact import TRIGGER, Redactor, find_secret_material, is_secretish_key

ASTERISK = "asterisk"
VOICEMAIL = "voicemail"
FREEPBX_PHP = "freepbx-php"
SHELL_VARS = "shell-vars"
TEXT = "text"

#: Bump on any change that can alter the redacted text of some input: results
#: cached by an older version are then redacted again (see snapshot.key_id).
#: 2: positions of trigger lines no longer shift after a "İ" (its lower case is
#: two characters long), which let the line after it through unmasked.
# 3: mwi lines without a host are masked on the line-by-line path too
REDACTION_VERSION = 3

#: Sections of voicemail.conf that hold settings; every other section holds mailboxes.
VOICEMAIL_SETTINGS_SECTIONS = frozenset({"general", "zonemessages"})

#: A line can only change if it holds one of these words (lower case) ...
_SECRET_WORDS = ("pass", "secret", "pwd", "token", "cred", "key", "pin")
#: ... or a '@' with a ':' (credentials embedded in a dial string, URL or registration) ...
#: ... or is an auth/register/mwi line with a ':' or '#' (user:secret, user#md5secret).
_CRED_WORDS = ("auth", "regist", "mwi")
_SECRET_WORD = re.compile(r"(?i)pass|secret|pwd|token|cred|key|pin(?:code)?(?![a-z])")
_WORDLIKE = re.compile(r"[\w./@-]+")


@dataclass(slots=True)
class Redacted:
    """The text to send for one file, the rules that fired and what went wrong."""

    text: str
    fired: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    dropped: str | None = None  # reason when the file must not be sent at all


def kind_of(path: PurePosixPath, text: str) -> str:
    """Which syntax a file is written in, from its name (and PHP's opening tag)."""
    name = path.name.lower()
    if name == "freepbx.conf" or text.lstrip().startswith("<?php"):
        return FREEPBX_PHP
    if name == "amportal.conf" or name.endswith(".env"):
        return SHELL_VARS
    if name.startswith("voicemail") or name.startswith("vm_"):
        return VOICEMAIL
    if name.endswith((".conf", ".custom", ".inc")) or ".conf." in name:
        return ASTERISK
    return TEXT


def redact_text(text: str, kind: str, key: bytes) -> Redacted:
    """Mask every secret in ``text`` written in syntax ``kind``; see the module docstring."""
    redactor = Redactor(key)
    reason = find_secret_material(text)
    if reason is not None:
        return Redacted("", Counter({"pem-private-key": 1}), [], dropped=reason)
    if kind == FREEPBX_PHP:
        out = freepbx.redact_php(text, redactor)
    elif kind == SHELL_VARS:
        out = freepbx.redact_shell(text, redactor)
    elif kind == TEXT:
        out = _on_trigger_lines(text, _text_line, redactor)
    elif kind == ASTERISK and ";--" not in text:
        out = _on_trigger_lines(text, _fast_asterisk_line, redactor)
    else:
        out = redact_asterisk(text, redactor, voicemail=kind == VOICEMAIL)
    return Redacted(out, Counter(redactor.fired))


#: Lower case for the trigger words, one character for one. ``str.lower`` is not
#: enough: it turns "İ" into two characters, which would shift every later position
#: and point the fast path at the wrong lines (a secret line would then pass
#: unmasked). The rules' regexes are Unicode case-insensitive, so the four
#: non-ASCII letters they equate with ASCII ones (ı İ ſ K) are folded too.
_FOLD: dict[int, int] = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)} | {
    0x130: ord("i"),
    0x131: ord("i"),
    0x17F: ord("s"),
    0x212A: ord("k"),
}


def _fold(text: str) -> str:
    """``text`` lower-cased for matching ASCII words; ``fold(t)[i]`` stands for ``t[i]``."""
    if text.isascii():
        return text.lower()
    return text.translate(_FOLD)


def _lines_holding(low: str, needle: str, also: tuple[str, ...], starts: set[int]) -> None:
    """Add to ``starts`` the start of each line of ``low`` holding ``needle``
    and, when ``also`` is not empty, one of the strings in ``also``."""
    find = low.find
    pos = find(needle)
    while pos >= 0:
        start = low.rfind("\n", 0, pos) + 1
        end = find("\n", pos)
        stop = len(low) if end < 0 else end
        if not also or any(find(a, start, stop) >= 0 for a in also):
            starts.add(start)
        if end < 0:
            return
        pos = find(needle, end)


#: Words that count only on a line that also holds one of the marks.
_WORDS_WITH_MARKS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("@",), (":",)),
    (_CRED_WORDS, (":", "#")),
)


def _candidate_starts(text: str) -> list[int]:
    """Starts of the lines any rule could change (a superset; see the words above).

    Python pays per occurrence found, so for the words that count only next to a
    mark the loop runs over whichever is rarer in this file, the words or the
    marks: both find the same lines.
    """
    low = _fold(text)
    starts: set[int] = set()
    for word in _SECRET_WORDS:
        _lines_holding(low, word, (), starts)
    for words, marks in _WORDS_WITH_MARKS:
        n_marks = sum(low.count(m) for m in marks)
        if n_marks == 0:
            continue
        # Few marks (at most one per KiB): looping over them is cheaper than
        # counting the words, which costs a pass over the text per word.
        by_marks = n_marks * 1024 <= len(low) or n_marks < sum(low.count(w) for w in words)
        pairs = [(m, words) for m in marks] if by_marks else [(w, marks) for w in words]
        for needle, also in pairs:
            _lines_holding(low, needle, also, starts)
    return sorted(starts)


def _on_trigger_lines(text: str, fix: Callable[[str, Redactor], str], redactor: Redactor) -> str:
    """Apply ``fix`` to each candidate line; other lines are copied as they are."""
    starts = _candidate_starts(text)
    if not starts:
        return text
    out: list[str] = []
    append = out.append
    find = text.find
    last = 0
    for start in starts:
        end = find("\n", start)
        if end < 0:
            end = len(text)
        append(text[last:start])
        append(fix(text[start:end], redactor))
        last = end
    append(text[last:])
    return "".join(out)


def _text_line(line: str, redactor: Redactor) -> str:
    changed = redactor.free_text(line)
    if changed is not None:
        return changed
    if _SECRET_WORD.search(line) and "=" in line:
        return redactor.whole_line(line)
    return line


def _fast_asterisk_line(raw: str, redactor: Redactor) -> str:
    body = raw.rstrip("\r")
    if ";" not in body and "\\" not in body and "=" in body:
        # The common generated line "key=value": no comment, no escape, no block.
        head = body.lstrip()
        if head and head[0] not in "[#":
            eq = body.find("=")
            start = eq + 1
            key = body[:eq].strip()
            if body.startswith(">", start):
                start += 1
            elif key.endswith("+"):
                key = key[:-1].rstrip()
            end = len(body)
            while start < end and body[start].isspace():
                start += 1
            while end > start and body[end - 1].isspace():
                end -= 1
            new = redactor.assignment(key, body[start:end])
            if new is None:
                return raw
            return body[:start] + new + body[end:] + raw[len(body) :]
    segs, _ = split_comments(body, 0)
    line = Line(number=0, raw=body, segments=segs)
    classify(line)
    return redact_line(line, redactor, mailbox=False) + raw[len(body) :]


def redact_asterisk(text: str, redactor: Redactor, *, voicemail: bool) -> str:
    """The line-by-line path: block comments and voicemail mailbox sections."""
    out: list[str] = []
    section = ""
    for line in lex(text):
        if line.kind is Kind.SECTION:
            section = line.section.lower()
        if not voicemail and not TRIGGER.search(line.raw):
            out.append(line.raw)
            continue
        mailbox = voicemail and bool(section) and section not in VOICEMAIL_SETTINGS_SECTIONS
        ending = line.raw[len(line.raw.rstrip("\r\n")) :]
        line.raw = line.raw[: len(line.raw) - len(ending)]
        out.append(redact_line(line, redactor, mailbox=mailbox) + ending)
    return "".join(out)


def redact_line(line: Line, redactor: Redactor, *, mailbox: bool) -> str:
    """One Asterisk line with its secrets masked; the line ending is not part of ``raw``."""
    raw = line.raw
    pieces: list[str] = []
    code_segs = line.code_segments
    whole = False
    if line.kind is Kind.ASSIGN and len(code_segs) > 1:
        # A block comment splits the value: Asterisk joins the parts; mask it all.
        new = redactor.assignment(line.key, line.value, mailbox=mailbox)
        whole = new is not None
    elif line.kind is Kind.UNKNOWN and _SECRET_WORD.search(line.code):
        whole = True
    for seg in line.segments:
        text = raw[seg.start : seg.end]
        if seg.comment:
            pieces.append(_comment(text, redactor, mailbox=mailbox))
        elif whole:
            pieces.append(redactor.whole_line(text) if text.strip() else text)
        elif line.kind is Kind.ASSIGN:
            pieces.append(_assignment(text, line, redactor, mailbox=mailbox))
        elif line.kind in (Kind.DIRECTIVE, Kind.UNKNOWN):
            pieces.append(redactor.free_text(text) or text)
        else:
            pieces.append(text)
    return "".join(pieces)


def _assignment(text: str, line: Line, redactor: Redactor, *, mailbox: bool) -> str:
    eq = text.find("=")
    if eq < 0:
        return text
    start = eq + 1
    if line.op == "=>":
        start += 1
    end = len(text)
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    value = text[start:end]
    new = redactor.assignment(line.key, value, mailbox=mailbox)
    if new is None:
        return text
    return text[:start] + new + text[end:]


def _comment(text: str, redactor: Redactor, *, mailbox: bool) -> str:
    # Keep the comment's marks; read what is between as Asterisk would if it were
    # uncommented (a commented-out "secret=old ; note" still holds a secret).
    lead = len(text) - len(text.lstrip(";-"))
    tail_len = 3 if text.endswith("--;") and len(text) - 3 >= lead else 0
    body = text[lead : len(text) - tail_len]
    segs, _ = split_comments(body, 0)
    inner = Line(number=0, raw=body, segments=segs)
    classify(inner)
    pieces: list[str] = []
    for seg in segs:
        part = body[seg.start : seg.end]
        if seg.comment:
            pieces.append(_comment(part, redactor, mailbox=mailbox))
        elif inner.kind is Kind.ASSIGN and _WORDLIKE.fullmatch(inner.key):
            mbox = mailbox and inner.op == "=>"
            pieces.append(_assignment(part, inner, redactor, mailbox=mbox))
        else:
            pieces.append(redactor.free_text(part) or part)
    return text[:lead] + "".join(pieces) + text[len(text) - tail_len :]


def secretish(key: str) -> bool:
    """Re-exported for the FreePBX readers: whether a key's name looks secret."""
    return is_secretish_key(key)
