"""Redaction's finer rules in process: exact spans and reasons of voicemail masks, shifts.

tests/test_redact.py proves each rule on whole files; these pin the spans and
the reasons `snapshot --explain` shows, so that a span one character short
(leaking a digit) or a lost reason fails (written to kill the mutants that
`make mutation` found surviving).
"""

from __future__ import annotations

from agent.policy.masks import Mask, shift
from agent.policy.redact import Redactor, Where

KEY = b"k" * 32


def spans(value: str, masks: list[Mask]) -> list[tuple[str, str, str]]:
    return [(value[m.start : m.end], m.rule, m.why) for m in masks]


def test_mailbox_fields_are_masked_exactly() -> None:
    value = " 8152 , Alice Doe ,a@x.example,  pager@x.example ,attach=yes|imappassword=S3cr|tz=x"
    masks = Redactor(KEY).mailbox_masks(value)
    assert spans(value, masks) == [
        ("8152", "voicemail-pin", "mailbox PIN"),
        ("Alice Doe", "voicemail-personal", "mailbox owner"),
        ("a@x.example", "voicemail-personal", "mailbox owner"),
        ("pager@x.example", "voicemail-personal", "mailbox owner"),
        ("S3cr", "secret-key", "imappassword"),
    ]


def test_empty_mailbox_fields_are_skipped_not_the_end() -> None:
    value = "1234,,,x@y.example"
    assert spans(value, Redactor(KEY).mailbox_masks(value)) == [
        ("1234", "voicemail-pin", "mailbox PIN"),
        ("x@y.example", "voicemail-personal", "mailbox owner"),
    ]


def test_an_alias_entry_has_no_pin() -> None:
    assert Redactor(KEY).mailbox_masks("1000@default") == []


def test_mailbox_options_mask_only_secret_values() -> None:
    value = "1,n,e,p,=x|attach=yes|imappassword=|imapuser=bob|imappassword=Zz=9|x"
    masks = Redactor(KEY).mailbox_masks(value)
    assert spans(value, masks)[4:] == [("Zz=9", "secret-key", "imappassword")]


def test_shift_moves_spans_and_keeps_rule_and_reason() -> None:
    masks = [Mask(1, 3, "r", "why"), Mask(5, 9, "s")]
    assert shift(masks, 10) == [Mask(11, 13, "r", "why"), Mask(15, 19, "s", "")]


def conf(
    key: str, value: str, family: str = "", section: str = "", *, rule: str = ""
) -> list[tuple[str, str, str]]:
    """The spans of ``rule`` (default: that of the key's own plan, shapes left out)."""
    masks = Redactor(KEY).conf_masks(key, value, Where(family=family, section=section))
    return [s for s in spans(value, masks) if not rule or s[1] == rule]


def test_register_lines_mask_secret_and_authuser_only() -> None:
    assert conf("register", "alice:S3cret@sip.example/100", rule="register-line") == [
        ("S3cret", "register-line", "register")
    ]
    assert conf(
        "register", "peer?TLS://alice:S3:cret:authu@sip.example:5061", rule="register-line"
    ) == [("S3:cret:authu", "register-line", "register")]
    assert conf("register", ":S3cret@sip.example", rule="register-line") == [
        ("S3cret", "register-line", "register")
    ]
    assert conf("register", "u:p", rule="register-line") == [
        ("p", "register-line", "register")
    ]  # no host part
    assert conf("register", "alice@sip.example", rule="register-line") == []
    assert conf("register", "alice:@sip.example", rule="register-line") == []
    assert (
        conf("register", "alice:[mykey]@sip.example", rule="register-line") == []
    )  # an RSA key's name (iax)


def test_auth_lines_mask_the_secret() -> None:
    assert conf("auth", "alice:S3cret@realm.example", rule="auth-line") == [
        ("S3cret", "auth-line", "auth")
    ]
    assert conf("auth", "alice#0123abcd@realm", rule="auth-line") == [
        ("0123abcd", "auth-line", "auth")
    ]
    assert conf("auth", "alice:S3\ncret", rule="auth-line") == [("S3\ncret", "auth-line", "auth")]
    assert conf("auth", "alice:@realm", rule="auth-line") == []


