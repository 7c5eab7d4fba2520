"""Secrets recognised by their shape, whatever key or argument they stand under.

Key rules know *where* a secret is; these rules know *what one looks like*, and
run over every value of every file after the key rules (their spans merge with
the key rules' spans, see :mod:`agent.policy.masks`):

- ``url-credentials``: the password of a URL's userinfo (``mysql://u:PW@db``),
  of a SIP URI (``sip:alice:PW@host``); ``dial-string``: of a dial string
  (``IAX2/user:PW@host``);
- ``url-parameter``: the value of a secret-named query parameter
  (``?apikey=…``, ``&token=…``, ``?password=…``);
- ``command-flag``: credentials on a command line (``--password X``,
  ``--pass=X``, ``-pX``, ``-p X``, ``-u user:X``, ``-U user%X``,
  ``pass:X`` for openssl, ``-w X`` for the LDAP tools, ``-a X`` for redis-cli,
  ``-c X`` for the SNMP tools); ``PGPASSWORD=`` and ``MYSQL_PWD=`` are secret
  names, caught by ``inline-secret``;
- ``auth-header``: the credentials of an ``Authorization:`` or
  ``Proxy-Authorization:`` header, of ``Cookie:``, of any ``X-…-Token:``-like
  header, and ``Bearer`` tokens anywhere;
- ``token-format``: tokens whose format says what they are (JSON Web Tokens,
  AWS access key ids, Slack, GitHub, GitLab, Stripe and Google API keys);
- ``inline-secret``: ``secret-name = value`` (or ``:``, ``=>``) inside text:
  comments, connection strings (``…;PWD=x;``), post data, option lists;
- ``user-password`` (:func:`user_password_masks`, only where a value is a
  credential for a client: variables, client arguments): a whole value
  ``user:pass``.

PEM and OpenSSH private key blocks are not masked but make the whole file stay
on the box (``pem-private-key`` in :mod:`agent.policy.redact`).
"""

from __future__ import annotations

import re

from agent.policy.masks import Mask
from agent.policy.secret_names import is_secret_key, is_secret_variable

__all__ = [
    "KEY_NAME",
    "command_masks",
    "dial_masks",
    "header_masks",
    "inline_masks",
    "is_plain",
    "is_reference",
    "secret_value_masks",
    "shape_masks",
    "token_format_masks",
    "url_masks",
    "user_password_masks",
]

# -- URLs, SIP URIs and dial strings --------------------------------------------------

_URL = re.compile(r"(?i)(?<![\w+.-])([a-z][a-z0-9+.-]{1,15})://([^\s\"'<>`\\]*)")
_HOSTLIKE = re.compile(r"(?:[\w.-]+|\[[0-9A-Fa-f:.]+\])(?=[:/?#,;)\]}|]|$)")
_PARAM = re.compile(r"([^&=#;?]+)=([^&#,)}\]|]*)")
_DIAL = re.compile(
    r"(?i)\b((?:IAX2?|SIP|PJSIP|H323|OOH323|MGCP|UNISTIM|DAHDI)/[^:/@\s,()|&\"'${}]+:)"
    r"([^@\s]+)(@)"
)
#: ``IAX2/user:[keyname]@host``: the name of an RSA key in astkeydir, not a secret.
KEY_NAME = re.compile(r"\[[\w.-]+\]")
_SIP_URI = re.compile(r"(?i)(?<![\w/])(sips?:[^:@\s;>\"'/]+:)([^@\s]+)(@)")
#: ``user:password@host.example.com`` with no scheme (a DSN, an rsync or sshpass target).
_BARE_USERINFO = re.compile(
    r"(?<![\w/:@.%+-])([A-Za-z][\w.+-]{0,63}):([^\s:@/\"'<>{}$]{1,128})@"
    r"(?=(?:[\w-]+(?:\.[\w-]+)+|localhost)\b)"
)


def _userinfo_end(rest: str) -> int:
    """Where the userinfo of a URL's ``rest`` (after ``scheme://``) ends at its ``@``; -1: none."""
    stop = len(rest)
    for ch in "/?#":
        i = rest.find(ch)
        if 0 <= i < stop:
            stop = i
    at = rest.rfind("@", 0, stop)
    if at >= 0:
        return at
    # A password holding "/" or "?": the '@' lies past them, before a host name.
    for m in re.finditer("@", rest):
        head = rest[: m.start()]
        if ":" in head and _HOSTLIKE.match(rest, m.start() + 1):
            return m.start()
    return -1


