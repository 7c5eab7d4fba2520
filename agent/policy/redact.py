"""What counts as a secret, in one table a reviewer can read, and how it is masked.

The customer's promise is that no password, PIN or key leaves the box. This
module is the single place that says which values are secrets (:data:`RULES`
and the key tables below it) and what a redacted value looks like: a marker
``<redacted:RULE:FINGERPRINT>`` whose fingerprint is an HMAC of the value under a
key that never leaves the box, so the NOC can see *that* a secret changed
without learning it.

The syntax of the files (Asterisk, FreePBX) is handled by the collector; it asks
this module what to do with each key and value. :func:`find_secret_material` is
the gate's last line of defence over every envelope, whatever its source.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections import Counter
from dataclasses import dataclass

__all__ = [
    "FREEPBX_SECRET_KEYS",
    "NOT_SECRET_KEYS",
    "RULES",
    "SECRET_KEYS",
    "TRIGGER",
    "Redactor",
    "Rule",
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
        "the value of any key whose name looks like a secret "
        "(pass, secret, pwd, pin, token, key, cred)",
        "trunk_pass = …, api_token = …",
    ),
    Rule("register-line", "the secret in a registration string", "register => user:secret@host"),
    Rule("auth-line", "the secret in an authentication string", "auth = user:secret@realm"),
    Rule("dial-string", "the secret in a dial string", "Dial(IAX2/user:secret@host/100)"),
    Rule(
        "url-credentials",
        "the password in a URL or SIP URI",
        "mysql://user:pw@db/asterisk, sip:user:pw@host",
    ),
    Rule("voicemail-pin", "the PIN of a voicemail mailbox line", "1000 => 4242,Alice,…"),
    Rule(
        "voicemail-personal",
        "the name, e-mail and pager address of a mailbox line (personal data)",
        "1000 => …,Alice Smith,alice@example.com,pager@example.com",
    ),
    Rule(
        "inline-secret",
        "a secret-looking key=value inside free text (comments, "
        "#exec arguments, files of unknown syntax)",
        "; secret=oldpass",
    ),
    Rule(
        "unparsed-line",
        "a whole line that could not be parsed but mentions a secret (fail closed)",
        "password 1234",
    ),
    Rule(
        "pem-private-key",
        "a PEM private key block (the file is dropped)",
        "-----BEGIN PRIVATE KEY-----",
    ),
)
RULE_IDS: frozenset[str] = frozenset(r.id for r in RULES)

#: Keys that hold secrets in Asterisk's modules (lower case; pjsip_wizard's
#: ``outbound_auth/password`` is normalised to ``password``).
SECRET_KEYS: frozenset[str] = frozenset(
    {
        # chan_sip, chan_iax2, chan_pjsip, pjsip_wizard, manager, ari, http
        "secret",
        "md5secret",
        "remotesecret",
        "password",
        "md5_cred",
        "password_digest",
        "oauth_secret",
        "refresh_token",
        "access_token",
        "client_secret",
        "tlsprivatekey",
        "priv_key_file",
        "private_key_file",
        "dtlsprivatekey",
        "dtls_private_key",
        "tlspassword",
        "tls_password",
        "tlspassphrase",
        "passphrase",
        # databases: res_odbc, res_config_mysql, cdr_mysql, res_config_pgsql
        "dbpass",
        "dbsecret",
        "dbpassword",
        "passwd",
        # voicemail, meetme, confbridge, rtp (ICE/TURN), smdi, minivm
        "authpassword",
        "imapsecret",
        "pin",
        "pincode",
        "vmsecret",
        "adminpin",
        "userpin",
        "admin_pin",
        "turnpassword",
        "ice_password",
        "stunpassword",
    }
)

#: FreePBX settings (freepbx.conf ``$amp_conf[...]``, amportal.conf) that hold passwords.
FREEPBX_SECRET_KEYS: frozenset[str] = frozenset(
    {
        "ampdbpass",
        "ampmgrpass",
        "cdrdbpass",
        "foppassword",
        "ari_admin_password",
        "mysql_root_password",
        "amppassword",
        "ampdbpassword",
    }
)

#: Keys the generic rule would catch whose values are settings, never secrets
#: (an enumeration or a small number, checked in :meth:`Redactor.assignment`).
NOT_SECRET_KEYS: frozenset[str] = frozenset(
    {
        "password_format",  # ari.conf: plain | crypt
        "passwordlocation",  # voicemail.conf: voicemail.conf | spooldir
        "minpassword",  # voicemail.conf: minimum PIN length
        "promiscredir",  # sip.conf: yes | no ("cred" inside "promiscredir")
        "requirecalltoken",  # iax.conf call tokens: yes | no | auto
        "calltokenoptional",
        "calltokenexpiration",
        "keyrotate",  # iax.conf: on | off
        "dtlsrekey",  # sip.conf: seconds
        "dtls_rekey",  # pjsip.conf: seconds
        "moh_passthrough",  # pjsip.conf: yes | no
        "astkeydir",  # asterisk.conf: the folder of keys (a path; the keys are never read)
        "listen-control-forward-key",  # voicemail.conf: DTMF keys
        "listen-control-reverse-key",
        "listen-control-pause-key",
        "listen-control-restart-key",
        "listen-control-stop-key",
        "vm-password",  # voicemail.conf: names of sound prompts
        "vm-newpassword",
        "vm-passchanged",
        "vm-reenterpassword",
        "vm-invalid-password",
        "externpass",  # voicemail.conf: path of a program that changes PINs
        "externpassnotify",
        "externpasscheck",
    }
)

# "pin" only as a word ending (userpin, pin_code), not inside "ping" or "mapping".
_SECRETISH_KEY = re.compile(r"pass|secret|pwd|token|cred|key|pin(?:code)?(?![a-z])")
_SETTING_VALUE = re.compile(r"[A-Za-z_.]{1,20}|\d{1,3}|[#*0-9]{1,10}|/[\w./-]{1,80}")

#: A superset trigger: a line that matches none of these cannot need redaction,
#: so the collector may pass it through without parsing (its fast path).
TRIGGER = re.compile(
    r"pass|secret|pwd|token|cred|key|pin|auth|regist|mwi|@|-----BEGIN", re.IGNORECASE
)

_DIAL = re.compile(
    r"(?i)\b((?:IAX2?|SIP|PJSIP|H323|OOH323|MGCP|UNISTIM|DAHDI)/[^:/@\s,()|&\"'${}]+:)"
    r"([^@\s]+)(@)"
)
_URL = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s\"']+:)([^@\s]*)(@)")
_SIP_URI = re.compile(r"(?i)(?<![\w/])(sips?:[^:@\s;>\"'/]+:)([^@\s]+)(@)")
_INLINE = re.compile(
    r"(?i)(?<![\w$])([\w./$-]*(?:pass|secret|pwd|token|cred|key|pin)[\w./-]*"
    r"['\"\]]*\s*(?:=>|=|:)\s*)(\"[^\"]*\"?|'[^']*'?|[^;,\"'\n]*[^;,\"'\s])"
)
_PEM_PRIVATE = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----")
_MARKER = re.compile(r"<redacted:[a-z-]+:[0-9a-f]{12}>")


def normalise_key(key: str) -> str:
    """A key as the tables hold it: lower case, pjsip_wizard's ``a/b`` reduced to ``b``."""
    k = key.strip().lower()
    return k.rsplit("/", 1)[-1]