def test_application_map_arguments() -> None:
    where = {"family": "features", "section": "ApplicationMap"}
    assert ("Xy9", "secret-variable", "DB_PASSWORD") in conf(
        "f1", "*9,self,Set(DB_PASSWORD=Xy9)", **where
    )
    assert ("Pw7", "command-flag", "System") in conf(
        "f2", "*8,self,System,curl -u bob:Pw7 http://h.example/", **where
    )
    # The same values elsewhere are not an application map's arguments.
    assert ("Pw7", "command-flag", "System") not in conf(
        "f2", "*8,self,System,curl -u bob:Pw7 http://h.example/", family="features"
    )
    assert conf("f3", "*7,self", **where) == []
    assert conf("f4", "*7,self,Playback,tt-monkeys", **where) == []
    assert conf("f5", "*7,self,Playback", **where) == []


def test_embedded_credentials_in_free_values() -> None:
    red = Redactor(KEY)
    out = red.embedded("SIP/alice:Pw9@carrier.example/100")
    assert out is not None and "Pw9" not in out and "carrier.example" in out
    out = red.embedded("https://bob:Zq8@api.example/x")
    assert out is not None and "Zq8" not in out and "api.example" in out
    out = red.embedded("Authorization: Bearer abcdefghijklmnop1234")
    assert out is not None and "abcdefghijklmnop1234" not in out
    assert red.embedded("just some words") is None
    out = red.embedded("SIP/a:P1@h https://b:P2@i Authorization: Basic Zm9vOmJhcg==")
    assert out is not None
    assert "P1" not in out and "P2" not in out and "Zm9vOmJhcg==" not in out


def test_auth_and_register_in_globals_are_variables() -> None:
    """`Auth = token` in [globals] (or globals_custom.conf) is a variable holding a secret, not
    sip.conf's `auth = user:secret@realm`: found by the property test, a whole token leaked."""
    red = Redactor(KEY)
    for where in (Where(family="globals"), Where(family="extensions", section="globals")):
        for key in ("Auth", "auth"):
            out = red.conf_value(key, "Zx222222Q711", where)
            assert out is not None and "Zx222222Q711" not in out, (where, key)
    # In sip.conf they keep their own meaning.
    sip = Where(family="sip", section="peer")
    assert red.conf_value("auth", "md5", Where(family="iax", section="peer")) is None
    out = red.conf_value("auth", "bob:pw9@realm", sip)
    assert out is not None and "pw9" not in out and out.startswith("bob:")


def test_render_places_markers_and_explains_each_on_its_line() -> None:
    """`snapshot --explain` says which rule fired on which line and why, never the value; a
    secret spanning lines keeps its line breaks so later lines keep their numbers."""
    from agent.policy.redact import Finding

    red = Redactor(KEY, explain=True)
    text = "a=S1\nb=\nmulti\nline\nc=S3 and S4\n"
    s1 = text.index("S1")
    ml = text.index("multi")
    s3 = text.index("S3")
    s4 = text.index("S4")
    masks = [
        Mask(s1, s1 + 2, "r1", "a"),
        Mask(ml, ml + len("multi\nline"), "r2", "b"),
        Mask(s3, s3 + 2, "r3", "c"),
        Mask(s3, s3 + 1, "r3", "inner"),  # inside the one before: merged away
        Mask(s4, s4 + 2, "r4"),
    ]
    out = red.render(text, masks, first_line=10)
    fp = red.fingerprint
    assert out == (
        f"a=<redacted:r1:{fp('S1')}>\nb=\n<redacted:r2:{fp('multi' + chr(10) + 'line')}>\n\n"
        f"c=<redacted:r3:{fp('S3')}> and <redacted:r4:{fp('S4')}>\n"
    )
    assert out.count("\n") == text.count("\n")
    assert red.findings == [
        Finding(10, "r1", "a"),
        Finding(12, "r2", "b"),
        Finding(14, "r3", "c"),
        Finding(14, "r4", ""),
    ]
    assert dict(red.fired) == {"r1": 1, "r2": 1, "r3": 1, "r4": 1}


def test_render_on_one_line_and_without_explain() -> None:
    from agent.policy.redact import Finding

    red = Redactor(KEY, explain=True)
    red.line = 7
    assert red.render("x=AB", [Mask(2, 4, "r")], line=3) == (
        f"x=<redacted:r:{red.fingerprint('AB')}>"
    )
    red.marker("q", "v")
    assert red.findings == [Finding(3, "r", ""), Finding(7, "q", "")]
    quiet = Redactor(KEY)
    assert quiet.findings is None
    assert quiet.render("x=AB", []) == "x=AB"
    assert quiet.render("x=AB", [Mask(2, 4, "r")]) == f"x=<redacted:r:{quiet.fingerprint('AB')}>"
