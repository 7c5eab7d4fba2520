"""What counts as a secret, in tables a reviewer can read, and how it is masked.

The customer's promise is that no password, PIN or key leaves the box. The
redaction model, in the order the rules run on each value:

1. **Keys** (:mod:`agent.policy.secret_names`): the options Asterisk's
   modules use for secrets (``secret``, ``md5_cred``, ``dbpass`` …), FreePBX's
   password settings, and any key whose name looks secret.
2. **Positions** (:mod:`agent.policy.conf_fields`, :mod:`agent.policy.dialplan`):
   fields of a value and arguments of a dialplan application or function that
   hold a secret whatever the key is called (``conf => room,PIN,ADMINPIN``,
   ``Authenticate(PASSWORD)``, ``MeetMe(room,opts,PIN)``, a voicemail
   mailbox's PIN), and variables with secret-looking names wherever a variable
   is assigned (``Set()``, ``MSet()``, ``setvar``, ``set_var``, ``[globals]``,
   AEL, Lua, PHP, shell).
3. **Shapes** (:mod:`agent.policy.value_shapes`), on every value of every file:
   credentials in URLs, dial strings and SIP URIs, secret query parameters,
   ``user:password`` pairs handed to clients, command-line credential flags,
   authorization headers, well-known token formats, ``name=value`` pairs in
   text. A PEM or OpenSSH private key block keeps the whole file on the box.
4. **Local rules** (:mod:`agent.policy.local_rules`): the administrator's own
   key patterns, value patterns and application arguments; they only add.

Each rule reports spans (:class:`agent.policy.masks.Mask`); the spans of one
value are merged and replaced once, so rules compose into one marker per
secret and keep what is not secret. A marker reads ``<redacted:RULE:FINGERPRINT>``:
the fingerprint is an HMAC of the value under a key that never leaves the box,
so the NOC can see *that* a secret changed without learning it.

The syntax of the files (Asterisk, AEL, Lua, PHP, shell) is read by the
collector, which asks this module what to mask. :func:`find_secret_material`
is the gate's last line of defence over every envelope, whatever its source.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from agent.policy.conf_fields import (
    DIALPLAN_KEYS,
    POSITIONAL,
    VARIABLE_KEYS,
    is_variables_section,
    maps_names,
)
from agent.policy.dialplan import assignment_masks, call_masks, dialplan_masks, split_args
from agent.policy.local_rules import NO_LOCAL_RULES, LocalRules
from agent.policy.masks import Mask, merge
from agent.policy.secret_names import (
    FREEPBX_SECRET_KEYS,
    KEY_FILE_KEYS,
    NOT_SECRET_KEYS,
    SECRET_KEYS,
    is_secret_key,
    is_setting_value,
    normalise_key,
)
from agent.policy.value_shapes import (
    KEY_NAME,
    dial_masks,
    header_masks,
    is_plain,
    secret_value_masks,
    shape_masks,
    token_format_masks,
    url_masks,
)

__all__ = [
    "FREEPBX_SECRET_KEYS",
    "NOT_SECRET_KEYS",
    "RULES",
    "SECRET_KEYS",
    "TRIGGER",
    "Finding",
    "Redactor",
    "Rule",
    "Where",
    "find_secret_material",
    "is_secretish_key",
    "normalise_key",
]


@dataclass(frozen=True, slots=True)
class Rule:
    """One redaction rule: its id (used in markers and counters), what it hides, an example."""

    id: str
    hides: str
    example: str


#: Every redaction rule. Each has a test in tests/test_redact.py named after its id.
RULES: tuple[Rule, ...] = (
    Rule(
        "secret-key",
        "the value of a key an Asterisk module uses for a secret",
        "secret = s3cret, md5_cred = …, pin = 1234",
    ),
    Rule(
        "freepbx-key",
        "the value of a FreePBX password setting",
        "$amp_conf['AMPDBPASS'] = '…';  AMPMGRPASS=…",
    ),
    Rule(
        "secretish-key",
        "the value of any configuration key whose name looks like a secret "
        "(pass, secret, pwd, pin, token, key, cred)",
        "trunk_pass = …, api_token = …",
    ),
    Rule(
        "secret-variable",
        "the value of a variable whose name looks like a secret, wherever it is "
        "assigned (also auth, cookie, bearer; any case, any prefix)",
        "Set(__DB_PASS=…), setvar=API_AUTH=…, [globals] TOKEN=…, $db_password = '…'",
    ),
    Rule(
        "secret-argument",
        "a secret argument of a dialplan application or function, or of a PHP "
        "client function, by position",
        "Authenticate(…), MeetMe(100,,…), Dial(…,D(…)), new PDO($dsn, 'u', '…')",
    ),
    Rule(
        "positional-field",
        "a secret field of a value, by file type and key",
        "meetme.conf: conf => 100,…,…",
    ),
    Rule("register-line", "the secret in a registration string", "register => user:secret@host"),
    Rule("auth-line", "the secret in an authentication string", "auth = user:secret@realm"),
    Rule("dial-string", "the secret in a dial string", "Dial(IAX2/user:secret@host/100)"),
    Rule(
        "url-credentials",
        "the password in a URL or SIP URI",
        "mysql://user:pw@db/asterisk, sip:user:pw@host",
    ),
    Rule(
        "url-parameter",
        "the value of a secret-named URL query parameter or post field",
        "https://api.example.com/v1?apikey=…&token=…",
    ),
    Rule(
        "user-password",
        "the password of a user:password pair handed to a client",
        "[globals] CRM_LOGIN = crm:…",
    ),
    Rule(
        "command-flag",
        "a credential on a command line",
        "--password …, -p…, -u user:…, sshpass -p …",
    ),
    Rule(
        "auth-header",
        "the credentials of an Authorization, Cookie or token header, and Bearer tokens",
        "SIPAddHeader(Authorization: Basic …)",
    ),
    Rule(
        "token-format",
        "a token recognisable by its format alone",
        "eyJ….eyJ….…, AKIA…, xoxb-…, ghp_…",
    ),
    Rule("voicemail-pin", "the PIN of a voicemail mailbox line", "1000 => 4242,Alice,…"),
    Rule(
        "passcode-file",
        "each PIN of a file of PINs or passcodes (FreePBX pinsets; Authenticate and "
        "DISA password files named for what they hold)",
        "/etc/asterisk/pinset_3: 1234",
    ),
    Rule(
        "voicemail-personal",
        "the name, e-mail and pager address of a mailbox line (personal data)",
        "1000 => …,Alice Smith,alice@example.com,pager@example.com",
    ),
    Rule(
        "inline-secret",
        "a secret-looking name=value inside free text (comments, #exec arguments, "
        "connection strings, files of unknown syntax)",
        "; secret=oldpass, Driver=…;PWD=…",
    ),
    Rule(
        "unparsed-line",
        "a whole line that could not be parsed but mentions a secret (fail closed)",
        "password 1234",
    ),
    Rule(
        "pem-private-key",
        "a PEM or OpenSSH private key block (the file is dropped)",
        "-----BEGIN PRIVATE KEY-----",
    ),
    Rule("local-key", "the value of a name matched by a local key pattern", "extra.keys"),
    Rule("local-value", "text matched by a local value pattern", "extra.values"),
    Rule(
        "local-argument",
        "an application argument named by a local rule",
        "extra.arguments",
    ),
)
RULE_IDS: frozenset[str] = frozenset(r.id for r in RULES)

#: A superset trigger for text of no known structure (the line-by-line paths).
TRIGGER = re.compile(
    r"pass|secret|pwd|token|cred|key|pin|auth|cookie|bearer|regist|mwi|@|-----BEGIN",
    re.IGNORECASE,
)

_PEM_PRIVATE = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----")
_MARKER = re.compile(r"<redacted:[a-z-]+:[0-9a-f]{12}>")
_MAILBOX_ALIAS = re.compile(r"\s*[\w.+-]+@[\w.-]+\s*")
_ABS_PATH = re.compile(r"<?/[^\s;,<>]+>?")


def is_secretish_key(key: str) -> bool:
    """Whether a configuration key's name looks like it holds a secret (the generic rule)."""
    return is_secret_key(key)


