"""Redaction rules: one test per rule in agent.policy.redact.RULES, plus the sample corpus."""

from __future__ import annotations

import sys
from pathlib import Path, PurePosixPath

import pytest

from agent.collectors.pbxconfig import asterisk_conf as ac
from agent.collectors.pbxconfig.filters import kind_of, redact_text
from agent.collectors.pbxconfig.freepbx import parse_amp_conf, parse_shell_vars
from agent.policy import redact
from agent.policy.redact import RULES, Redactor, find_secret_material

KEY = b"\x01" * 32
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "pbx"
SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "asterisk-samples"
if not SAMPLES.is_dir():
    SAMPLES = Path("/work/shared/fixtures/asterisk-samples")


def red(text: str, name: str = "test.conf") -> tuple[str, dict[str, int]]:
    r = redact_text(text, kind_of(PurePosixPath(name), text), KEY)
    return r.text, dict(r.fired)


def test_every_rule_has_its_own_test() -> None:
    """Each rule id in the table has a test named test_rule_<id>."""
    names = set(dir(sys.modules[__name__]))
    missing = [r.id for r in RULES if f"test_rule_{r.id.replace('-', '_')}" not in names]
    assert missing == []


def test_every_table_key_trips_the_fast_path_trigger() -> None:
    """The fast paths skip lines without a trigger: every secret key must contain one."""
    from agent.collectors.pbxconfig.filters import _SECRET_WORDS

    for key in redact.SECRET_KEYS | redact.FREEPBX_SECRET_KEYS:
        assert redact.TRIGGER.search(key), key
        assert any(w in key for w in _SECRET_WORDS), key


@pytest.mark.parametrize(
    "key",
    [
        "secret",
        "md5secret",
        "remotesecret",
        "password",
        "md5_cred",
        "password_digest",
        "oauth_secret",
        "refresh_token",
        "dbpass",
        "dbsecret",
        "authpassword",
        "imapsecret",
        "pin",
        "pincode",
        "vmsecret",
        "tlsprivatekey",
        "Secret",
        "outbound_auth/password",
    ],
)
def test_rule_secret_key(key: str) -> None:
    """Each Asterisk secret key's value is replaced by a marker, the rest of the line kept."""
    out, fired = red(f"[x]\n{key} = Zq7Value!x ; note\n")
    assert "Zq7Value!x" not in out
    assert out.startswith(f"[x]\n{key} = <redacted:secret-key:")
    assert out.endswith(" ; note\n")
    assert fired == {"secret-key": 1}


def test_rule_freepbx_key() -> None:
    """FreePBX passwords in freepbx.conf (PHP) and amportal.conf (KEY=value) are masked."""
    php = "<?php\n$amp_conf['AMPDBPASS'] = 'P#hpDb1';\n$amp_conf[\"AMPDBUSER\"] = 'fpbx';\n"
    out, fired = red(php, "freepbx.conf")
    assert "P#hpDb1" not in out and "'fpbx'" in out
    assert fired == {"freepbx-key": 1}
    assert parse_amp_conf(out)["AMPDBPASS"].startswith("<redacted:freepbx-key:")
    shell = "AMPMGRPASS=Mgr1\nCDRDBPASS='with space'\nAMPDBUSER=fpbx\n"
    out, fired = red(shell, "amportal.conf")
    assert "Mgr1" not in out and "with space" not in out
    assert parse_shell_vars(out)["AMPDBUSER"] == "fpbx"
    assert fired == {"freepbx-key": 2}


def test_rule_secretish_key() -> None:
    """A key whose name merely looks secret is masked too (conservative)."""
    out, fired = red("[globals]\nTRUNK_PASS = Tp1\napi_token = Tk2\nuser_pin = 9911\n")
    assert not any(s in out for s in ("Tp1", "Tk2", "9911"))
    assert fired == {"secretish-key": 3}


def test_secretish_rule_spares_words_that_only_contain_pin() -> None:
    """'ping' and 'mapping' are not PINs; the generic rule leaves them."""
    out, fired = red("[x]\nqualify_ping = 60\nmapping = a\n")
    assert "= 60" in out and "= a" in out
    assert fired == {}