def _url_parts(rest: str) -> tuple[int, int, int]:
    """Offsets in ``rest`` of the userinfo's end (-1), the path's start and the query's start."""
    at = _userinfo_end(rest)
    host_from = at + 1
    path = len(rest)
    for ch in "/?#":
        i = rest.find(ch, host_from)
        if 0 <= i < path:
            path = i
    query = rest.find("?", host_from)
    return at, path, (query if query >= 0 else len(rest))


def url_masks(text: str) -> list[Mask]:
    """Passwords in URL userinfo and SIP URIs, and secret-named query parameters."""
    out: list[Mask] = []
    if "://" in text:
        for m in _URL.finditer(text):
            rest, base = m.group(2), m.start(2)
            at, _, query = _url_parts(rest)
            if at > 0:
                colon = rest.find(":", 0, at)
                if 0 <= colon < at - 1:
                    out.append(Mask(base + colon + 1, base + at, "url-credentials"))
            if query < len(rest):
                out.extend(_param_masks(rest, query + 1, base))
    if "?" in text or "&" in text:
        # Parameters outside a URL: post data, a query string on its own.
        for m in re.finditer(r"[?&]([\w.\[\]-]+)=([^&#\s\"'<>,)}\]|;]*)", text):
            if m.group(2) and is_secret_variable(m.group(1)):
                out.append(Mask(m.start(2), m.end(2), "url-parameter"))
    if "@" in text:
        for m in _SIP_URI.finditer(text):
            out.append(Mask(m.start(2), m.end(2), "url-credentials"))
        for m in _BARE_USERINFO.finditer(text):
            if m.group(1).lower() not in _NOT_USERS and not KEY_NAME.fullmatch(m.group(2)):
                out.append(Mask(m.start(2), m.end(2), "url-credentials"))
    return out


def _param_masks(rest: str, start: int, base: int) -> list[Mask]:
    out: list[Mask] = []
    end = rest.find("#", start)
    query = rest[start : end if end >= 0 else len(rest)]
    for p in _PARAM.finditer(query):
        if p.group(2) and is_secret_variable(p.group(1)) and not is_reference(p.group(2)):
            out.append(Mask(base + start + p.start(2), base + start + p.end(2), "url-parameter"))
    return out


def dial_masks(text: str) -> list[Mask]:
    """The secret of ``TECH/user:secret@host`` dial strings (IAX2, SIP, PJSIP …)."""
    if "@" not in text:
        return []
    return [
        Mask(m.start(2), m.end(2), "dial-string")
        for m in _DIAL.finditer(text)
        if not KEY_NAME.fullmatch(m.group(2))
    ]


def secret_value_masks(value: str, rule: str, why: str = "", offset: int = 0) -> list[Mask]:
    """The masks for a value some key rule says is wholly secret.

    A URL keeps what is not a credential: its scheme, host and port always,
    its path too when the credential was found in the userinfo or a query
    parameter; otherwise the path and query are taken as the secret (a webhook
    URL's path is its token). Anything else is masked whole.
    """
    stripped = value.strip()
    lead = len(value) - len(value.lstrip())
    m = _URL.fullmatch(stripped)
    if m is None:
        return [Mask(offset + lead, offset + lead + len(stripped), rule, why)]
    rest, base = m.group(2), offset + lead + m.start(2)
    at, path, query = _url_parts(rest)
    out: list[Mask] = []
    if at > 0:
        colon = rest.find(":", 0, at)
        if 0 <= colon < at - 1:
            out.append(Mask(base + colon + 1, base + at, rule, why))
    if query < len(rest):
        out.extend(Mask(p.start, p.end, rule, why) for p in _param_masks(rest, query + 1, base))
    if not out:
        if path < len(rest):
            out.append(Mask(base + path, base + len(rest), rule, why))
        elif at > 0:
            out.append(Mask(base, base + at, rule, why))
        else:
            out.append(Mask(base, base + len(rest), rule, why))
    return out


# -- credentials of clients ---------------------------------------------------------

_USER_PASS = re.compile(r"([A-Za-z][\w.+-]{0,63}):([^\s:@/]{1,256})")
#: ``word:word`` that is not a credential: a URI scheme or technology before the colon.
_NOT_USERS = frozenset(
    {
        "sip",
        "sips",
        "tel",
        "mailto",
        "urn",
        "http",
        "https",
        "ftp",
        "ws",
        "wss",
        "iax",
        "iax2",
        "pjsip",
        "local",
        "dahdi",
        "xmpp",
        "data",
        "file",
        "localhost",
    }
)


