"""Dialplan applications and functions that take a secret, and which argument it is.

The table below comes from Asterisk's own documentation of each application
and function (the XML in apps/, funcs/ and addons/ of the Asterisk sources,
read for this purpose; positions as the code declares them with
``AST_APP_ARG``). Arguments are split as Asterisk splits them
(``__ast_app_separate_args`` in main/app.c): at commas outside parentheses,
brackets and double quotes, a backslash escaping the next character; the last
declared argument takes the rest of the data, commas included.

Besides positional secrets (:data:`APPLICATIONS`) the reader knows:

- ``Set(name=value)`` and ``MSet(n1=v1,n2=v2)``: a secret-looking name
  (``DB_PASS``, ``__API_TOKEN``, ``GLOBAL(TRUNK_SECRET)``, ``CURLOPT(userpwd)``,
  ``DB(AMPUSER/100/password)``, ``CONFBRIDGE(user,pin)``) masks its value; any
  other value is still checked for a ``user:password`` pair and every shape;
- ``Dial()``'s ``D(called:calling:progress)`` option: DTMF sent after answer,
  typically a conference or calling-card PIN;
- ``MYSQL(Connect connid host user password db)`` (addons/app_mysql.c, in
  Asterisk up to 20): the fifth word;
- a call whose own name looks secret (an ``ODBC_CHECK_PIN()`` from
  func_odbc.conf, a ``Macro(check-pin,…)`` or ``Gosub(sub-auth,s,1(…))``): its
  literal arguments;
- ``$[${PIN} = 1234]``: a literal compared with a secret-looking variable;
- calls nested anywhere (``ExecIf(…?Set(…))``, ``${CURL(…)}``).

Applications whose names suggest a secret but which take none are listed in
:data:`NO_SECRET_ARGUMENTS` with the reason, so the absence is a decision.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from agent.policy.local_rules import NO_LOCAL_RULES, LocalRules
from agent.policy.masks import Mask
from agent.policy.secret_names import (
    is_secret_key,
    is_secret_variable,
    is_setting_value,
)
from agent.policy.value_shapes import (
    command_masks,
    is_reference,
    secret_value_masks,
    user_password_masks,
)

__all__ = [
    "APPLICATIONS",
    "COMMAND_ARGUMENTS",
    "NO_SECRET_ARGUMENTS",
    "AppSpec",
    "assignment_masks",
    "call_masks",
    "comparison_masks",
    "dialplan_masks",
    "find_close",
    "split_args",
]


@dataclass(frozen=True, slots=True)
class AppSpec:
    """Where an application or function keeps a secret among its arguments."""

    name: str
    secret: tuple[int, ...]  # 1-based positions
    nargs: int  # declared arguments; the last one takes the rest of the data
    what: str
    doc: str
    paths: bool = False  # a value starting with "/" names a file or an AstDB family
    keep: frozenset[str] = field(default_factory=frozenset)  # literal settings, not secrets


#: Applications and functions with a secret argument, by lower-case name.
APPLICATIONS: dict[str, AppSpec] = {
    s.name.lower(): s
    for s in (
        AppSpec(
            "Authenticate",
            (1,),
            4,
            "the password the caller must enter",
            "apps/app_authenticate.c: Authenticate(password,options,maxdigits,prompt)",
            paths=True,
        ),
        AppSpec(
            "DISA",
            (1,),
            5,
            "the passcode for outside dial tone",
            "apps/app_disa.c: DISA(passcode|filename,context,cid,mailbox,options)",
            paths=True,
            keep=frozenset({"no-password"}),
        ),
        AppSpec(
            "MeetMe",
            (3,),
            3,
            "the conference PIN",
            "apps/app_meetme.c: MeetMe(confno,options,pin)",
        ),
        AppSpec(
            "SendDTMF",
            (1,),
            5,
            "digits sent to the far end (a conference or voicemail PIN)",
            "apps/app_senddtmf.c: SendDTMF(digits,timeout_ms,duration_ms,channel,options)",
        ),
        AppSpec(
            "AES_ENCRYPT",
            (1,),
            2,
            "the encryption key",
            "funcs/func_aes.c: AES_ENCRYPT(key,string)",
        ),
        AppSpec(
            "AES_DECRYPT",
            (1,),
            2,
            "the encryption key",
            "funcs/func_aes.c: AES_DECRYPT(key,string)",
        ),
    )
}

#: Arguments that are command lines (``command-flag`` rules look inside them).
COMMAND_ARGUMENTS: dict[str, int] = {
    "system": 1,  # apps/app_system.c: System(command)
    "trysystem": 1,
    "agi": 1,  # res/res_agi.c: AGI(command,arg1,…): the script and its arguments
    "eagi": 1,
    "deadagi": 1,
    "externalivr": 1,  # apps/app_externalivr.c: ExternalIVR(command|ivr://host,options)
    "mixmonitor": 3,  # apps/app_mixmonitor.c: MixMonitor(file,options,command)
    "queue": 6,  # apps/app_queue.c: Queue(queuename,options,URL,announce,timeout,AGI,…)
    "shell": 1,  # funcs/func_shell.c: SHELL(command)
}

#: Looked at and found to take no secret, with the reason.
NO_SECRET_ARGUMENTS: dict[str, str] = {
    "confbridge": "ConfBridge(conference,bridge_profile,user_profile,menu): PINs live in "
    "confbridge.conf user profiles (pin=) or in CONFBRIDGE(user,pin)=, both masked",
    "vmauthenticate": "VMAuthenticate(mailbox,options) checks the mailbox's own password "
    "from voicemail.conf (masked there); it takes none",
    "voicemailmain": "VoiceMailMain(mailbox@context,options): option s skips the password",
    "voicemail": "VoiceMail(mailboxes,options): no secret",
    "page": "Page(channels,options,timeout): its options carry no codes",
    "chanspy": "ChanSpy(prefix,options): its options carry DTMF keys for control, not codes",
    "extenspy": "ExtenSpy(exten@context,options): as ChanSpy",
    "pickup": "Pickup(extension@context): no secret",
    "pickupchan": "PickupChan(channel,options): no secret",
    "db_keys": "DB_KEYS(prefix): names AstDB keys",
    "db_keycount": "DB_KEYCOUNT(prefix): a count",
    "hashkeys": "HASHKEYS(name): names the keys of a hash",
    "hangupcause_keys": "HANGUPCAUSE_KEYS(): channel names",
}

# Asterisk takes an application's name up to the "(" (pbx_config.c): "Dial (…)" names
# no application. AEL's grammar allows blanks there.
_CALL = re.compile(r"(?<![\w$])([A-Za-z_][\w.]*)\(")
_CALL_AEL = re.compile(r"(?<![\w$])([A-Za-z_][\w.]*)[ \t]*\(")
_CMP = re.compile(
    r"\$\{([A-Za-z_]\w*)\}\"?[ \t]*(?:!=|==|=)[ \t]*\"?([^\"\s\]?:&|()]+)"
    r"|\"?([^\"\s\[\]$()?:&|=]+)\"?[ \t]*(?:!=|==|=)[ \t]*\"?\$\{([A-Za-z_]\w*)\}"
)


def find_close(text: str, start: int, end: int) -> int:
    """The ``)`` closing a ``(`` just before ``start`` (parentheses counted, ``\\`` escapes).

    Returns ``end`` when there is none: Asterisk then takes the rest as the data.
    """
    depth = 1
    i = start
    while i < end:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return end


def split_args(
    text: str, start: int, end: int, nargs: int = 0, delim: str = ","
) -> list[tuple[int, int]]:
    """The spans of the arguments in ``text[start:end]``, as Asterisk splits them."""
    spans: list[tuple[int, int]] = []
    paren = bracket = 0
    quote = False
    arg = start
    i = start
    while i < end:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "(":
            paren += 1
        elif c == ")":
            paren = max(0, paren - 1)
        elif c == "[":
            bracket += 1
        elif c == "]":
            bracket = max(0, bracket - 1)
        elif c == '"' and delim != '"':
            quote = not quote
        elif c == delim and not (paren or quote or bracket):
            if nargs and len(spans) == nargs - 1:
                break
            spans.append((arg, i))
            arg = i + 1
        i += 1
    spans.append((arg, end))
    return spans


def _inner(text: str, start: int, end: int) -> tuple[int, int]:
    """The span without surrounding blanks and one pair of double quotes."""
    while start < end and text[start] in " \t":
        start += 1
    while end > start and text[end - 1] in " \t":
        end -= 1
    if end - start >= 2 and text[start] == '"' and text[end - 1] == '"':
        return start + 1, end - 1
    return start, end


def _literal(text: str, start: int, end: int, *, paths: bool = False) -> bool:
    """Whether ``text[start:end]`` holds a literal (not empty, not only references)."""
    value = text[start:end]
    if not value.strip() or is_reference(value):
        return False
    return not (paths and value.startswith("/"))


def assignment_masks(
    name: str,
    value_start: int,
    value_end: int,
    text: str,
    *,
    local: LocalRules = NO_LOCAL_RULES,
    rule: str = "secret-variable",
    literal: bool = False,
) -> list[Mask]:
    """Masks for ``name = value`` where ``name`` is a variable (``text[value_start:value_end]``).

    ``literal``: the value is taken as written (a ``setvar=`` in a channel
    configuration), so a ``${…}`` in it is text, not a reference to a secret.
    """
    key = name.strip()
    value = text[value_start:value_end]
    if not value.strip():
        return []
    if not literal and is_reference(value):
        return []
    flat = key.lower().replace(" ", "").replace("\t", "")
    if local.key_matches(key):
        return secret_value_masks(value, "local-key", key, value_start)
    if is_secret_variable(key) and not is_setting_value(flat, value):
        return secret_value_masks(value, rule, key, value_start)
    return user_password_masks(value, value_start)


def dialplan_masks(
    text: str,
    start: int = 0,
    end: int | None = None,
    *,
    local: LocalRules = NO_LOCAL_RULES,
    ael: bool = False,
) -> list[Mask]:
    """Masks for every application or function call in ``text[start:end]``, nested ones too.

    ``ael``: AEL's syntax, where blanks may stand between a name and its "(".
    """
    stop = len(text) if end is None else end
    out: list[Mask] = []
    pos = start
    call = _CALL_AEL if ael else _CALL
    while True:
        m = call.search(text, pos, stop)
        if m is None:
            break
        open_ = m.end()
        close = find_close(text, open_, stop)
        _call(m.group(1), text, open_, close, out, local)
        pos = open_  # nested calls inside the arguments are looked at too
    if "$[" in text:
        _comparisons(text, start, stop, out)
    return out


def call_masks(
    name: str, text: str, start: int, end: int, *, local: LocalRules = NO_LOCAL_RULES
) -> list[Mask]:
    """Masks for one call of ``name`` whose data is ``text[start:end]`` (without nested calls)."""
    out: list[Mask] = []
    _call(name, text, start, end, out, local)
    return out


def _call(name: str, text: str, start: int, end: int, out: list[Mask], local: LocalRules) -> None:
    low = name.lower()
    if low in ("set", "setvar"):
        eq = text.find("=", start, end)
        if eq >= 0:
            out.extend(assignment_masks(text[start:eq], eq + 1, end, text, local=local))
        return
    if low == "mset":
        for a, b in split_args(text, start, end):
            eq = text.find("=", a, b)
            if eq >= 0:
                out.extend(assignment_masks(text[a:eq], eq + 1, b, text, local=local))
        return
    spec = APPLICATIONS.get(low)
    extra = local.secret_arguments(low)
    if spec is not None or extra:
        nargs = spec.nargs if spec is not None else 0
        args = split_args(text, start, end, nargs)
        builtin = spec.secret if spec is not None else ()
        for pos in sorted(set(builtin) | extra):
            if pos > len(args):
                continue
            a, b = _inner(text, *args[pos - 1])
            paths = spec.paths if spec is not None and pos in builtin else False
            if not _literal(text, a, b, paths=paths):
                continue
            if spec is not None and pos in builtin and text[a:b].lower() in spec.keep:
                continue
            rule = "secret-argument" if pos in builtin else "local-argument"
            out.append(Mask(a, b, rule, f"{spec.name if spec else name} argument {pos}"))
        return
    if low in COMMAND_ARGUMENTS:
        args = split_args(text, start, end)
        n = COMMAND_ARGUMENTS[low]
        if n <= len(args):
            a, b = args[n - 1] if low not in ("system", "trysystem", "shell") else (start, end)
            out.extend(Mask(a + m.start, a + m.end, m.rule, name) for m in command_masks(text[a:b]))
        return
    if low == "dial":
        args = split_args(text, start, end, 4)
        if len(args) >= 3:
            _dial_options(text, *args[2], out)
        return
    if low == "mysql":
        _mysql(text, start, end, out)
        return
    if low in ("macro", "gosub"):
        _callee(low, text, start, end, out)
        return
    if low not in NO_SECRET_ARGUMENTS and is_secret_key(name):
        # A function or application named like a secret (ODBC_CHECK_PIN): its literals.
        for a, b in split_args(text, start, end):
            a, b = _inner(text, a, b)
            if _literal(text, a, b):
                out.append(Mask(a, b, "secret-argument", f"arguments of {name}"))


def _dial_options(text: str, start: int, end: int, out: list[Mask]) -> None:
    """Dial's ``D(called:calling:progress)``: DTMF sent after answer (often a PIN)."""
    i = start
    while i < end:
        if i + 1 < end and text[i + 1] == "(":
            close = find_close(text, i + 2, end)
            if text[i] == "D" and _literal(text, i + 2, close):
                out.append(Mask(i + 2, close, "secret-argument", "Dial option D"))
            i = close + 1
        else:
            i += 1


def _mysql(text: str, start: int, end: int, out: list[Mask]) -> None:
    """``MYSQL(Connect connid host user password db)``: the password is the fifth word."""
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text[start:end])]
    if len(words) >= 5 and text[start + words[0][0] : start + words[0][1]].lower() == "connect":
        a, b = start + words[4][0], start + words[4][1]
        if _literal(text, a, b):
            out.append(Mask(a, b, "secret-argument", "MYSQL Connect password"))


