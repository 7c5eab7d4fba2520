"""Which names hold secrets: configuration keys, variables, parameters and headers.

Two questions are asked of a name, and they differ on one word:

- :func:`is_secret_key` for the options of Asterisk's modules (``secret``,
  ``md5_cred``, ``dbpass`` …). Here ``auth`` is *not* a secret word: pjsip's
  ``auth = 1000-auth``, ``auth_type = userpass``, ``outbound_auth`` and a dozen
  others name objects or settings, and their values are structure.
- :func:`is_secret_variable` for everything an administrator names: dialplan
  and channel variables (``Set()``, ``MSet()``, ``setvar``, ``set_var``,
  ``[globals]``, AEL, Lua), PHP keys, shell variables, URL query parameters,
  HTTP header names. Here ``auth`` counts (``API_AUTH``, ``Authorization``).

A name is secret when it holds one of the words below in any case, with any
prefix or suffix (``__DB_PASS``, ``GLOBAL(TRUNK_TOKEN)``, ``CURLOPT(userpwd)``,
``AMPDBPASS``), unless every such word sits inside a longer word that is known
to mean something else (``KEYPAD``, ``PASSTHROUGH``, ``CREDIT``). ``pin`` counts
only as a word ending (``USERPIN``, ``pin_code``), so ``PING`` and ``MAPPING``
never match. The benign words were found by running the rules over Asterisk's
sample configurations (tests/test_redaction_corpus.py), not guessed.
"""

from __future__ import annotations

import re

__all__ = [
    "BENIGN_WORDS",
    "FREEPBX_SECRET_KEYS",
    "KEY_FILE_KEYS",
    "NOT_SECRET_KEYS",
    "NOT_SECRET_VARIABLES",
    "SECRET_KEYS",
    "is_secret_key",
    "is_secret_variable",
    "is_setting_value",
    "normalise_key",
]