def user_password_masks(value: str, offset: int = 0) -> list[Mask]:
    """A whole value ``user:password`` (a credential handed to a client): the password.

    Not taken as one: ``host.name:port``, ``sip:100`` and other scheme or
    technology prefixes, and a password part that is a variable reference.
    """
    stripped = value.strip().strip("\"'")
    m = _USER_PASS.fullmatch(stripped)
    if m is None:
        return []
    user, pw = m.group(1), m.group(2)
    if user.lower() in _NOT_USERS or is_reference(pw) or pw.startswith("$"):
        return []
    if pw.isdigit() and ("." in user or (len(pw) <= 5 and user.isupper())):
        return []  # host:port, CODE:5060
    start = offset + value.index(stripped) + m.start(2)
    return [Mask(start, start + len(pw), "user-password")]


# -- command lines ------------------------------------------------------------------

_VALUE = r"(\"[^\"]*\"?|'[^']*'?|[^\s\"'][^\s\"';|&]*)"
_LONG_OPT = re.compile(r"(?<![\w\-./])--([A-Za-z][\w-]*)(?:=|[ \t]+(?=[^\s-]))" + _VALUE)
_P_ATTACHED = re.compile(r"(?<![\w\-./])-p(?=[^\s-])" + _VALUE)
_P_SEPARATE = re.compile(r"(?<![\w\-./])-[pP][ \t]+(?=[^\s-])" + _VALUE)
_USER_FLAG = re.compile(
    r"(?<![\w\-./])(?:-[uU][ \t]*|--(?:proxy-)?user(?:=|[ \t]+))([\w.@-]+)([:%,])"
    + r"([^\s\"']+|\"[^\"]*\"?|'[^']*'?)"
)
_OPENSSL_PASS = re.compile(r"(?<![\w-])pass:(\S+)")
#: Tools whose short flags are credentials: the tool's name (lower case) and the flag.
_TOOL_FLAGS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("ldap", re.compile(r"(?<![\w\-./])-w[ \t]*" + _VALUE)),  # ldapsearch -w password
    ("redis-cli", re.compile(r"(?<![\w\-./])-a[ \t]+" + _VALUE)),  # redis-cli -a password
    ("snmp", re.compile(r"(?<![\w\-./])-[cAX][ \t]*" + _VALUE)),  # community, auth/priv
    ("openssl", re.compile(r"(?<![\w\-./])-[kK][ \t]+" + _VALUE)),  # openssl enc -k pass
)
_FILE_OPTION = re.compile(r"file|path|dir|key")


def _plain(value: str) -> str:
    return value.strip("\"'")


def command_masks(text: str) -> list[Mask]:
    """Credentials given to programs on a command line (see the module docstring)."""
    out: list[Mask] = []
    if "--" in text:
        for m in _LONG_OPT.finditer(text):
            name, value = m.group(1).lower(), _plain(m.group(2))
            if not value or is_reference(value) or not is_secret_variable(name):
                continue
            if value.startswith("/") and _FILE_OPTION.search(name):
                continue  # --password-file=/etc/x, --key /etc/ssl/x.key: a path
            out.append(Mask(m.start(2), m.end(2), "command-flag"))
    if "-p" in text or "-P" in text:
        for rx in (_P_ATTACHED, _P_SEPARATE):
            for m in rx.finditer(text):
                value = _plain(m.group(1))
                if not value or value.isdigit() or is_reference(value):
                    continue
                if rx is _P_SEPARATE and value.startswith(("/", "./", "~")):
                    continue  # mkdir -p /var/x: a path
                out.append(Mask(m.start(1), m.end(1), "command-flag"))
    if "-u" in text or "-U" in text or "--" in text:
        for m in _USER_FLAG.finditer(text):
            if not is_reference(_plain(m.group(3))):
                out.append(Mask(m.start(3), m.end(3), "command-flag"))
    if "pass:" in text:
        out.extend(Mask(m.start(1), m.end(1), "command-flag") for m in _OPENSSL_PASS.finditer(text))
    low = text.lower() if "-" in text else ""
    for tool, flag in _TOOL_FLAGS:
        if tool in low:
            for m in flag.finditer(text):
                if _plain(m.group(1)) and not is_reference(_plain(m.group(1))):
                    out.append(Mask(m.start(1), m.end(1), "command-flag"))
    return out