def test_settings_allow_list_needs_a_setting_value() -> None:
    """An allow-listed key keeps a plain setting, but a secret-looking value is still masked."""
    out, _ = red("[g]\npassword_format = plain\n")
    assert "plain" in out
    out, _ = red("[g]\npassword_format = x y z 1234!!\n")
    assert "1234!!" not in out


def test_rule_register_line() -> None:
    """The secret in 'register =>' is masked; user, host, port, extension kept."""
    out, fired = red(
        "[general]\nregister => tls://acct:R3g!s@sip.example.com:5061/1234~3600\n"
        "register = peer?user@dom:S3c:authu@host\n"
    )
    assert "R3g!s" not in out and "S3c" not in out
    assert "tls://acct:<redacted:register-line:" in out
    assert "@sip.example.com:5061/1234~3600" in out
    assert fired == {"register-line": 2}


def test_rule_auth_line() -> None:
    """'auth = user:secret@realm' and 'user#md5@realm' keep user and realm only."""
    out, fired = red("[authentication]\nauth = mark:T0ps3cret@digium.com\nauth = u#a1b2c3@r\n")
    assert "T0ps3cret" not in out and "a1b2c3" not in out
    assert "auth = mark:<redacted:auth-line:" in out and "@digium.com" in out
    assert fired == {"auth-line": 2}
    out, fired = red("[general]\nauth = md5,plaintext,rsa\n")
    assert "md5,plaintext,rsa" in out and fired == {}


def test_rule_dial_string() -> None:
    """A secret inside a dial string is masked wherever the dial string appears."""
    out, fired = red(
        "[ctx]\nexten => 1,1,Dial(IAX2/bob:D1alPw@host.example/100)\n"
        "exten => 2,1,Dial(PJSIP/${EXTEN:1}@trunk)\n"
    )
    assert "D1alPw" not in out
    assert "Dial(IAX2/bob:<redacted:dial-string:" in out
    assert "PJSIP/${EXTEN:1}@trunk" in out
    assert fired == {"dial-string": 1}


def test_rule_url_credentials() -> None:
    """Passwords in URLs and SIP URIs are masked; user and host stay."""
    out, fired = red(
        "[x]\ndsn = mysql://cdr:UrlPw9@db.local/asteriskcdrdb\n"
        "contact = sip:alice:S1pUr1@pbx.example.com\n"
    )
    assert "UrlPw9" not in out and "S1pUr1" not in out
    assert "mysql://cdr:<redacted:url-credentials:" in out
    assert fired == {"url-credentials": 2}


def test_rule_voicemail_pin() -> None:
    """The PIN of a mailbox line is masked, in any mailbox context, with '=>' or '='."""
    out, fired = red("[default]\n1000 => 8152,A,a@x.com\n[other]\n2000 = -4471\n", "voicemail.conf")
    assert "8152" not in out and "4471" not in out
    assert fired["voicemail-pin"] == 2


def test_rule_voicemail_personal() -> None:
    """Name, e-mail and pager of a mailbox are personal data: masked; options kept."""
    text = (
        "[general]\nserveremail=pbx@x.com\n[default]\n"
        "1000 => 1,Alice Smith,al@x.com,pg@y.net,attach=yes|tz=eastern\n"
    )
    out, fired = red(text, "voicemail.conf")
    assert not any(s in out for s in ("Alice Smith", "al@x.com", "pg@y.net"))
    assert "attach=yes|tz=eastern" in out and "serveremail=pbx@x.com" in out
    assert fired == {"voicemail-pin": 1, "voicemail-personal": 3}


def test_commented_out_mailbox_is_still_personal_data() -> None:
    """A mailbox line that is commented out still has its PIN, name and e-mail masked."""
    out, _ = red("[default]\n;1003 => 5521,Dave Former\n", "voicemail.conf")
    assert "5521" not in out and "Dave Former" not in out


