"""Redaction rules: one test per rule in agent.policy.redact.RULES, plus the sample corpus."""

from __future__ import annotations

import re
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
SAMPLES = Path(__file__).resolve().parent / "fixtures" / "asterisk-samples"


def red(text: str, name: str = "test.conf") -> tuple[str, dict[str, int]]:
    r = redact_text(text, kind_of(PurePosixPath(name), text), KEY, name=name)
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
    out, fired = red("[trunk]\nTRUNK_PASS = Tp1\napi_token = Tk2\nuser_pin = 9911\n")
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
    """Secrets in comments, #exec arguments and connection strings are masked; the rest stays."""
    out, fired = red(
        "[x]\n;secret=OldPw1 ; the old one\n#exec /usr/bin/gen --password=Ex3c\n"
        "; note: token = Tk9Inline, see the wiki\n"
        "[dsn]\nconnection = Driver=MySQL\\;Server=db\\;UID=cdr\\;PWD=Odb7cPw\\;Database=x\n"
    )
    assert not any(s in out for s in ("OldPw1", "Ex3c", "Tk9Inline", "Odb7cPw"))
    assert "; the old one" in out and "see the wiki" in out and "Server=db\\;UID=cdr" in out
    assert "\\;Database=x" in out
    assert fired["inline-secret"] == 2
    assert fired.get("secret-key", 0) + fired.get("command-flag", 0) == 2


def test_rule_unparsed_line() -> None:
    """A line Asterisk cannot parse that mentions a secret is masked whole (fail closed)."""
    out, fired = red("[x]\npassword Unp4rsed\nnot an assignment at all\n")
    assert "Unp4rsed" not in out
    assert "not an assignment at all" in out
    assert fired == {"unparsed-line": 1}


def test_php_define_is_read_not_guessed() -> None:
    """define() of a FreePBX password is read by the PHP tokenizer and only its value masked."""
    out, fired = red("<?php\ndefine('AMPDBPASS', 'Df1ned');\n", "freepbx.conf")
    assert "Df1ned" not in out and "define('AMPDBPASS', '<redacted:freepbx-key:" in out
    assert fired == {"freepbx-key": 1}


def test_php_that_cannot_be_read_is_masked_whole() -> None:
    """An unterminated PHP string that mentions a password: every line from it on is masked."""
    text = "<?php\n$a = 1;\n$amp_conf['AMPDBPASS'] = 'Unterm\nnext Line9x\n"
    out, fired = red(text, "freepbx.conf")
    assert "Unterm" not in out and "Line9x" not in out and "$a = 1;" in out
    assert fired == {"unparsed-line": 2}


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
    checked = 0
    for f in sorted(SAMPLES.glob("*.conf.sample")):
        text = f.read_bytes().decode("utf-8", "surrogateescape")
        name = f.name.removesuffix(".sample")
        out = redact_text(text, kind_of(PurePosixPath(name), text), KEY, name=name).text
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


# -- rules added with the argument- and position-aware model (issue 10) --------------


def test_rule_secret_variable() -> None:
    """A secret-looking variable is masked wherever it is assigned; other variables stay."""
    out, fired = red(
        "[globals]\nAPI_AUTH = Gv1Auth\nRINGTIME = 20\n"
        "[ctx]\nexten => s,1,Set(__DB_PASS=Gv2Pass)\n"
        " same => n,Set(GLOBAL(Trunk_Token)=Gv3Tok)\n"
        " same => n,MSet(A=1,b_secret=Gv4Sec,C=3)\n"
        " same => n,Set(CURLOPT(userpwd)=bob:Gv5Pwd)\n"
        " same => n,Set(DB(AMPUSER/${EXTEN}/password)=Gv6Db)\n"
        " same => n,Set(CONFBRIDGE(user,pin)=Gv7Pin)\n"
        " same => n,Set(KEYPAD_MODE=on)\n",
        "extensions_custom.conf",
    )
    assert not any(f"Gv{i}" in out for i in range(1, 8))
    assert "RINGTIME = 20" in out and "Set(KEYPAD_MODE=on)" in out and "MSet(A=1," in out
    assert fired == {"secret-variable": 7}


def test_secret_variable_in_setvar_and_set_var() -> None:
    """Channel variables set from pjsip, sip, iax, manager and phoneprov configuration."""
    out, fired = red(
        "[100]\ntype=endpoint\nset_var=__API_TOKEN=Sv1\nset_var=LANGUAGE=en\n"
        "[peer]\nsetvar=TRUNK_PASS=Sv2\n[polycom]\nsetvar => PROV_SECRET=Sv3\n",
        "pjsip.endpoint.conf",
    )
    assert "Sv1" not in out and "Sv2" not in out and "Sv3" not in out
    assert "set_var=LANGUAGE=en" in out and "set_var=__API_TOKEN=<redacted:secret-variable:" in out
    assert fired == {"secret-variable": 3}