# -- headers, bearer tokens, token formats -------------------------------------------

_HEADER = re.compile(r"(?i)(?<![\w-])([A-Za-z][\w-]{2,})[ \t]*:[ \t]*(?=\S)")
_AUTH_SCHEME = re.compile(r"(?i)(?:basic|bearer|digest|token|negotiate|ntlm|apikey)[ \t]+")
_BEARER = re.compile(r"(?i)\bbearer[ \t]+([\w.~+/=-]{6,})")
_HEADER_NAMES = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
_TOKEN_FORMATS = re.compile(
    r"\beyJ[\w-]{6,}\.eyJ[\w-]{6,}\.[\w-]{6,}"  # JSON Web Token
    r"|\bAKIA[0-9A-Z]{16}\b"  # AWS access key id
    r"|\bxox[abposr]-[\w-]{10,}"  # Slack
    r"|\bghp_[A-Za-z0-9]{30,}"  # GitHub personal access token
    r"|\bglpat-[\w-]{20,}"  # GitLab
    r"|\b[sr]k_live_[A-Za-z0-9]{16,}"  # Stripe
    r"|\bAIza[\w-]{35}"  # Google API key
)


def header_masks(text: str) -> list[Mask]:
    """Credentials of HTTP/SIP headers (``Authorization: Basic …``) and ``Bearer`` tokens."""
    out: list[Mask] = []
    if ":" in text:
        for m in _HEADER.finditer(text):
            name = m.group(1).lower()
            if name not in _HEADER_NAMES and not (
                ("-" in name or name.startswith("x"))
                and text[m.end() - 1] in " \t"  # "X-Api-Key: …", not "key1:key2"
                and is_secret_variable(name)
            ):
                continue
            start = m.end()
            end = len(text)
            for stop in ("\n", '"', "'"):
                i = text.find(stop, start)
                if 0 <= i < end:
                    end = i
            while end > start and text[end - 1] in " \t\r":
                end -= 1
            # A header inside a call, SIPAddHeader(Authorization: …): not its ")".
            while (
                end > start
                and text[end - 1] == ")"
                and (text.count("(", start, end) < text.count(")", start, end))
            ):
                end -= 1
            scheme = _AUTH_SCHEME.match(text, start, end)
            if scheme is not None:
                start = scheme.end()
            if end > start and not is_reference(text[start:end]):
                out.append(Mask(start, end, "auth-header"))
    if "earer" in text:
        out.extend(Mask(m.start(1), m.end(1), "auth-header") for m in _BEARER.finditer(text))
    return out


_TOKEN_HINTS = ("eyJ", "AKIA", "xox", "ghp_", "glpat-", "k_live_", "AIza")
#: Text without any of the marks the shapes need (@ : = ? & - blanks quotes …) and
#: without the start of a token format.
_PLAIN_CHARS = re.compile(r"[A-Za-z0-9_.+/!#$%*~^,;|()\[\]]*")
_PLAIN = re.compile(
    r"(?!.*(?:" + "|".join(map(re.escape, _TOKEN_HINTS)) + r"))" + _PLAIN_CHARS.pattern
)


def is_plain(text: str, *, tokens: bool = True) -> bool:
    """Whether ``text`` lacks every mark a shape rule needs (most values do).

    ``tokens``: the token formats are looked for too (then their first letters count).
    """
    return (_PLAIN if tokens else _PLAIN_CHARS).fullmatch(text) is not None


def token_format_masks(text: str) -> list[Mask]:
    """Tokens recognisable by their format alone."""
    if not any(h in text for h in _TOKEN_HINTS):
        return []
    return [Mask(m.start(), m.end(), "token-format") for m in _TOKEN_FORMATS.finditer(text)]


# -- name = value inside text -------------------------------------------------------

_INLINE = re.compile(
    # "name: value" needs a blank after the colon (YAML, prose): "user:secret@host"
    # is a dial string's or URL's, read by their own rules.
    r"(?<![\w$])([\w./$\[\]'\"-]*?[\w\]'\"])[ \t]*(=>[ \t]*|=[ \t]*|:[ \t]+)"
    r"(\"[^\"]*\"?|'[^']*'?|[^;,&|)\"'<\n]*[^;,&|)\"'<\s\\])"
)


