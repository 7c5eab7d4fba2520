"""The syntax readers under the redaction rules: PHP, AEL, Lua and shell-style settings.

Each test writes the construct the way PHP, pbx_ael, pbx_lua or a shell reads
it and checks that the planted value is masked and the rest of the text kept.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.collectors.pbxconfig import lua, php
from agent.collectors.pbxconfig.filters import kind_of, redact_text

KEY = b"\x05" * 32


def red(text: str, name: str) -> tuple[str, dict[str, int]]:
    r = redact_text(text, kind_of(PurePosixPath(name), text), KEY, name=name)
    return r.text, dict(r.fired)


# -- PHP --------------------------------------------------------------------------------


def test_php_value_on_the_next_line() -> None:
    """$amp_conf['AMPDBPASS'] = on one line, the value on the next: masked."""
    out, fired = red("<?php\n$amp_conf['AMPDBPASS'] =\n\n    'Ph1Next';\n", "freepbx.conf")
    assert "Ph1Next" not in out and out.count("\n") == 4
    assert fired == {"freepbx-key": 1}


def test_php_heredoc_and_nowdoc_with_indented_closing() -> None:
    """Heredoc and nowdoc bodies (PHP 7.3 indented closing markers) are masked whole."""
    text = (
        "<?php\n$amp_conf['AMPDBPASS'] = <<<EOT\n    Ph2Here\n    more Ph2More\n    EOT;\n"
        "$cfg['db_password'] = <<<'NOW'\nPh3Now{$x}\nNOW;\n$keep = 'Ph-keep';\n"
    )
    out, fired = red(text, "freepbx.conf")
    assert "Ph2Here" not in out and "Ph2More" not in out and "Ph3Now" not in out
    assert "$keep = 'Ph-keep';" in out and out.count("\n") == text.count("\n")
    assert fired == {"freepbx-key": 1, "secret-variable": 1}


def test_php_escapes_do_not_end_strings() -> None:
    """An escaped quote stays inside the string: the whole value is masked, nothing after it."""
    out, _ = red(
        "<?php\n$a['AMPDBPASS'] = 'Ph4\\'still';\n"
        "$b['db_pass'] = \"Ph5\\\"still\";\n$c = 'keep';\n",
        "freepbx.conf",
    )
    assert "Ph4" not in out and "Ph5" not in out and "still" not in out
    assert "$c = 'keep';" in out


def test_php_concatenation_and_interpolation() -> None:
    """Every literal of a concatenated secret is masked; variables between them stay."""
    out, _ = red(
        "<?php\n$amp_conf['AMPMGRPASS'] = 'Ph6a' . $suffix . \"Ph6b{$arr['k']}\" . 'Ph6c';\n",
        "freepbx.conf",
    )
    assert "Ph6a" not in out and "Ph6b" not in out and "Ph6c" not in out
    assert ". $suffix ." in out


def test_php_define_arrays_properties_and_constants() -> None:
    """define(), array keys (nested, both syntaxes), properties and class constants."""
    text = (
        "<?php\ndefine('DB_PASSWORD', 'Ph7');\n"
        "$c = array('host' => 'keep-host', 'password' => 'Ph8', 'x' => ['api_key' => 'Ph9']);\n"
        "$this->config->secret = 'Ph10';\n"
        "class A { const API_TOKEN = 'Ph11'; public $pin = 1234; }\n"
        "ini_set('mysql.default_password', 'Ph12');\n"
    )
    out, _ = red(text, "settings.php")
    assert not any(f"Ph{i}'" in out for i in range(7, 13)) and "1234" not in out
    assert "'host' => 'keep-host'" in out


def test_php_client_functions_by_position() -> None:
    """The password argument of PDO, mysqli and curl_setopt(CURLOPT_USERPWD)."""
    text = (
        "<?php\n$db = new PDO($dsn, 'keep-user', 'Ph13');\n"
        "$m = mysqli_connect('keep-host', 'keep-user', 'Ph14', 'asterisk');\n"
        "curl_setopt($ch, CURLOPT_USERPWD, 'keep-user:Ph15');\n"
        "curl_setopt($ch, CURLOPT_URL, 'https://keep.example.com/');\n"
    )
    out, fired = red(text, "module.php")
    assert "Ph13" not in out and "Ph14" not in out and "Ph15" not in out
    assert "'keep-host', 'keep-user'," in out and "https://keep.example.com/" in out
    assert fired == {"secret-argument": 3}


def test_php_comments_and_inline_html() -> None:
    """Secrets in //, #, /* */ comments and in HTML outside <?php ?> are masked; #[ is code."""
    text = (
        "<html><!-- password=Ph16 --></html>\n<?php\n// token: Ph17\n# secret=Ph18\n"
        "/* multi\n   pass=Ph19 */\n#[Attribute]\nfunction f() {} // ?> <b>secret=Ph20</b>\n"
    )
    out, _ = red(text, "page.php")
    assert not any(f"Ph{i}" in out for i in range(16, 21))
    assert "#[Attribute]" in out


def test_php_unterminated_comment_fails_closed() -> None:
    """An unterminated /* that mentions a secret: every line from it on is masked whole."""
    out, fired = red("<?php\n$keep = 1;\n/* password\nPh21 left open\n", "freepbx.conf")
    assert "Ph21" not in out and "$keep = 1;" in out
    assert fired == {"unparsed-line": 2}