def test_rule_secret_argument() -> None:
    """Secret arguments of dialplan applications and functions, by position, as Asterisk splits."""
    out, fired = red(
        "[ctx]\nexten => 1,1,Authenticate(Sa1,a,4)\n"
        " same => n,DISA(Sa2,disa-ctx)\n"
        " same => n,DISA(no-password,disa-ctx)\n"
        " same => n,MeetMe(100,dM,Sa3,extra)\n"
        ' same => n,Authenticate("Sa4")\n'
        " same => n,Authenticate(/etc/asterisk/pins.txt)\n"
        " same => n,Authenticate(${VMPIN})\n"
        " same => n,Dial(PJSIP/bridge,,D(ww1234#Sa5))\n"
        " same => n,SendDTMF(Sa6#)\n"
        " same => n,Set(X=${AES_ENCRYPT(Sa7,${DATA})})\n"
        " same => n,ExecIf($[1]?Authenticate(Sa8):NoOp(pin))\n",
        "extensions.conf",
    )
    assert not any(f"Sa{i}" in out for i in range(1, 9))
    assert "DISA(no-password,disa-ctx)" in out and "(/etc/asterisk/pins.txt)" in out
    assert "Authenticate(${VMPIN})" in out and "MeetMe(100,dM,<redacted:" in out
    assert 'Authenticate("<redacted:secret-argument:' in out  # the quotes stay
    assert fired == {"secret-argument": 8}


def test_rule_positional_field() -> None:
    """MeetMe rooms keep the room number and mask the user and admin PINs."""
    out, fired = red("[rooms]\nconf => 600,Pf1111,Pf2222\nconf => 601\n", "meetme.conf")
    assert "Pf1111" not in out and "Pf2222" not in out
    assert "conf => 600,<redacted:positional-field:" in out and "conf => 601\n" in out
    assert fired == {"positional-field": 2}
    out, _ = red("conf => 700,Pf3333\n", "meetme_additional.conf")
    assert "Pf3333" not in out and "700" in out


def test_rule_url_parameter() -> None:
    """Secret-named query parameters are masked; the URL's scheme, host, port and path stay."""
    out, fired = red(
        "[globals]\nHOOK = https://api.example.com:8443/v1/notify?apikey=Up1&room=7&access_token=Up2\n",
        "extensions_custom.conf",
    )
    assert "Up1" not in out and "Up2" not in out
    assert "https://api.example.com:8443/v1/notify?apikey=<redacted:url-parameter:" in out
    assert "&room=7&" in out
    assert fired == {"url-parameter": 2}


def test_rule_user_password() -> None:
    """A user:password pair handed to a client is masked; host:port and sip:100 are not."""
    out, fired = red(
        "[globals]\nCRM_LOGIN = crm:Upw1xyz\nDB_HOST = db.example.com:3306\nURI = sip:100\n"
        "[ctx]\nexten => 1,1,Set(LOGIN=admin:Upw2xyz)\n",
        "extensions_custom.conf",
    )
    assert "Upw1xyz" not in out and "Upw2xyz" not in out
    assert "crm:<redacted:user-password:" in out and "db.example.com:3306" in out
    assert "sip:100" in out
    assert fired == {"user-password": 2}


def test_rule_command_flag() -> None:
    """Credentials on command lines: System(), #exec, AGI, mysql -p, curl -u, --password."""
    out, fired = red(
        "[ctx]\nexten => 1,1,System(mysqldump -uroot -pCf1 asterisk > /tmp/x)\n"
        " same => n,System(curl -s -u api:Cf2 https://h/x)\n"
        " same => n,AGI(notify.sh,--token=Cf3)\n"
        " same => n,System(sshpass -p Cf4 ssh pbx)\n"
        " same => n,System(mkdir -p /var/spool/x)\n"
        "#exec /usr/local/bin/getconf --password Cf5 --host db\n",
        "extensions.conf",
    )
    assert not any(f"Cf{i}" in out for i in range(1, 6))
    assert "mkdir -p /var/spool/x" in out and "-uroot -p<redacted:command-flag:" in out
    assert "--host db" in out and "curl -s -u api:<redacted:" in out
    assert fired == {"command-flag": 5}