#: Keys that hold secrets in Asterisk's modules (lower case; pjsip_wizard's
#: ``outbound_auth/password`` is normalised to ``password``). From the modules'
#: configuration documentation and configs/samples.
SECRET_KEYS: frozenset[str] = frozenset(
    {
        # chan_sip, chan_iax2, chan_pjsip, pjsip_wizard, manager, ari, http, xmpp
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
        "privatekey",
        "dtlsprivatekey",
        "dtls_private_key",
        "tlspassword",
        "tls_password",
        "tlspassphrase",
        "passphrase",
        # databases: res_odbc, res_config_mysql, res_pgsql, cdr_*, cel_*, res_ldap, iaxprov
        "dbpass",
        "dbsecret",  # iax.conf: names an AstDB family/key; masked in case it is the secret
        "dbpassword",
        "passwd",
        "pass",
        # voicemail, meetme, confbridge, rtp (ICE/TURN), minivm, phoneprov
        "authpassword",
        "imapsecret",
        "imappassword",
        "pin",
        "pincode",
        "vmsecret",
        "adminpin",
        "userpin",
        "admin_pin",
        "turnpassword",
        "ice_password",
        "stunpassword",
        # res_curl, prometheus, hep, websocket clients, stir_shaken
        "userpwd",
        "proxyuserpwd",
        "ssl_keypasswd",
        "auth_password",
        "capture_password",
        "proxy_password",
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

#: Keys whose value names a private key *file*. The file itself is never read (key
#: folders are never opened); a plain absolute path is structure and stays.
KEY_FILE_KEYS: frozenset[str] = frozenset(
    {
        "tlsprivatekey",
        "priv_key_file",
        "private_key_file",
        "privatekey",
        "dtlsprivatekey",
        "dtls_private_key",
        "ssl_key",
        "tlskeyfile",
    }
)

# What a setting's value looks like, by kind (the whole value must match).
_BOOL = r"(?i:yes|no|on|off|true|false|auto|[01])"
_NUMBER = r"\d{1,6}"
_WORD = r"[A-Za-z][\w.-]{0,40}"
_NAMES = _WORD + r"(?::" + _WORD + r")*"
_PATH = r"/[\w./-]{1,200}"
_DB_PATH = r"[\w.-]+(?:/[\w.-]+)*"
_DTMF = r"[0-9#*]{1,12}"
_PROMPT = r"[\w/.-]{1,80}"

#: Keys the generic rule would catch whose values are settings, never secrets, with
#: what such a value looks like: a secret written under one of these names (a value
#: of another shape) is still masked.
NOT_SECRET_KEYS: dict[str, str] = {
    "password_format": r"(?i:plain|crypt)",  # ari.conf
    "passwordlocation": r"(?i:voicemail\.conf|spooldir)",  # voicemail.conf
    "minpassword": _NUMBER,  # voicemail.conf: minimum PIN length
    "promiscredir": _BOOL,  # sip.conf ("cred" inside "promiscredir")
    "requirecalltoken": _BOOL,  # iax.conf call tokens
    "calltokenoptional": r"[\d./]{1,40}",  # iax.conf: an address/mask
    "calltokenexpiration": _NUMBER,
    "keyrotate": _BOOL,  # iax.conf
    "dtlsrekey": _NUMBER,  # sip.conf: seconds
    "dtls_rekey": _NUMBER,  # pjsip.conf: seconds
    "moh_passthrough": _BOOL,  # pjsip.conf
    "dtmf_passthrough": _BOOL,  # confbridge.conf
    "astkeydir": _PATH,  # asterisk.conf: the folder of keys (never read)
    "inkeys": _NAMES,  # iax.conf, dundi.conf: names of public keys in astkeydir
    "inkey": _NAMES,
    "outkey": _WORD,  # iax.conf, dundi.conf: the name of a private key in astkeydir
    "secretpath": _DB_PATH,  # dundi.conf: the AstDB family of the rotating secret
    "immeddialkey": _DTMF,  # skinny.conf: the DTMF key that dials at once
    "linekeys": _NUMBER,  # phoneprov_users.conf: how many line keys a phone shows
    "ssl_keytype": r"(?i:pem|der|eng)",  # res_curl.conf
    "listen-control-forward-key": _DTMF,  # voicemail.conf: DTMF keys
    "listen-control-reverse-key": _DTMF,
    "listen-control-pause-key": _DTMF,
    "listen-control-restart-key": _DTMF,
    "listen-control-stop-key": _DTMF,
    "vm-password": _PROMPT,  # voicemail.conf: names of sound prompts
    "vm-newpassword": _PROMPT,
    "vm-passchanged": _PROMPT,
    "vm-reenterpassword": _PROMPT,
    "vm-invalid-password": _PROMPT,
    "sound_get_pin": _PROMPT,  # confbridge.conf: names of sound prompts
    "sound_invalid_pin": _PROMPT,
    "externpass": _PATH + r"(?: [^;]*)?",  # voicemail.conf: a program that changes PINs
    "externpassnotify": _PATH + r"(?: [^;]*)?",
    "externpasscheck": _PATH + r"(?: [^;]*)?",
}
_NOT_SECRET_RX = {k: re.compile(v) for k, v in NOT_SECRET_KEYS.items()}

#: Dialplan write targets whose names hold a secret word but whose values are
#: settings (lower case, spaces removed), with what such a value looks like.
NOT_SECRET_VARIABLES: dict[str, str] = {
    "curlopt(httpauth)": r"(?i:basic|digest|any|anysafe|ntlm|negotiate)",
    "curlopt(ssl_keytype)": r"(?i:pem|der|eng)",
    "curlopt(ssl_key)": _PATH,
    "confbridge(user,dtmf_passthrough)": _BOOL,
    "confbridge(bridge,dtmf_passthrough)": _BOOL,
}
_NOT_SECRET_VAR_RX = {k: re.compile(v) for k, v in NOT_SECRET_VARIABLES.items()}

#: Longer words that contain a secret word but mean something else, with why.
#: A name is secret when some secret word in it is *not* inside one of these.
BENIGN_WORDS: dict[str, str] = {
    "passthrough": "a media or DTMF pass-through switch",
    "passthru": "a media or DTMF pass-through switch",
    "bypass": "a switch that skips a step",
    "passive": "FTP passive mode",
    "compass": "a word, not a password",
    "keypad": "DTMF keypad settings",
    "keyword": "search keywords",
    "keyboard": "keyboard layouts",
    "keypress": "DTMF key-press settings",
    "keystroke": "DTMF key-stroke settings",
    "monkey": "the tt-monkeys sound",
    "linekey": "phone line keys (buttons)",
    "softkey": "phone soft keys (buttons)",
    "hotkey": "phone hot keys (buttons)",
    "funckey": "phone function keys (buttons)",
    "turnkey": "a word, not a key",
    "keyrotate": "IAX2 key rotation on/off",
    "credit": "call credit",
    "calltoken": "IAX2 call-token settings",
}

_WORDS = r"pass|pwd|secret|token|key|cred|cookie|bearer|pin(?:code|s)?(?![a-z])"
_KEY_WORD = re.compile(_WORDS)
_VARIABLE_WORD = re.compile(_WORDS + r"|auth")
_BENIGN = re.compile("|".join(sorted(BENIGN_WORDS, key=len, reverse=True)))


def normalise_key(key: str) -> str:
    """A key as the tables hold it: lower case, pjsip_wizard's ``a/b`` reduced to ``b``."""
    k = key.strip().lower()
    return k.rsplit("/", 1)[-1]


def _has_word(name: str, words: re.Pattern[str]) -> bool:
    """Whether ``name`` (lower case) holds a secret word outside every benign word."""
    found = list(words.finditer(name))
    if not found:
        return False
    benign = [(m.start(), m.end()) for m in _BENIGN.finditer(name)]
    if not benign:
        return True
    return any(not any(b0 <= m.start() and m.end() <= b1 for b0, b1 in benign) for m in found)


def is_secret_key(key: str) -> bool:
    """Whether a configuration key's name looks like it holds a secret."""
    k = normalise_key(key)
    return k in SECRET_KEYS or k in FREEPBX_SECRET_KEYS or _has_word(k, _KEY_WORD)


def is_secret_variable(name: str) -> bool:
    """Whether a variable, parameter or header name looks like it holds a secret."""
    return _has_word(name.strip().lower(), _VARIABLE_WORD)


def is_setting_value(key: str, value: str) -> bool:
    """Whether ``value`` of the setting ``key`` (a configuration key listed in
    :data:`NOT_SECRET_KEYS`, or a dialplan write target listed in
    :data:`NOT_SECRET_VARIABLES`) looks like the setting it is, not a secret."""
    k = key.strip().lower().replace(" ", "").replace("\t", "")
    rx = _NOT_SECRET_RX.get(normalise_key(k)) or _NOT_SECRET_VAR_RX.get(k)
    return rx is not None and rx.fullmatch(value.strip()) is not None