def _callee(low: str, text: str, start: int, end: int, out: list[Mask]) -> None:
    """``Macro(name,args…)`` and ``Gosub(ctx,ext,prio(args…))`` to a secret-named target."""
    args = split_args(text, start, end)
    if low == "macro":
        if not args or not is_secret_key(text[args[0][0] : args[0][1]]):
            return
        targets = args[1:]
        what = f"arguments of macro {text[args[0][0] : args[0][1]].strip()}"
    else:
        a, b = args[-1]
        paren = text.find("(", a, b)
        if paren < 0:
            return
        names = [text[x:y] for x, y in args[:-1]] + [text[a:paren]]
        if not any(is_secret_key(n) for n in names):
            return
        targets = split_args(text, paren + 1, find_close(text, paren + 1, b))
        what = f"arguments of subroutine {','.join(n.strip() for n in names)}"
    for x, y in targets:
        x, y = _inner(text, x, y)
        if _literal(text, x, y):
            out.append(Mask(x, y, "secret-argument", what))


def comparison_masks(text: str, start: int = 0, end: int | None = None) -> list[Mask]:
    """Literals compared with secret-looking variables (``$[${PIN} = 1234]``, AEL ``if``)."""
    out: list[Mask] = []
    _comparisons(text, start, len(text) if end is None else end, out)
    return out


def _comparisons(text: str, start: int, end: int, out: list[Mask]) -> None:
    """``$[${PIN} = 1234]``: a literal compared with a secret-looking variable."""
    for m in _CMP.finditer(text, start, end):
        if m.group(1) is not None:
            name, group = m.group(1), 2
        else:
            name, group = m.group(4), 3
        if is_secret_variable(name) and _literal(text, m.start(group), m.end(group)):
            out.append(Mask(m.start(group), m.end(group), "secret-variable", f"{name} compared"))