def test_rule_auth_header() -> None:
    """Authorization headers keep their scheme; the credentials and Bearer tokens go."""
    out, fired = red(
        "[ctx]\nexten => 1,1,SIPAddHeader(Authorization: Basic QWxhZGRpbjpvcGVu)\n"
        " same => n,Set(CURLOPT(httpheader)=X-Api-Key: Ah2Key)\n"
        "; curl -H 'Authorization: Bearer Ah3TokenValue'\n",
        "extensions.conf",
    )
    assert "QWxhZGRpbjpvcGVu" not in out and "Ah2Key" not in out and "Ah3TokenValue" not in out
    assert "SIPAddHeader(Authorization: Basic <redacted:auth-header:" in out
    assert fired == {"auth-header": 3}


def test_rule_token_format() -> None:
    """Tokens whose format gives them away are masked in text of free syntax, under any name."""
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJlLXZhbHVl"
    text = f"<?php\n$hook = '{jwt}';\n// AKIAIOSFODNN7EXAMPLE\n"
    out, fired = red(text, "module.php")
    assert jwt not in out and "AKIAIOSFODNN7EXAMPLE" not in out
    assert fired == {"token-format": 2}
    out, fired = red(f"notes for {jwt}\n", "notes.txt")
    assert jwt not in out and fired == {"token-format": 1}


def test_rule_local_key() -> None:
    """A local key pattern makes a name secret in every syntax."""
    from agent.policy.local_rules import compile_rules

    rules, problems = compile_rules(["^crm_"], [], [])
    assert problems == []
    for name, text in (
        ("x.conf", "[a]\ncrm_login = Lk1value\n"),
        ("extensions.conf", "[c]\nexten => 1,1,Set(CRM_LOGIN=Lk2value)\n"),
        ("freepbx.conf", "<?php\n$crm_login = 'Lk3value';\n"),
    ):
        r = redact_text(text, kind_of(PurePosixPath(name), text), KEY, name=name, local=rules)
        assert "value" not in r.text.replace("<redacted", ""), name
        assert r.fired == {"local-key": 1}, name


def test_rule_local_value() -> None:
    """A local value pattern masks what it matches (its first group when it has one)."""
    from agent.policy.local_rules import compile_rules

    rules, _ = compile_rules([], [r"ticket=(\w+)", r"ACME-[0-9]{6}"], [])
    text = "[a]\nnote = ticket=Lv1abc for ACME-123456\n; ACME-654321 in a comment\n"
    r = redact_text(text, "asterisk", KEY, local=rules)
    assert "Lv1abc" not in r.text and "123456" not in r.text and "654321" not in r.text
    assert "note = ticket=<redacted:local-value:" in r.text
    assert r.fired == {"local-value": 3}


def test_rule_local_argument() -> None:
    """A local rule names a secret argument of a custom application or subroutine."""
    from agent.policy.local_rules import compile_rules

    rules, _ = compile_rules([], [], [("CheckCode", [2])])
    text = "[c]\nexten => 1,1,CheckCode(100,La1code,x)\n same => n,checkcode(1,La2code)\n"
    r = redact_text(text, "asterisk", KEY, name="extensions.conf", local=rules)
    assert "La1code" not in r.text and "La2code" not in r.text and "CheckCode(100," in r.text
    assert r.fired == {"local-argument": 2}


def test_local_rules_only_add() -> None:
    """With local rules, every built-in rule still fires: they cannot remove masking."""
    from agent.policy.local_rules import compile_rules

    text = "[a]\nsecret = Bi1\n[b]\npassword=Bi2\n"
    base = redact_text(text, "asterisk", KEY)
    rules, _ = compile_rules(["nomatch"], ["zzz"], [("NoSuchApp", [1])])
    more = redact_text(text, "asterisk", KEY, local=rules)
    assert more.text == base.text and more.fired == base.fired


def test_markers_compose_into_one_per_secret() -> None:
    """Two rules on one secret give one marker; a URL keeps scheme, host, port and path."""
    out, _ = red(
        "[x]\npassword = https://svc:Mc1Pw@api.example.com:8443/v2/hook\n"
        "; password=https://u:Mc2Pw@h.example.org/p\n"
        "register => tls://acct:Mc3Pw@sip.example.com:5061/100\n"
    )
    assert "Mc1Pw" not in out and "Mc2Pw" not in out and "Mc3Pw" not in out
    assert "https://svc:<redacted:secret-key:" in out and "@api.example.com:8443/v2/hook" in out
    assert "https://u:<redacted:" in out and "@h.example.org/p" in out
    assert "tls://acct:<redacted:register-line:" in out and "@sip.example.com:5061/100" in out
    assert out.count("<redacted:") == 3
    assert not re.search(r"<redacted:[^>]*<redacted", out)