def test_rule_inline_secret() -> None:
    """Secrets in comments and #exec arguments are masked; the comment text stays."""
    out, fired = red("[x]\n;secret=OldPw1 ; the old one\n#exec /usr/bin/gen --password=Ex3c\n")
    assert "OldPw1" not in out and "Ex3c" not in out
    assert "; the old one" in out
    assert fired.get("secret-key", 0) + fired.get("inline-secret", 0) == 2


def test_rule_unparsed_line() -> None:
    """A line Asterisk cannot parse that mentions a secret is masked whole (fail closed)."""
    out, fired = red("[x]\npassword Unp4rsed\nnot an assignment at all\n")
    assert "Unp4rsed" not in out
    assert "not an assignment at all" in out
    assert fired == {"unparsed-line": 1}


def test_unmodelled_php_is_masked_whole() -> None:
    """PHP we do not model but that mentions a password is masked whole."""
    out, fired = red("<?php\ndefine('AMPDBPASS', 'Df1ned');\n", "freepbx.conf")
    assert "Df1ned" not in out
    assert fired == {"unparsed-line": 1}


def test_block_comment_splitting_a_secret_masks_the_line() -> None:
    """A value split by a one-line block comment is masked in all its parts."""
    out, _ = red("[x]\nsecret = Left;-- c --;Right\n")
    assert "Left" not in out and "Right" not in out


def test_escaped_semicolon_secret_is_masked_whole() -> None:
    """A secret holding '\\;' is masked up to its real end, not cut at the ';'."""
    out, _ = red("[x]\npassword=Ab\\;Cd ; note\n")
    assert "Ab" not in out and "Cd" not in out and "; note" in out


def test_rule_pem_private_key() -> None:
    """A file holding a PEM private key is dropped entirely."""
    text = "[x]\nkey = -----BEGIN RSA PRIVATE KEY-----\nMIIabc\n-----END RSA PRIVATE KEY-----\n"
    r = redact_text(text, "asterisk", KEY)
    assert r.dropped is not None and r.text == ""
    assert r.fired == {"pem-private-key": 1}


def test_find_secret_material() -> None:
    """The gate's check finds PEM private keys and passes ordinary text."""
    assert find_secret_material("-----BEGIN PRIVATE KEY-----\nxx") is not None
    assert find_secret_material("-----BEGIN OPENSSH PRIVATE KEY-----") is not None
    assert find_secret_material("-----BEGIN CERTIFICATE-----") is None
    assert find_secret_material('{"a": "private key rotation"}') is None


def test_fingerprint_is_keyed_and_stable() -> None:
    """Same value, same key: same marker; another key or value: another marker."""
    a, b = Redactor(b"a" * 32), Redactor(b"b" * 32)
    assert a.fingerprint("pw") == a.fingerprint("pw")
    assert a.fingerprint("pw") != a.fingerprint("pw2")
    assert a.fingerprint("pw") != b.fingerprint("pw")


def test_markers_count_rules_never_values() -> None:
    """The fired counter holds rule ids and counts only."""
    r = Redactor(KEY)
    r.assignment("secret", "V4lue")
    assert dict(r.fired) == {"secret-key": 1}


def test_empty_secret_stays_empty() -> None:
    """'secret =' has nothing to hide and is left as is."""
    out, fired = red("[x]\nsecret =\n")
    assert out == "[x]\nsecret =\n" and fired == {}


def test_fixture_tree_leaks_no_known_secret() -> None:
    """Every secret planted in tests/fixtures/pbx is absent from the redacted files."""
    planted = [
        "Fx9!kTq2vLw8Rz",
        "b7c1e0f4a9d24e6c8f1a",
        "Tr#nkP@ss",
        "5f4dcc3b5aa765d61d8327",
        "Leg4cyS1pPw",
        "Reg!ster2024",
        "IaxBr4nchS3cret",
        "8152",
        "Alice Martin",
        "alice.martin@example.com",
        "bob.pager@example.net",
        "Im4pS3cretVal",
        "SmtpAuthPw77",
        "aMgRp4ss2a7c1e",
        "F0p2M4nagerKey",
        "Gl0balTrunkPw",
        "IaxDialS3cret",
        "0dbcDbPassw0rd",
        "CdrMysqlPw99",
        "Ar1Us3rPw3c",
        "Fpbx$DbPw0rd!2024",
        "Cdr Db Pass 42",
        "passw0rdFop",
        "5521",
        "Dave Former",
    ]
    seen = ""
    for f in sorted((FIXTURES / "etc").rglob("*")):
        if f.is_file():
            seen += red(f.read_text(encoding="utf-8"), f.name)[0]
    leaked = [s for s in planted if s in seen]
    assert leaked == []