def is_secretish_key(key: str) -> bool:
    """Whether a key's name looks like it holds a secret (the conservative rule)."""
    k = normalise_key(key)
    return bool(_SECRETISH_KEY.search(k))


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


class Redactor:
    """Applies the rules to keys and values, and counts which rules fired.

    ``key`` is the fingerprint key (32 random bytes kept in the state directory).
    Counters hold rule ids and counts only, never values.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the fingerprint key must be at least 16 bytes")
        self._inner, self._outer = _hmac_pads(key)
        self.fired: Counter[str] = Counter()

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

    def marker(self, rule: str, value: str) -> str:
        """The text that replaces ``value``; counts ``rule`` as fired."""
        self.fired[rule] += 1
        return f"<redacted:{rule}:{self.fingerprint(value)}>"

    # -- values of keys -------------------------------------------------------

    def assignment(self, key: str, value: str, *, mailbox: bool = False) -> str | None:
        """The redacted value of ``key = value``, or None when nothing in it is secret.

        ``mailbox`` says the line is a voicemail mailbox definition
        (``mailbox => pin,name,email,pager,options``).
        """
        if not value.strip():
            return None
        if mailbox:
            return self.mailbox(value)
        k = normalise_key(key)
        if k in SECRET_KEYS:
            return self.marker("secret-key", value)
        if k in FREEPBX_SECRET_KEYS:
            return self.marker("freepbx-key", value)
        if k in ("register", "mwi"):
            return self.register(value)
        if k == "auth":
            return self.auth(value)
        if _SECRETISH_KEY.search(k):
            if k in NOT_SECRET_KEYS and _SETTING_VALUE.fullmatch(value.strip()):
                return self.embedded(value)
            return self.marker("secretish-key", value)
        return self.embedded(value)

    def mailbox(self, value: str) -> str:
        """Voicemail ``pin,fullname,email,pager,options``: the first four fields masked."""
        fields = value.split(",", 4)
        out: list[str] = []
        for i, field in enumerate(fields):
            stripped = field.strip()
            if i == 0 and stripped:
                out.append(self.marker("voicemail-pin", stripped))
            elif 1 <= i <= 3 and stripped:
                out.append(self.marker("voicemail-personal", stripped))
            elif i == 4:
                out.append(self.embedded(field) or field)
            else:
                out.append(field)
        return ",".join(out)

    def register(self, value: str) -> str | None:
        """``[peer?][transport://]user[@domain][:secret[:authuser]]@host…``: mask the secret.

        Everything between the first ``:`` of the credentials and the host's
        ``@`` is masked (secret and authuser together): a secret holding a
        ``:`` must not leak half of itself.
        """
        m = re.match(r"(\s*(?:[^?@\s:]+\?)?(?:[a-z][a-z0-9]*://)?)(.*)$", value, re.I | re.S)
        prefix, rest = (m.group(1), m.group(2)) if m else ("", value)
        at = rest.rfind("@")
        cred, tail = (rest[:at], rest[at:]) if at >= 0 else (rest, "")
        colon = cred.find(":")
        if colon < 0:
            return self.embedded(value)
        secret = cred[colon + 1 :]
        if not secret:
            return None
        return f"{prefix}{cred[: colon + 1]}{self.marker('register-line', secret)}{tail}"

    def auth(self, value: str) -> str | None:
        """sip.conf ``auth = user:secret@realm`` or ``user#md5secret@realm``: mask the secret."""
        m = re.match(r"([^:#@]*[:#])(.*?)(@[^@]*)?$", value, re.S)
        if m is None or not m.group(2):
            return self.embedded(value)
        return f"{m.group(1)}{self.marker('auth-line', m.group(2))}{m.group(3) or ''}"

    def embedded(self, value: str) -> str | None:
        """Credentials embedded in any value: dial strings, URLs, SIP URIs."""
        if "@" not in value:
            return None
        out = value
        for pattern, rule in (
            (_DIAL, "dial-string"),
            (_URL, "url-credentials"),
            (_SIP_URI, "url-credentials"),
        ):
            out = pattern.sub(functools.partial(self._keep_around, rule=rule), out)
        return out if out != value else None

    def _keep_around(self, m: re.Match[str], rule: str) -> str:
        if _MARKER.fullmatch(m.group(2)):
            return m.group(0)
        return f"{m.group(1)}{self.marker(rule, m.group(2))}{m.group(3)}"

    # -- free text ------------------------------------------------------------

    def free_text(self, text: str) -> str | None:
        """Secrets inside text of no known syntax (comments, ``#exec`` arguments).

        Masks ``secretish-key = value`` pairs and embedded credentials; returns
        None when nothing was found.
        """
        out = self.embedded(text) or text
        if TRIGGER.search(out):
            out = _INLINE.sub(self._inline, out)
        return out if out != text else None

    def _inline(self, m: re.Match[str]) -> str:
        if _MARKER.fullmatch(m.group(2)) or m.group(2).startswith("<redacted:"):
            return m.group(0)
        return f"{m.group(1)}{self.marker('inline-secret', m.group(2))}"

    def whole_line(self, line: str) -> str:
        """Fail closed: the marker that replaces a line we could not parse."""
        return self.marker("unparsed-line", line)
