"""The Asterisk configuration reader, one test per syntax rule of main/config.c."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.collectors.pbxconfig import asterisk_conf as ac
from agent.collectors.pbxconfig.filters import redact_asterisk, redact_text
from agent.policy.redact import Redactor

BASE = PurePosixPath("/etc/asterisk")
SAMPLES = Path(__file__).resolve().parent / "fixtures" / "asterisk-samples"
KEY = b"k" * 32


def load(text: str, files: dict[str, str] | None = None) -> ac.Config:
    files = files or {}

    def opener(p: PurePosixPath) -> str | None:
        return files.get(str(p))

    def expand(pattern: str) -> list[PurePosixPath]:
        rx = __import__("agent.collectors.pbxconfig.sources", fromlist=["glob_regex"]).glob_regex(
            pattern
        )
        return [PurePosixPath(p) for p in sorted(files) if rx.match(p)]

    return ac.load(text, "/etc/asterisk/test.conf", base_dir=BASE, opener=opener, expand=expand)


def only(cfg: ac.Config, name: str) -> ac.Category:
    cat = cfg.section(name)
    assert cat is not None, f"no [{name}]"
    return cat


def test_semicolon_starts_a_comment_anywhere() -> None:
    """A ';' ends the value wherever it appears on the line."""
    cat = only(load("[a]\nkey = value ; a note\n; whole line\n"), "a")
    assert cat.get("key") == "value"
    assert len(cat.variables) == 1


def test_escaped_semicolon_is_kept_in_the_value() -> None:
    """'\\;' is a literal semicolon and the backslash is removed."""
    cat = only(load("[a]\npassword = abc\\;def ; comment\n"), "a")
    assert cat.get("password") == "abc;def"


def test_block_comment_spans_lines() -> None:
    """';--' opens a block that hides every line until '--;'."""
    cfg = load("[a]\n;-- start\nhidden = 1\n--;\nshown = 2\n")
    assert only(cfg, "a").get("hidden") is None
    assert only(cfg, "a").get("shown") == "2"


def test_block_comments_nest() -> None:
    """A nested ';--' needs its own '--;' before the outer block ends."""
    text = "[a]\n;-- outer\n;-- inner --;\nstill = hidden\n--;\nvisible = yes\n"
    cat = only(load(text), "a")
    assert cat.get("still") is None
    assert cat.get("visible") == "yes"


def test_block_comment_inside_a_line_joins_the_parts() -> None:
    """Text either side of a one-line block is joined, as Asterisk does."""
    cat = only(load("[a]\nkey = left;-- gone --;right\n"), "a")
    assert cat.get("key") == "leftright"


def test_three_dashes_are_not_a_block() -> None:
    """';---' is an ordinary comment, not a block opener."""
    cat = only(load("[a]\n;--- banner\nkey = 1\n"), "a")
    assert cat.get("key") == "1"


def test_equals_and_object_arrow() -> None:
    """'=' and '=>' both assign; the operator is remembered."""
    cat = only(load("[a]\nx = 1\ny => 2\n"), "a")
    ops = {v.name: v.op for v in cat.variables}
    assert ops == {"x": "=", "y": "=>"}
    assert cat.get("y") == "2"


def test_plus_equals_appends_to_the_previous_value() -> None:
    """'key += more' continues the last value of the key."""
    cat = only(load("[a]\nallow = ulaw\nallow += ,alaw\n"), "a")
    assert cat.get_all("allow") == ["ulaw,alaw"]


def test_keys_are_case_insensitive() -> None:
    """Lookups ignore case, as Asterisk's do."""
    cat = only(load("[a]\nSecret = x\n"), "a")
    assert cat.get("secret") == "x"


def test_templates_and_inheritance() -> None:
    """'[t](!)' is a template; '[n](t)' starts with its variables; own values come last."""
    cfg = load("[t](!)\ntype = endpoint\ncontext = internal\n[1000](t)\ncontext = other\n")
    assert cfg.section("t") is None  # templates are not sections
    cat = only(cfg, "1000")
    assert cat.get("type") == "endpoint"
    assert cat.get("context") == "other"
    assert [v.inherited for v in cat.variables] == [True, True, False]


def test_multiple_templates_in_order() -> None:
    """'[n](a,b)' inherits from both, in order."""
    cfg = load("[a](!)\nx = 1\n[b](!)\nx = 2\ny = 3\n[n](a,b)\n")
    cat = only(cfg, "n")
    assert cat.get_all("x") == ["1", "2"]
    assert cat.get("y") == "3"


def test_missing_template_is_reported() -> None:
    """Inheriting from an unknown template is a problem, not a crash."""
    cfg = load("[n](nosuch)\nx = 1\n")
    assert any("nosuch" in p.reason for p in cfg.problems)