_JSON_PAIR = re.compile(r'"((?:[^"\\]|\\.){1,80})"[ \t]*:[ \t]*("(?:[^"\\]|\\.)*"|-?\d[\d.]*)')
_XML_ELEMENT = re.compile(r"<([A-Za-z][\w.:-]{0,80})(?:\s[^<>]*)?>([^<]{1,4096})</\1\s*>")


def structured_masks(text: str) -> list[Mask]:
    """Secret-named members of JSON objects (a string or a number) and XML elements.

    Names are judged as configuration keys are (``auth`` alone does not count:
    ``<auth>`` and ``"auth"`` name sections at least as often as secrets).
    """
    out: list[Mask] = []
    if '"' in text and ":" in text:
        for m in _JSON_PAIR.finditer(text):
            value = m.group(2)
            if is_secret_key(m.group(1)):
                a, b = m.span(2)
                if value.startswith('"'):
                    a, b = a + 1, b - 1
                if b > a and not is_reference(text[a:b]):
                    out.append(Mask(a, b, "inline-secret", m.group(1)))
    if "</" in text:
        for m in _XML_ELEMENT.finditer(text):
            if is_secret_key(m.group(1)) and m.group(2).strip():
                out.append(Mask(m.start(2), m.end(2), "inline-secret", m.group(1)))
    return out


def inline_masks(text: str, *, colon: bool = True) -> list[Mask]:
    """``name = value`` pairs with a secret-looking name inside free text.

    ``colon``: ``name: value`` counts too (prose, YAML, headers); inside a
    configuration value only ``=`` and ``=>`` do (``inkeys = key1:key2``).
    """
    out: list[Mask] = []
    if "=" not in text and (not colon or ":" not in text):
        return out
    pos = 0
    while True:
        m = _INLINE.search(text, pos)
        if m is None:
            break
        # A pair that is not secret may hold one in its value ("note: token = x").
        pos = m.start(3)
        if m.group(1).startswith("-"):
            continue  # --option=value: a command line's, command_masks reads it
        name = m.group(1).strip("'\"[]$")
        if m.group(2).startswith(":") and not colon:
            continue
        if not is_secret_key(name.rsplit(".", 1)[-1]) and not is_secret_key(name):
            continue
        pos = m.end()
        value = m.group(3)
        inner = value.strip("\"'")
        if not inner or is_reference(inner) or inner.startswith("<redacted:"):
            continue
        if value[:1] in "\"'" and len(value) >= 2 and value[-1] == value[0]:
            out.append(Mask(m.start(3) + 1, m.end(3) - 1, "inline-secret"))
        else:
            out.append(Mask(m.start(3), m.end(3), "inline-secret"))
    return out


def shape_masks(
    text: str,
    *,
    inline: bool = True,
    colon: bool = True,
    command: bool = True,
    tokens: bool = True,
) -> list[Mask]:
    """Every shape rule over ``text`` (``inline``: also name=value pairs inside it)."""
    if is_plain(text, tokens=tokens):
        return []  # no mark any shape needs (most values: one cheap check)
    out = dial_masks(text)
    out += url_masks(text)
    out += header_masks(text)
    if tokens:
        out += token_format_masks(text)
    if command:
        out += command_masks(text)
    if inline:
        out += inline_masks(text, colon=colon)
        out += structured_masks(text)
    return out


# -- references ---------------------------------------------------------------------

_REF = re.compile(r"\$\{([A-Za-z_][\w.]*)(?::-?\d+(?::-?\d+)?)?\}|\$\{([A-Za-z_]\w*)\(")
_DECODERS = re.compile(r"(?i)decode|decrypt|unquote|filter|base64")


def is_reference(value: str) -> bool:
    """Whether ``value`` is only dialplan variable references (``${PW}``, ``${DB(a/b)}``).

    A reference names where a secret is kept; it holds none. A function that
    decodes (``${BASE64_DECODE(…)}``) may hold one in its argument and is not
    taken as a reference.
    """
    v = value.strip().strip("\"'")
    if not v.startswith("${"):
        return False
    pos = 0
    while pos < len(v):
        if v[pos].isspace():
            pos += 1
            continue
        m = _REF.match(v, pos)
        if m is None:
            return False
        if m.group(2) is None:
            pos = m.end()
            continue
        if _DECODERS.search(m.group(2)):
            return False
        depth, i = 1, m.end()
        while i < len(v) and depth:
            if v[i] == "(":
                depth += 1
            elif v[i] == ")":
                depth -= 1
            i += 1
        if depth or not v.startswith("}", i):
            return False
        pos = i + 1
    return True
