"""Redacting whole files: pick the syntax, mask every secret, keep every other byte.

The collector hands each file's text here with its kind (Asterisk, voicemail,
AEL, Lua, PHP, shell-style files, or text of no known syntax) and name, and
gets back the text to send, the rules that fired and, when asked, where they
fired (``agentctl snapshot --explain``). Lines are masked in place so a
reviewer can diff what was sent against the file on the box.

Speed: a full snapshot reads tens of megabytes. A line that holds none of the
needles below cannot need masking, so Asterisk files without block comments
are scanned for candidate lines only; voicemail, MeetMe, features and other
small files whose secrets stand in plain positions, and files with ``;--``
blocks, are read line by line in full (tests check both ways agree).
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from agent.collectors.pbxconfig.ael import redact_ael
from agent.collectors.pbxconfig.asterisk_conf import Kind, Line, classify, lex, split_comments
from agent.collectors.pbxconfig.freepbx import redact_shell
from agent.collectors.pbxconfig.lua import redact_lua
from agent.collectors.pbxconfig.php import redact_php
from agent.policy.conf_fields import (
    DIALPLAN_FAMILIES,
    FULL_PARSE_FAMILIES,
    SECTIONED_FAMILIES,
    family_of,
)
from agent.policy.local_rules import NO_LOCAL_RULES, LocalRules
from agent.policy.masks import Mask
from agent.policy.redact import Finding, Redactor, Where, find_secret_material

ASTERISK = "asterisk"
VOICEMAIL = "voicemail"
FREEPBX_PHP = "freepbx-php"
SHELL_VARS = "shell-vars"
AEL = "ael"
LUA = "lua"
PASSCODES = "passcodes"
TEXT = "text"

#: Bump on any change that can alter the redacted text of some input: results
#: cached by an older version are then redacted again (see snapshot.key_id).
#: 2: positions of trigger lines no longer shift after a "İ" (its lower case is
#: two characters long), which let the line after it through unmasked.
# 3: mwi lines without a host are masked on the line-by-line path too
# 4: argument- and position-aware rules (dialplan applications, MeetMe rooms,
#    setvar/set_var, [globals]), value shapes on every value, PHP/AEL/Lua readers,
#    markers merged per value
REDACTION_VERSION = 4

#: Sections of voicemail.conf that hold settings; every other section holds mailboxes.
VOICEMAIL_SETTINGS_SECTIONS = frozenset({"general", "zonemessages"})

#: A line can only change if it holds one of these (lower case) ...
_SECRET_WORDS = ("pass", "secret", "pwd", "token", "cred", "key", "pin", "cookie", "bearer")
_NEEDLES = ("pass", "secret", "pwd", "cred", "pin", "bearer")
#: ... or one of these, grouped behind a rarer character: each regular expression
#: starts with a literal the engine finds at C speed, and stands for several strings
#: (every distinct string searched would otherwise cost a pass over the text) ...
_GROUPED = (
    re.compile(r"k(?:ey|(?<=tok)en|(?<=cook)ie)"),  # key, token, cookie
    # dialplan applications and functions with a secret argument (agent.policy.dialplan),
    # and Dial (its D(digits) option)
    re.compile(
        r"\((?:(?<=disa\()|(?<=meetme\()|(?<=senddtmf\()|(?<=mysql\()|(?<=authenticate\()"
        r"|(?<=aes_encrypt\()|(?<=aes_decrypt\()|(?<=dial\())"
    ),
    re.compile(r"v(?:(?<=setv)|(?<=set_v))ar"),  # setvar, set_var: channel variables
)
#: ... or one of these words together with one of their marks (the loop runs over
#: whichever is rarer in the file) ...
_WORDS_WITH_MARKS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("@",), (":",)),  # credentials in a dial string, URL or registration
    (("regist", "mwi"), (":", "#")),  # register => user:secret@host
    (("auth",), (":", "#", "?", "&", "$")),  # auth lines, headers, parameters, $[…]
)
#: ... or a rare needle on a line that also holds one of these (the loop runs over
#: the needle): every distinct string searched costs a pass over the text.
_NEEDLES_WITH_MARKS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("set(", (":", "auth")),  # Set(LOGIN=user:pass), Set(API_AUTH=…)
)
#: ... and in dialplan files ([globals], extensions*), any variable: "auth" and user:pass.
_DIALPLAN_NEEDLES = ("auth", ":")
#: ... and in text of free syntax, the token formats of agent.policy.value_shapes.
_TOKEN_NEEDLES = ("eyj", "akia", "xox", "ghp_", "glpat-", "k_live_", "aiza")
_SECRET_WORD = re.compile(r"(?i)pass|secret|pwd|token|cred|key|pin(?:code)?(?![a-z])")
#: Files of bare PINs or passcodes: FreePBX's pinsets (ASTETCDIR/pinset_N) and files
#: an administrator named for what they hold (files of no known syntax only).
_PASSCODE_FILE = re.compile(r"^pinset_\d+$|passcode|passw(?:or)?d|^pins?(?:[._-]|$)|secret")
_WORDLIKE = re.compile(r"[\w./@-]+")
#: ... or a command-line flag that can carry a credential: -pX, -p X, -u user:pass,
#: any --long option, and the short flags of the tools in agent.policy.value_shapes
#: (-w, -a, -c, -x, -k); the same boundary as the shape rules. One regular
#: expression: it looks only at each "-", in C.
_FLAG = re.compile(r"-(?<![\w\-./]-)(?:[puwacxk]|-)")
#: A section header as the lexer sees it: "[" up to the first "]", no comment before it.
_SECTION = re.compile(r"^[ \t]*\[((?:[^\]\n;\\]|\\.)*)\]", re.M)
#: Sections whose values hold secrets by position, whatever the file is called.
_POSITIONAL_SECTION = re.compile(r"\[(?i:rooms|applicationmap)\]")


@dataclass(slots=True)
class Redacted:
    """The text to send for one file, the rules that fired and what went wrong."""

    text: str
    fired: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    dropped: str | None = None  # reason when the file must not be sent at all
    findings: list[Finding] | None = None  # with explain: each rule fired, by line


def kind_of(path: PurePosixPath, text: str) -> str:
    """Which syntax a file is written in, from its name (and PHP's opening tag)."""
    name = path.name.lower()
    if name == "freepbx.conf" or name.endswith(".php") or text.lstrip().startswith("<?php"):
        return FREEPBX_PHP
    if name == "amportal.conf" or name.endswith(".env"):
        return SHELL_VARS
    if name.endswith(".ael"):
        return AEL
    if name.endswith(".lua"):
        return LUA
    if name.startswith("voicemail") or name.startswith("vm_"):
        return VOICEMAIL
    if name.endswith((".conf", ".custom", ".inc")) or ".conf." in name:
        return ASTERISK
    if _PASSCODE_FILE.search(name):
        return PASSCODES
    return TEXT


def redaction_id(local: LocalRules = NO_LOCAL_RULES) -> str:
    """What a redacted result depends on besides the text: the code and the local rules."""
    return f"{REDACTION_VERSION}" + (f"+{local.digest}" if local else "")


def redact_text(
    text: str,
    kind: str,
    key: bytes,
    *,
    name: str = "",
    local: LocalRules = NO_LOCAL_RULES,
    explain: bool = False,
) -> Redacted:
    """Mask every secret in ``text`` written in syntax ``kind``; see the module docstring.

    ``name`` is the file's name (its type decides positional rules); ``local``
    the administrator's extra rules; ``explain`` lists each rule fired by line.
    """
    # Token formats (JWT, AWS, …) are looked for in text of free syntax; Asterisk's
    # own files keep secrets under keys and positions, and looking for every
    # format in every line would cost the fast path a pass over the text each.
    tokens = kind not in (ASTERISK, VOICEMAIL)
    redactor = Redactor(key, local=local, explain=explain, tokens=tokens)
    reason = find_secret_material(text)
    if reason is not None:
        return Redacted("", Counter({"pem-private-key": 1}), [], dropped=reason)
    family = family_of(name)
    if kind == FREEPBX_PHP:
        out = redact_php(text, redactor)
    elif kind == SHELL_VARS:
        out = redact_shell(text, redactor)
    elif kind == AEL:
        out = redact_ael(text, redactor)
    elif kind == LUA:
        out = redact_lua(text, redactor)
    elif kind == PASSCODES:
        out = _passcodes(text, redactor)
    elif kind == TEXT:
        out = _on_candidate_lines(text, _text_line, redactor, "")
    elif kind == ASTERISK and _fast_path_fits(text, family, local):
        out = _on_candidate_lines(text, _fast_asterisk_line, redactor, family)
    else:
        out = redact_asterisk(text, redactor, voicemail=kind == VOICEMAIL, family=family)
    out = redactor.local_pass(out)
    return Redacted(out, Counter(redactor.fired), findings=redactor.findings)


def _fast_path_fits(text: str, family: str, local: LocalRules) -> bool:
    """Whether candidate lines are enough: no blocks, no positional file, no local key rule."""
    if ";--" in text or family in FULL_PARSE_FAMILIES or local.keys:
        return False
    # Sections whose values hold secrets by position, whatever the file is called.
    return _POSITIONAL_SECTION.search(text) is None


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
    find, rfind, add = low.find, low.rfind, starts.add
    pos = find(needle)
    if not also:
        while pos >= 0:
            add(rfind("\n", 0, pos) + 1)
            end = find("\n", pos)
            if end < 0:
                return
            pos = find(needle, end)
        return
    for_one = also[0] if len(also) == 1 else None
    while pos >= 0:
        start = rfind("\n", 0, pos) + 1
        end = find("\n", pos)
        stop = len(low) if end < 0 else end
        if for_one is not None:
            if find(for_one, start, stop) >= 0:
                add(start)
        else:
            for a in also:
                if find(a, start, stop) >= 0:
                    add(start)
                    break
        if end < 0:
            return
        pos = find(needle, end)


def _candidate_starts(
    text: str, dialplan: bool = False, local: LocalRules = NO_LOCAL_RULES, tokens: bool = False
) -> list[int]:
    """Starts of the lines any rule could change (a superset; see the needles above).

    Python pays per occurrence found, so for the words that count only next to a
    mark the loop runs over whichever is rarer in this file, the words or the
    marks: both find the same lines.
    """
    low = _fold(text)
    starts: set[int] = set()
    for word in _NEEDLES:
        _lines_holding(low, word, (), starts)
    for rx in _GROUPED:
        for m in rx.finditer(low):
            starts.add(low.rfind("\n", 0, m.start()) + 1)
    if dialplan:
        for word in _DIALPLAN_NEEDLES:
            _lines_holding(low, word, (), starts)
    if tokens:
        for word in _TOKEN_NEEDLES:
            _lines_holding(low, word, (), starts)
    for m in _FLAG.finditer(low):
        starts.add(low.rfind("\n", 0, m.start()) + 1)
    for needle, also in _NEEDLES_WITH_MARKS:
        _lines_holding(low, needle, also, starts)
    for words, all_marks in _WORDS_WITH_MARKS:
        # The marks are single characters: counting them runs at memory speed,
        # and without one the words (a pass over the text each) need no look.
        counts = {m: low.count(m) for m in all_marks}
        marks = tuple(m for m, n in counts.items() if n)
        n_marks = sum(counts.values())
        if n_marks == 0:
            continue
        # Few marks (at most one per KiB): looping over them is cheaper than
        # looking for the words, which costs a pass over the text per word.
        by_marks = n_marks * 1024 <= len(low)
        if not by_marks:
            n_words = sum(low.count(w) for w in words)
            if n_words == 0:
                continue
            by_marks = n_marks < n_words
        pairs = [(m, words) for m in marks] if by_marks else [(w, marks) for w in words]
        for needle, also in pairs:
            _lines_holding(low, needle, also, starts)
    for app in local.arguments:
        _lines_holding(low, app + "(", (), starts)
    for pattern in local.values:
        for m in pattern.finditer(text):
            starts.add(text.rfind("\n", 0, m.start()) + 1)
    return sorted(starts)


_LineFix = Callable[[str, Redactor, Where], str]


def _on_candidate_lines(text: str, fix: _LineFix, redactor: Redactor, family: str) -> str:
    """Apply ``fix`` to each candidate line; other lines are copied as they are."""
    starts = _candidate_starts(
        text, family in DIALPLAN_FAMILIES, redactor.local, tokens=redactor.tokens
    )
    if not starts:
        return text
    # Sections matter only in some types of file ([globals] of a dialplan …).
    sections = (
        [(m.start(), m.group(1)) for m in _SECTION.finditer(text)]
        if family in SECTIONED_FAMILIES
        else []
    )
    positions = [p for p, _ in sections]
    plain = Where(family)
    explain = redactor.findings is not None
    out: list[str] = []
    append = out.append
    find = text.find
    last = 0
    line_no, counted = 1, 0
    for start in starts:
        end = find("\n", start)
        if end < 0:
            end = len(text)
        append(text[last:start])
        if sections:
            i = bisect.bisect_right(positions, start) - 1
            where = Where(family, sections[i][1] if i >= 0 else "")
        else:
            where = plain
        if explain:
            line_no += text.count("\n", counted, start)
            counted = start
            redactor.line = line_no
        append(fix(text[start:end], redactor, where))
        last = end
    append(text[last:])
    return "".join(out)


def _passcodes(text: str, redactor: Redactor) -> str:
    """A file of PINs or passcodes, one a line (FreePBX's pinset_N, Authenticate's and
    DISA's password files): each line's first field is masked, comments kept."""
    masks: list[Mask] = []
    pos = 0
    for raw in text.split("\n"):
        body = raw.rstrip("\r")
        stripped = body.strip()
        if stripped and not stripped.startswith((";", "#")):
            lead = len(body) - len(body.lstrip())
            # DISA: passcode|context|callerid|mailbox@context: the rest is structure.
            end = body.find("|", lead)
            end = len(body.rstrip()) if end < 0 else end
            masks.append(Mask(pos + lead, pos + end, "passcode-file", "passcode line"))
        pos += len(raw) + 1
    return redactor.render(text, masks, first_line=1)


def _text_line(line: str, redactor: Redactor, where: Where) -> str:
    changed = redactor.free_text(line)
    if changed is not None:
        return changed
    if _SECRET_WORD.search(line) and "=" in line:
        return redactor.whole_line(line)
    return line


def _fast_asterisk_line(raw: str, redactor: Redactor, where: Where) -> str:
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
            new = redactor.conf_value(key, body[start:end], where)
            if new is None:
                return raw
            return body[:start] + new + body[end:] + raw[len(body) :]
    segs, _ = split_comments(body, 0)
    line = Line(number=0, raw=body, segments=segs)
    classify(line)
    return redact_line(line, redactor, where) + raw[len(body) :]


def redact_asterisk(text: str, redactor: Redactor, *, voicemail: bool, family: str = "") -> str:
    """The line-by-line path: every line parsed, block comments and sections followed."""
    out: list[str] = []
    section = ""
    lines = lex(text)
    # voicemail.conf's aliasescontext names a section of "alias => mailbox@context".
    settings = set(VOICEMAIL_SETTINGS_SECTIONS)
    if voicemail:
        settings.update(
            ln.value.lower()
            for ln in lines
            if ln.kind is Kind.ASSIGN and ln.key.lower() == "aliasescontext"
        )
    for line in lines:
        if line.kind is Kind.SECTION:
            section = line.section
        mailbox = voicemail and bool(section) and section.lower() not in settings
        ending = line.raw[len(line.raw.rstrip("\r\n")) :]
        line.raw = line.raw[: len(line.raw) - len(ending)]
        redactor.line = line.number
        out.append(redact_line(line, redactor, Where(family, section, mailbox)) + ending)
    return "".join(out)


def redact_line(line: Line, redactor: Redactor, where: Where) -> str:
    """One Asterisk line with its secrets masked; the line ending is not part of ``raw``."""
    raw = line.raw
    pieces: list[str] = []
    code_segs = line.code_segments
    whole = False
    if line.kind is Kind.ASSIGN and len(code_segs) > 1:
        # A block comment splits the value: Asterisk joins the parts; mask it all.
        whole = bool(redactor.conf_masks(line.key, line.value, where))
    elif line.kind is Kind.UNKNOWN and _SECRET_WORD.search(line.code):
        whole = True
    for seg in line.segments:
        text = raw[seg.start : seg.end]
        if seg.comment:
            pieces.append(_comment(text, redactor, where))
        elif whole:
            pieces.append(redactor.whole_line(text) if text.strip() else text)
        elif line.kind is Kind.ASSIGN:
            pieces.append(_assignment(text, line, redactor, where))
        elif line.kind in (Kind.DIRECTIVE, Kind.UNKNOWN):
            pieces.append(redactor.free_text(text) or text)
        else:
            pieces.append(text)
    return "".join(pieces)


def _assignment(text: str, line: Line, redactor: Redactor, where: Where) -> str:
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
    new = redactor.conf_value(line.key, text[start:end], where)
    if new is None:
        return text
    return text[:start] + new + text[end:]


def _comment(text: str, redactor: Redactor, where: Where) -> str:
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
            pieces.append(_comment(part, redactor, where))
        elif inner.kind is Kind.ASSIGN and _WORDLIKE.fullmatch(inner.key):
            inner_where = Where(where.family, where.section, where.mailbox and inner.op == "=>")
            pieces.append(_assignment(part, inner, redactor, inner_where))
        else:
            pieces.append(redactor.free_text(part) or part)
    return text[:lead] + "".join(pieces) + text[len(text) - tail_len :]