def test_plus_adds_to_an_earlier_section() -> None:
    """'[name](+)' continues the section of that name."""
    cfg = load("[a]\nx = 1\n[b]\n[a](+)\ny = 2\n")
    assert len(cfg.sections("a")) == 1
    assert only(cfg, "a").get("y") == "2"


def test_repeated_sections_and_keys_are_kept() -> None:
    """Sections and keys may repeat; nothing is merged away."""
    cfg = load("[a]\nk = 1\nk = 2\n[a]\nk = 3\n")
    assert [c.get_all("k") for c in cfg.sections("a")] == [["1", "2"], ["3"]]


def test_include_forms_bare_quoted_and_angle() -> None:
    """'#include' takes a bare, quoted or bracketed name relative to the config folder."""
    files = {
        "/etc/asterisk/a.conf": "[a]\nx = 1\n",
        "/etc/asterisk/b.conf": "[b]\nx = 2\n",
        "/etc/asterisk/c.conf": "[c]\nx = 3\n",
    }
    cfg = load('#include a.conf\n#include "b.conf"\n#include <c.conf>\n', files)
    assert [c.name for c in cfg.categories] == ["a", "b", "c"]
    assert [i.argument for i in cfg.includes] == ["a.conf", "b.conf", "c.conf"]


def test_include_glob_is_expanded() -> None:
    """A glob in '#include' reads each match in order."""
    files = {"/etc/asterisk/x/1.conf": "[one]\n", "/etc/asterisk/x/2.conf": "[two]\n"}
    cfg = load("#include x/*.conf\n", files)
    assert [c.name for c in cfg.categories] == ["one", "two"]


def test_missing_include_is_reported_and_tryinclude_is_not() -> None:
    """A broken '#include' is a problem; a missing '#tryinclude' is fine."""
    cfg = load("#include gone.conf\n#tryinclude maybe.conf\n")
    reasons = [p.reason for p in cfg.problems]
    assert any("gone.conf" in r for r in reasons)
    assert not any("maybe.conf" in r for r in reasons)


def test_include_loop_is_reported_not_followed_forever() -> None:
    """a includes b includes a: reported once, the reader terminates."""
    files = {
        "/etc/asterisk/a.conf": "[a]\n#include b.conf\n",
        "/etc/asterisk/b.conf": "[b]\n#include a.conf\n",
    }
    cfg = load("#include a.conf\n", files)
    assert any("loop" in p.reason for p in cfg.problems)


def test_exec_is_recorded_and_never_run(tmp_path: Path) -> None:
    """'#exec' is kept as a record; the program does not run."""
    marker = tmp_path / "ran"
    cfg = load(f"#exec /bin/touch {marker}\n[a]\n")
    assert [e.argument for e in cfg.execs] == [f"/bin/touch {marker}"]
    assert not marker.exists()


def test_line_without_equals_is_a_problem_and_kept() -> None:
    """A line Asterisk cannot read is reported and survives a round trip."""
    text = "[a]\nthis is not valid\nx = 1\n"
    cfg = load(text)
    assert any("equal sign" in p.reason for p in cfg.problems)
    assert ac.render(ac.lex(text)) == text


def test_directives_helper_honours_block_comments() -> None:
    """An '#include' inside a block comment is not a directive."""
    text = ";--\n#include hidden.conf\n--;\n#include shown.conf\n"
    assert [d.argument for d in ac.directives(text)] == ["shown.conf"]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab=>[]();-\\#+! \t\r\n")), max_size=200))
def test_lex_round_trips_any_text(text: str) -> None:
    """Whatever the text, lexing and rendering gives it back byte for byte."""
    assert ac.render(ac.lex(text)) == text


_RULE_TOKENS = [
    *"abs=>[]();-\\#@:/ \n,?&%",
    "secret",
    "IAX2/",
    "register",
    "pin",
    "://",
    "auth",
    "mwi",
    "PASS",
    "#",
    # what the argument-, position- and shape-aware rules look for (issue 10)
    "exten => 1,1,",
    "same => n,",
    "Authenticate(",
    "DISA(",
    "MeetMe(1,,",
    "SendDTMF(",
    "Set(",
    "MSet(",
    "Dial(x,,D(",
    "AES_ENCRYPT(",
    "AES_DECRYPT(",
    "Authenticate",
    "MYSQL(Connect c h u ",
    "Gosub(sub-pin,s,1(",
    "Macro(auth,",
    "$[${PIN} = ",
    "setvar=",
    "set_var=",
    "API_AUTH=",
    "user:",
    " -p",
    "-pX",
    " -u ",
    "--user=",
    "--password ",
    "pass:",
    "ldapsearch -w ",
    "?token=",
    "&apikey=",
    "Authorization: Basic ",
    "Bearer ",
    "Cookie: ",
    "AKIAIOSFODNN7EXAMPLE",
    "eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl",
    "[globals]\n",
    "[rooms]\n",
    "conf => ",
    "\\;",
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(_RULE_TOKENS), max_size=80).map("".join),
    st.sampled_from(["test.conf", "extensions_custom.conf", "globals_custom.conf", "pjsip.conf"]),
)
def test_fast_path_agrees_with_line_by_line(text: str, name: str) -> None:
    """The candidate-line fast path masks exactly what the full parse masks (no ';--')."""
    from agent.policy.conf_fields import family_of

    text = text.replace(";--", "; -")
    fast = redact_text(text, "asterisk", KEY, name=name).text
    redactor = Redactor(KEY, tokens=False)
    slow = redact_asterisk(text, redactor, voicemail=False, family=family_of(name))
    assert fast == slow