_PHP_CHARS = list("<?php $a='\"`/#*=>.;\n<<<EOT\\(){}[]x ")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(_PHP_CHARS), max_size=120))
def test_php_tokens_cover_the_text_in_order(text: str) -> None:
    """Whatever the text, tokens are contiguous and ordered up to where tokenizing stopped."""
    toks, error = php.tokenize(text)
    pos = 0
    for t in toks:
        assert t.start == pos and t.end > t.start
        pos = t.end
    assert pos == (len(text) if error is None else pos)
    if error is not None:
        assert error >= 0


# -- AEL --------------------------------------------------------------------------------


def test_ael_globals_statements_and_comments() -> None:
    """globals, assignments, applications, if conditions and both comment forms."""
    text = (
        'globals {\n  TRUNK_PASS="Ae1";\n  KEEP=PJSIP/keep;\n};\n'
        "context keep-ctx {\n  100 => {\n    Set(DB_TOKEN=Ae2);\n    Authenticate(Ae3);\n"
        "    for (x=0; ${x} < 3; x=${x} + 1) { NoOp(keep-loop); };\n"
        "    if (${USERPIN} = Ae4) { NoOp(keep-ok); };\n  };\n"
        "  200 => MeetMe(keep-1,,Ae5); // secret=Ae6\n  /* password = Ae7 */\n};\n"
    )
    out, _ = red(text, "extensions.ael")
    assert not any(f"Ae{i}" in out for i in range(1, 8))
    for kept in ("KEEP=PJSIP/keep;", "NoOp(keep-loop)", "context keep-ctx {", "MeetMe(keep-1,,"):
        assert kept in out
    assert out.count("\n") == text.count("\n")


def test_ael_comment_marks_inside_quotes_are_text() -> None:
    """A // inside double quotes is not a comment: the URL is read as a value."""
    out, _ = red('globals {\n  HOOK="https://u:Ae8@keep.example.com//x";\n};\n', "extensions.ael")
    assert "Ae8" not in out and "@keep.example.com//x" in out


# -- Lua --------------------------------------------------------------------------------


def test_lua_assignments_tables_and_setters() -> None:
    """Globals, locals, table fields (both forms), channel variables and :set()."""
    text = (
        'TRUNK_PASS = "Lu1"\nlocal api_token, keep = "Lu2", "keep-value"\n'
        'cfg = { password = [==[Lu3]==], host = "keep-host", ["db_secret"] = \'Lu4\' }\n'
        'channel.VM_PIN = "Lu5"\nchannel["DB_PASS"]:set("Lu6")\n'
        'channel.CURLOPT("userpwd"):set("keep:Lu7")\nchannel.LANGUAGE():set("keep-fr")\n'
    )
    out, _ = red(text, "extensions.lua")
    assert not any(f"Lu{i}" in out for i in range(1, 8))
    assert '"keep-host"' in out and '"keep-fr"' in out


def test_lua_app_calls_join_arguments_as_pbx_lua_does() -> None:
    """app.meetme("1", "", "pin") and app.meetme("1,,pin") are the same call."""
    text = (
        'app.meetme("keep-1", "", "Lu8")\napp.meetme("keep-2,,Lu9")\napp["Authenticate"]("Lu10")\n'
        'app.authenticate(pins[1])\napp.set("API_KEY=" .. "Lu11")\napp.dial("PJSIP/keep")\n'
    )
    out, _ = red(text, "extensions.lua")
    assert not any(f"Lu{i}" in out for i in range(8, 12))
    assert "app.authenticate(pins[1])" in out and 'app.dial("PJSIP/keep")' in out


def test_lua_long_comments_and_strings_with_dashes() -> None:
    """--[[ ]] comments are read as text; "--" inside a string is not a comment."""
    text = '--[[ secret = Lu12 ]]\nURL = "https://keep.example.com/--x?token=Lu13"\n'
    out, _ = red(text, "extensions.lua")
    assert "Lu12" not in out and "Lu13" not in out and "keep.example.com/--x?token=" in out


def test_lua_unfinished_string_fails_closed() -> None:
    """A string left open on a line that mentions a secret: the rest is masked whole."""
    _, error = lua.tokenize('x = 1\nTRUNK_PASS = "Lu14\n')
    assert error is not None
    out, fired = red('x = 1\nTRUNK_PASS = "Lu14\n', "extensions.lua")
    assert "Lu14" not in out and "x = 1" in out and fired == {"unparsed-line": 1}


# -- shell-style settings (amportal.conf) ------------------------------------------------


def test_shell_quotes_continue_across_lines() -> None:
    """A quoted value spanning lines is masked in full; other keys and comments stay."""
    text = (
        "# keep comment\nAMPDBPASS='Sh1\nSh2'\nAMPDBUSER=keep-user\n"
        'export API_TOKEN="Sh3 \\"quoted\\" Sh4"\nCDR=cdr\\\nSh5-not-secret\n'
    )
    out, fired = red(text, "amportal.conf")
    assert not any(f"Sh{i}" in out for i in (1, 2, 3, 4))
    assert "AMPDBUSER=keep-user" in out and "# keep comment" in out
    assert out.count("\n") == text.count("\n")
    assert fired == {"freepbx-key": 1, "secret-variable": 1}