def test_secret_url_without_credentials_masks_its_path() -> None:
    """A secret-named URL with no userinfo or parameter: its path is taken as the token."""
    out, _ = red(
        "[globals]\nSLACK_TOKEN_URL = https://hooks.example.com/services/Su1Path\n",
        "extensions_custom.conf",
    )
    assert "Su1Path" not in out and "https://hooks.example.com<redacted:" in out


@pytest.mark.parametrize(
    ("data", "args"),
    [
        ("a,b,c", ["a", "b", "c"]),
        ("a,(b,c),d", ["a", "(b,c)", "d"]),
        ('a,"b,c",d', ["a", '"b,c"', "d"]),
        ("a,$[x,y],d", ["a", "$[x,y]", "d"]),
        ("a\\,b,c", ["a\\,b", "c"]),
        ("a,,", ["a", "", ""]),
    ],
)
def test_arguments_split_as_asterisk_splits_them(data: str, args: list[str]) -> None:
    """Commas inside parentheses, brackets and quotes, or escaped, do not split (main/app.c)."""
    from agent.policy.dialplan import split_args

    assert [data[a:b] for a, b in split_args(data, 0, len(data))] == args


def test_last_declared_argument_takes_the_rest() -> None:
    """MeetMe declares three arguments: a PIN holding commas is masked whole."""
    out, _ = red("[c]\nexten => 1,1,MeetMe(100,,Lt1,Lt2)\n", "extensions.conf")
    assert "Lt1" not in out and "Lt2" not in out and out.count("<redacted:") == 1


def test_every_application_in_the_table_is_documented() -> None:
    """Each entry names the Asterisk source that documents its arguments."""
    from agent.policy.dialplan import APPLICATIONS, NO_SECRET_ARGUMENTS

    for spec in APPLICATIONS.values():
        assert spec.doc and spec.secret and all(1 <= p <= spec.nargs for p in spec.secret)
    assert not set(APPLICATIONS) & set(NO_SECRET_ARGUMENTS)


@pytest.mark.parametrize(
    "name",
    [
        "DB_PASS",
        "__API_TOKEN",
        "trunkSecret",
        "vm_pin",
        "USERPIN",
        "api-key",
        "CREDS",
        "AUTH",
        "SESSION_COOKIE",
        "Authorization",
        "GLOBAL(X_PWD)",
        "CURLOPT(userpwd)",
        "pincode",
        "PINS",
    ],
)
def test_secret_variable_names(name: str) -> None:
    """Any case, any prefix: these names are secret."""
    from agent.policy.secret_names import is_secret_variable

    assert is_secret_variable(name)


@pytest.mark.parametrize(
    "name",
    [
        "KEYPAD",
        "PING",
        "MAPPING",
        "DTMF_PASSTHROUGH",
        "BYPASS",
        "CREDIT_LIMIT",
        "LINEKEYS",
        "HOTKEY",
        "KEYWORD",
        "RINGTIME",
        "CALLERID(num)",
        "PICKUPMARK",
    ],
)
def test_benign_variable_names(name: str) -> None:
    """Words that merely contain a secret word are not secret (measured on the samples)."""
    from agent.policy.secret_names import is_secret_variable

    assert not is_secret_variable(name)


def test_rule_passcode_file() -> None:
    """FreePBX's pinset files and DISA passcode files: every PIN masked, the rest kept."""
    out, fired = red("1234\n98765#\n\n", "pinset_3")
    assert "1234" not in out and "98765" not in out and out.count("\n") == 3
    assert fired == {"passcode-file": 2}
    text = '; DISA passcodes\n4321|keep-ctx|"Bob" <100>|100@default\n'
    out, fired = red(text, "disa-passcodes")
    assert "4321" not in out and "|keep-ctx|" in out and "; DISA passcodes" in out
    assert fired == {"passcode-file": 1}


def test_json_and_xml_members_with_secret_names() -> None:
    """A JSON member or XML element named like a secret, inside a value or a text file."""
    out, fired = red(
        '[c]\nexten => 1,1,Set(BODY={"api_key":"Jx1Tok","to":"100","n":null})\n',
        "extensions.conf",
    )
    assert "Jx1Tok" not in out and '"to":"100"' in out and fired == {"inline-secret": 1}
    out, fired = red("<c><password>Jx2Tok</password><user>keep</user></c>\n", "phone.xml")
    assert "Jx2Tok" not in out and "<user>keep</user>" in out and fired == {"inline-secret": 1}