def test_fast_path_agrees_on_the_sample_corpus() -> None:
    """On every real sample without block comments, both paths give the same text."""
    checked = 0
    for f in sorted(SAMPLES.glob("*.sample")):
        text = f.read_bytes().decode("utf-8", "surrogateescape")
        if ";--" in text or f.name.startswith("voicemail"):
            continue
        name = f.name.removesuffix(".sample")
        family = __import__("agent.policy.conf_fields", fromlist=["x"]).family_of(name)
        assert redact_text(text, "asterisk", KEY, name=name).text == redact_asterisk(
            text, Redactor(KEY, tokens=False), voicemail=False, family=family
        ), f.name
        checked += 1
    assert checked >= 10


_ORACLE_STRONG = re.compile(
    r"(?i)pass|secret|pwd|token|cred|key|pin|cookie|bearer|disa\(|meetme\("
    r"|senddtmf\(|aes_encrypt\(|aes_decrypt\(|mysql\(|authenticate\("
)
_ORACLE_FLAG = re.compile(r"(?i)(?<![\w\-./])-(?:[puwacxk]|-)")
_ORACLE_CRED = re.compile(r"(?i)regist|mwi")
_CANDIDATE_TOKENS = st.sampled_from(
    [
        *"ab=:#@ \n",
        "pass",
        "PaSs",
        "secret",
        "pwd",
        "token",
        "cred",
        "key",
        "pin",
        "auth",
        "AUTH",
        "regist",
        "mwi",
        "pa",
        "ss",
        "cookie",
        "Bearer",
        "setvar",
        "set_var",
        "va",
        "r",
        "DISA(",
        "Authenticate",
        "Authenticate(",
        "aes_encrypt(",
        "Dial",
        "D(",
        "Set(",
        "?",
        "&",
        "$[",
        " -p",
        "\t-U",
        "(--user",
        "AKIA",
        "eyJ",
        "İ",
        "ı",
        "ſ",
        "\u212a",
        "é",
        "ß",
    ]
)


def _oracle_starts(text: str) -> list[int]:
    """Line by line, with the rules' own case-insensitive regexes: the lines to look at."""
    starts, pos = [], 0
    for line in text.split("\n"):
        marked = ":" in line or "#" in line
        low = line.lower()
        auth_marked = marked or any(m in low for m in ("?", "&", "$"))
        if (
            _ORACLE_STRONG.search(line)
            or _ORACLE_FLAG.search(line)
            or ("@" in line and ":" in line)
            or (marked and _ORACLE_CRED.search(line))
            or (auth_marked and re.search("(?i)auth", line))
            or re.search("(?i)dial\\(", line)
            or (re.search("(?i)set\\(", line) and (":" in line or re.search("(?i)auth", line)))
            or re.search("(?i)set_?var", line)
        ):
            starts.append(pos)
        pos += len(line) + 1
    return starts


@settings(max_examples=300, deadline=None)
@given(st.lists(_CANDIDATE_TOKENS, max_size=80).map("".join), st.booleans())
def test_fast_path_picks_the_lines_the_rules_would(text: str, padded: bool) -> None:
    """The fast path's candidate lines are exactly those a line-by-line regex check picks."""
    from agent.collectors.pbxconfig.filters import _candidate_starts

    if padded:  # long text with few marks: the loop runs over the marks
        text = "; padding line\n" * 80 + text
    assert _candidate_starts(text) == _oracle_starts(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(_CANDIDATE_TOKENS | st.sampled_from([";", "=>", "[", "]", "IAX2/"])).map("".join))
def test_fast_path_agrees_with_line_by_line_beyond_ascii(text: str) -> None:
    """With letters whose case rules are odd (İ ı ſ K), both paths still mask the same."""
    text = text.replace(";--", "; -")
    fast = redact_text(text, "asterisk", KEY).text
    slow = redact_asterisk(text, Redactor(KEY, tokens=False), voicemail=False)
    assert fast == slow