def find_secret_material(text: str) -> str | None:
    """A reason when ``text`` holds something that must never leave the box, else None.

    The gate calls this on every envelope, so it looks only for unmistakable
    material (a PEM private key block) with one fast search.
    """
    if "PRIVATE KEY" not in text:
        return None
    if _PEM_PRIVATE.search(text):
        return "a PEM private key block"
    return None


@functools.lru_cache(maxsize=4)
def _hmac_pads(key: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    """SHA-256 states that have absorbed the key XOR ipad and XOR opad (RFC 2104)."""
    block = 64  # SHA-256's block size
    if len(key) > block:
        key = hashlib.sha256(key).digest()
    key = key.ljust(block, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
    return inner, outer


@dataclass(frozen=True, slots=True)
class Finding:
    """A rule fired on a line (for ``agentctl snapshot --explain``); never the value."""

    line: int
    rule: str
    why: str = ""


@dataclass(frozen=True, slots=True)
class Where:
    """Where an Asterisk ``key = value`` stands: the file's type and the section."""

    family: str = ""
    section: str = ""
    mailbox: bool = False

    @property
    def variables(self) -> bool:
        """Whether keys here are dialplan variables (``[globals]``)."""
        return is_variables_section(self.family, self.section)


_NOWHERE = Where()
#: Plans whose rule masks the whole value, and that rule.
_WHOLE_VALUE = {
    "secret-key": "secret-key",
    "freepbx-key": "freepbx-key",
    "secretish": "secretish-key",
}


@functools.lru_cache(maxsize=4096)
def _plan(key: str, family: str, section: str, mailbox: bool) -> tuple[str, str]:
    """What to do with the value of ``key`` in a file of type ``family``, and the key as
    the tables hold it (cached: a file repeats a few keys many times)."""
    k = normalise_key(key)
    if (family, k) in POSITIONAL or (k == "conf" and section.lower() == "rooms"):
        return "positional", k
    if maps_names(family, section):
        return "none", k
    if mailbox:
        return "mailbox", k
    if k in SECRET_KEYS:
        return ("key-file" if k in KEY_FILE_KEYS else "secret-key"), k
    if k in FREEPBX_SECRET_KEYS:
        return "freepbx-key", k
    variables = is_variables_section(family, section)
    # In [globals] and its includes a key is a dialplan variable, whatever its name says in
    # sip.conf: `Auth = token` there is a variable holding a secret, not `user:secret@realm`.
    if k in ("register", "mwi") and not variables:
        return "register", k
    if k == "auth" and not variables:
        return "auth", k
    if k in VARIABLE_KEYS:
        return "setvar", k
    if k in DIALPLAN_KEYS:
        return "dialplan", k
    if variables:
        return "globals", k
    if is_secret_key(k):
        if k in KEY_FILE_KEYS:
            return "key-file", k
        return ("setting" if k in NOT_SECRET_KEYS else "secretish"), k
    return "none", k


class Redactor:
    """Applies the rules to keys and values, and counts which rules fired.

    ``key`` is the fingerprint key (32 random bytes kept in the state directory).
    Counters hold rule ids and counts only, never values; with ``explain`` the
    redactor also lists each rule that fired with its line (``line``, set by
    the reader) and the name that made it fire.
    """

    def __init__(
        self,
        key: bytes,
        *,
        local: LocalRules = NO_LOCAL_RULES,
        explain: bool = False,
        tokens: bool = True,
    ) -> None:
        if len(key) < 16:
            raise ValueError("the fingerprint key must be at least 16 bytes")
        self._inner, self._outer = _hmac_pads(key)
        self.local = local
        self._local = bool(local)
        self.tokens = tokens  # look for token formats (JWT, AWS …) in shapes
        self.fired: Counter[str] = Counter()
        self.findings: list[Finding] | None = [] if explain else None
        self.line = 0

    def fingerprint(self, value: str) -> str:
        """The keyed fingerprint of a secret: 12 hex digits of HMAC-SHA256."""
        # HMAC (RFC 2104) from hash states primed with the padded key once, rather
        # than hmac.digest, which pads the key anew for every value: a full
        # snapshot fingerprints tens of thousands of secrets. Same bytes as
        # hmac.digest(key, value, "sha256") (tests/test_redact.py checks it).
        inner = self._inner.copy()
        inner.update(value.encode("utf-8", "surrogateescape"))
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:6].hex()

    def marker(self, rule: str, value: str, *, why: str = "", line: int | None = None) -> str:
        """The text that replaces ``value``; counts ``rule`` as fired."""
        self.fired[rule] += 1
        if self.findings is not None:
            self.findings.append(Finding(self.line if line is None else line, rule, why))
        return f"<redacted:{rule}:{self.fingerprint(value)}>"

    def render(
        self,
        text: str,
        masks: Iterable[Mask],
        *,
        line: int | None = None,
        first_line: int | None = None,
    ) -> str:
        """``text`` with every (merged) span replaced by its marker.

        ``line``: the line all of ``text`` is on; ``first_line``: the line
        ``text`` starts on, when it spans several (findings then get theirs).
        """
        spans = merge(masks)
        if not spans:
            return text
        out: list[str] = []
        last = 0
        at_line = first_line
        for m in spans:
            if m.start < last:
                continue
            secret = text[m.start : m.end]
            out.append(text[last : m.start])
            if at_line is not None:
                at_line += text.count("\n", last, m.start)
                line = at_line
                at_line += secret.count("\n")
            out.append(self.marker(m.rule, secret, why=m.why, line=line))
            # A secret spanning lines (PHP, Lua, heredocs) leaves its line breaks,
            # so later lines keep their numbers in diffs and --explain.
            out.append("\n" * secret.count("\n"))
            last = m.end
        out.append(text[last:])
        return "".join(out)

    # -- values of keys -------------------------------------------------------

    def conf_masks(self, key: str, value: str, where: Where = _NOWHERE) -> list[Mask]:
        """The spans to mask in the value of an Asterisk ``key = value`` (value-relative)."""
        if not value.strip():
            return []
        plan, k = _plan(key, where.family, where.section, where.mailbox)
        out: list[Mask] = []
        if self.local.keys and self.local.key_matches(key):
            out += secret_value_masks(value, "local-key", key)
        if plan == "positional":
            fields = POSITIONAL.get((where.family, k), POSITIONAL[("meetme", "conf")])
            for i, (a, b) in enumerate(split_args(value, 0, len(value), fields.nargs), start=1):
                if i in fields.fields and value[a:b].strip():
                    out.append(Mask(a, b, "positional-field", f"{k} field {i}"))
        elif plan == "mailbox":
            out += self.mailbox_masks(value)
        elif plan in _WHOLE_VALUE:
            out += secret_value_masks(value, _WHOLE_VALUE[plan], k)
        elif plan == "key-file":
            if not _ABS_PATH.fullmatch(value.strip()):
                rule = "secret-key" if k in SECRET_KEYS else "secretish-key"
                out += secret_value_masks(value, rule, k)
        elif plan == "setting":
            if not is_setting_value(k, value):
                out += secret_value_masks(value, "secretish-key", k)
        elif plan == "register":
            out += self._register_masks(value)
        elif plan == "auth":
            out += self._auth_masks(value)  # iax.conf's auth=md5 is a method, not a secret
        elif plan == "setvar":
            eq = value.find("=")
            if eq > 0:
                out += assignment_masks(
                    value[:eq], eq + 1, len(value), value, local=self.local, literal=True
                )
        elif plan == "dialplan":
            out += dialplan_masks(value, local=self.local)
        elif plan == "globals":
            out += assignment_masks(key, 0, len(value), value, local=self.local)
            out += dialplan_masks(value, local=self.local)
        if where.family == "features" and where.section.lower() == "applicationmap":
            out += self._application_map(value)
        out += shape_masks(value, colon=False, tokens=self.tokens)
        return out

    def conf_value(self, key: str, value: str, where: Where = _NOWHERE) -> str | None:
        """The redacted value of ``key = value``, or None when nothing in it is secret."""
        plan, k = _plan(key, where.family, where.section, where.mailbox)
        if not self._local and is_plain(value, tokens=self.tokens) and where.family != "features":
            # The common cases without a mark any shape needs: decided here, cheaply.
            if plan == "none":
                return None
            if plan in _WHOLE_VALUE:
                stripped = value.strip()
                if not stripped:
                    return None
                lead = value.find(stripped)
                marker = self.marker(_WHOLE_VALUE[plan], stripped, why=k)
                return value[:lead] + marker + value[lead + len(stripped) :]
        masks = self.conf_masks(key, value, where)
        if not masks:
            return None
        out = self.render(value, masks)
        return out if out != value else None

    def assignment(self, key: str, value: str, *, mailbox: bool = False) -> str | None:
        """The redacted value of ``key = value`` in a file of no known type."""
        return self.conf_value(key, value, Where(mailbox=mailbox))

    def mailbox_masks(self, value: str) -> list[Mask]:
        """Voicemail ``pin,fullname,email,pager,options``: the first four, secret options.

        ``alias => mailbox@context`` (an aliasescontext entry) holds no PIN: a
        PIN is typed on a keypad and has no ``@``.
        """
        out: list[Mask] = []
        if _MAILBOX_ALIAS.fullmatch(value):
            return out
        fields = split_args(value, 0, len(value), 5)
        for i, (a, b) in enumerate(fields):
            text = value[a:b]
            lead = len(text) - len(text.lstrip())
            a2, b2 = a + lead, a + len(text.rstrip())
            if b2 <= a2:
                continue
            if i == 0:
                out.append(Mask(a2, b2, "voicemail-pin", "mailbox PIN"))
            elif i <= 3:
                out.append(Mask(a2, b2, "voicemail-personal", "mailbox owner"))
            else:
                out += self._mailbox_options(value, a, b)
        return out

    def _mailbox_options(self, value: str, start: int, end: int) -> list[Mask]:
        """``attach=yes|imappassword=…|tz=eastern``: values of secret options."""
        out: list[Mask] = []
        pos = start
        for part in value[start:end].split("|"):
            eq = part.find("=")
            if eq > 0:
                name = part[:eq].strip()
                v = part[eq + 1 :]
                secret = is_secret_key(name) or self.local.key_matches(name)
                setting = is_setting_value(name, v)
                if v.strip() and secret and not setting:
                    out.append(Mask(pos + eq + 1, pos + len(part), "secret-key", name))
            pos += len(part) + 1
        return out

    def _register_masks(self, value: str) -> list[Mask]:
        """``[peer?][transport://]user[@domain][:secret[:authuser]]@host…``: the secret.

        Everything between the first ``:`` of the credentials and the host's
        ``@`` is masked (secret and authuser together): a secret holding a
        ``:`` must not leak half of itself.
        """
        m = re.match(r"(\s*(?:[^?@\s:]+\?)?(?:[a-z][a-z0-9]*://)?)(.*)$", value, re.I | re.S)
        prefix, rest = (m.group(1), m.group(2)) if m else ("", value)
        at = rest.rfind("@")
        cred = rest[:at] if at >= 0 else rest
        colon = cred.find(":")
        if colon < 0 or colon + 1 >= len(cred) or KEY_NAME.fullmatch(cred[colon + 1 :]):
            return []  # no secret, or [keyname]: an RSA key's name (iax.conf)
        start = len(prefix) + colon + 1
        return [Mask(start, len(prefix) + len(cred), "register-line", "register")]

    def _auth_masks(self, value: str) -> list[Mask]:
        """sip.conf ``auth = user:secret@realm`` or ``user#md5secret@realm``: the secret."""
        m = re.match(r"([^:#@]*[:#])(.*?)(@[^@]*)?$", value, re.S)
        if m is None or not m.group(2):
            return []
        return [Mask(m.start(2), m.end(2), "auth-line", "auth")]

    def _application_map(self, value: str) -> list[Mask]:
        """features.conf ``name => dtmf,activate_on,App[,args[,moh]]``: the app's secrets."""
        fields = split_args(value, 0, len(value))
        if len(fields) < 3:
            return []
        a, b = fields[2]
        if "(" in value[a:b]:
            return dialplan_masks(value, a, len(value), local=self.local)
        if len(fields) < 4:
            return []
        name = value[a:b].strip()
        return call_masks(name, value, fields[3][0], fields[3][1], local=self.local)

    # -- free text ------------------------------------------------------------

    def embedded(self, value: str) -> str | None:
        """Credentials embedded in a value: dial strings, URLs, SIP URIs, headers, tokens."""
        masks = dial_masks(value) + url_masks(value) + header_masks(value)
        if self.tokens:
            masks += token_format_masks(value)
        if not masks:
            return None
        out = self.render(value, masks)
        return out if out != value else None

    def free_text(self, text: str) -> str | None:
        """Secrets inside text of no known syntax (comments, ``#exec`` arguments).

        Returns None when nothing was found.
        """
        masks = shape_masks(text, tokens=self.tokens)
        if not masks:
            return None
        out = self.render(text, masks)
        return out if out != text else None

    def whole_line(self, line: str) -> str:
        """Fail closed: the marker that replaces a line we could not parse."""
        return self.marker("unparsed-line", line)

    # -- local value patterns ---------------------------------------------------

    def local_pass(self, text: str) -> str:
        """Local value patterns over finished text, markers already in it left alone."""
        if not self.local.values:
            return text
        out: list[str] = []
        last = 0
        line = 1
        for piece in _MARKER.finditer(text):
            out.append(self._local_piece(text[last : piece.start()], line))
            line += text.count("\n", last, piece.end())
            out.append(piece.group(0))
            last = piece.end()
        out.append(self._local_piece(text[last:], line))
        return "".join(out)

    def _local_piece(self, text: str, first_line: int) -> str:
        masks = self.local.value_masks(text)
        if not masks:
            return text
        out: list[str] = []
        last = 0
        for m in merge(masks):
            if m.start < last:
                continue
            out.append(text[last : m.start])
            line = first_line + text.count("\n", 0, m.start)
            out.append(self.marker(m.rule, text[m.start : m.end], why=m.why, line=line))
            last = m.end
        out.append(text[last:])
        return "".join(out)