def test_corpus_no_value_of_a_secret_key_survives() -> None:
    """Over Asterisk's own sample configs, no secret key's value survives on its line."""
    if not SAMPLES.is_dir():
        pytest.skip(
            f"Asterisk sample configurations not found at {SAMPLES} "
            "(../shared/fixtures/asterisk-samples); corpus check not run"
        )
    checked = 0
    for f in sorted(SAMPLES.glob("*.conf.sample")):
        text = f.read_text(encoding="utf-8")
        name = f.name.removesuffix(".sample")
        out = redact_text(text, kind_of(PurePosixPath(name), text), KEY).text
        before, after = text.splitlines(), out.splitlines()
        assert len(before) == len(after), f"{name}: lines dropped"
        for i, line in enumerate(ac.lex(text)):
            candidates = [line]
            # Commented-out assignments hold secrets too: read the comment as a line.
            for seg in line.comments:
                body = line.raw[seg.start : seg.end].lstrip(";-").rstrip("\n")
                inner = ac.lex(body)
                candidates.extend(inner[:1])
            for cand in candidates:
                if cand.kind is not ac.Kind.ASSIGN or not cand.value:
                    continue
                k = redact.normalise_key(cand.key)
                if k in redact.SECRET_KEYS or k in redact.FREEPBX_SECRET_KEYS:
                    # What follows the value (a trailing comment) is unchanged: drop it.
                    a, b = after[i], before[i]
                    n = 0
                    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
                        n += 1
                    rest = a[: len(a) - n].replace(cand.key, "", 1)
                    assert cand.value not in rest, f"{name}:{i + 1}: {k} survived"
                    checked += 1
    assert checked > 40


@pytest.mark.parametrize("size", [16, 32, 64, 65, 200])
def test_fingerprint_is_hmac_sha256(size: int) -> None:
    """The fingerprint is the first 12 hex digits of HMAC-SHA256 of the value, for any key size."""
    import hmac

    key = bytes((i * 7 + 1) % 256 for i in range(size))
    r = Redactor(key)
    for value in ("", "pw", "é\udcff", "x" * 300):
        raw = value.encode("utf-8", "surrogateescape")
        assert r.fingerprint(value) == hmac.digest(key, raw, "sha256")[:6].hex()


@pytest.mark.parametrize("letter", ["İ", "ı", "ſ", "\u212a", "ß", "é"])
@pytest.mark.parametrize("name", ["test.conf", "notes.txt", "voicemail.conf"])
def test_non_ascii_letters_before_a_secret_leave_it_masked(letter: str, name: str) -> None:
    """A letter whose lower case is longer ("İ") or folds to ASCII leaves no secret in clear."""
    text = (
        f"[general]\ncallerid = {letter * 5} <100>\n; {letter}{letter}\n"
        "password=Hunter2secret\nsecret = Zq7Value ; note\n"
        f"{letter * 3}=1\nregister => 100:R3gSecret@pbx.example.com\n"
    )
    out, _ = red(text, name)
    for secret in ("Hunter2secret", "Zq7Value", "R3gSecret"):
        assert secret not in out, (name, letter, secret)
    assert out.count("\n") == text.count("\n")


def test_mwi_without_host_is_masked_on_both_paths() -> None:
    """`mwi => user:secret` with no @host: masked by the fast path and the line-by-line path."""
    from agent.collectors.pbxconfig.filters import redact_asterisk, redact_text
    from agent.policy.redact import Redactor

    key = b"k" * 32
    text = "[general]\nmwi => alice:Mw1-S3cret\n"
    assert "Mw1-S3cret" not in redact_text(text, "asterisk", key).text
    assert "Mw1-S3cret" not in redact_asterisk(text, Redactor(key), voicemail=False)
