"""Every place Asterisk and FreePBX keep a secret, through the real snapshot path.

A hand-written corpus (tests/fixtures/redaction-corpus) plants a distinctive
token (``Zq`` + two letters + two digits + ``Tok``) in each class of secret
position, in every file type that can hold it; a property test plants random
tokens in every position of a generated tree. Both run the collector's own
scan, decide and decode_content, and look for each token, its base64 and its
hex, in what would be sent. Asterisk itself is not packaged for Debian 12: the
files are written the way Asterisk and FreePBX read them, not produced by them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.collectors.pbxconfig import parts
from agent.collectors.pbxconfig.collector import SnapshotCollector
from agent.collectors.pbxconfig.settings import SnapshotSettings
from agent.policy.classes import Record

CORPUS = Path(__file__).resolve().parent / "fixtures" / "redaction-corpus"
PLANTED = re.compile(r"Zq[A-Z]{2}\d{2}", re.IGNORECASE)
KEEP = re.compile(r"keep-[\w.]+(?:-[\w.]+)*")

#: Every file type the issue lists, present in the corpus.
FILE_TYPES = (
    "extensions.conf",
    "extensions_custom.conf",
    "extensions.ael",
    "extensions.lua",
    "globals_custom.conf",
    "pjsip.conf",
    "pjsip_wizard.conf",
    "sip.conf",
    "sip_additional.conf",
    "iax.conf",
    "meetme.conf",
    "meetme_additional.conf",
    "confbridge.conf",
    "voicemail.conf",
    "manager.conf",
    "ari.conf",
    "http.conf",
    "res_odbc.conf",
    "cdr_mysql.conf",
    "cdr_pgsql.conf",
    "phoneprov.conf",
    "freepbx.conf",
    "amportal.conf",
)


def forms(secret: str) -> list[str]:
    """The token as sent in clear, in base64 (each alignment, both alphabets) and in hex."""
    raw = secret.encode()
    out = {secret, raw.hex(), raw.hex().upper()}
    for pad in range(3):
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            full = enc(b"\0" * pad + raw).decode()
            # the characters that depend only on the token's own bytes
            core = full[(pad * 4 + 2) // 3 + 1 : -3]
            if len(core) >= 6:
                out.add(core)
    return sorted(out)


@dataclass(slots=True)
class Sent:
    """What one full snapshot put on the wire, put back together as the NOC does."""

    entries: dict[str, dict[str, Any]]  # manifest entries by path
    fired: dict[str, int]  # the rules that fired, by count (the summary's "rules")


def run_snapshot(base: Path) -> tuple[list[dict[str, Any]], dict[str, str], Sent]:
    """A full snapshot of ``base``/etc as the collector makes and offers it: the bodies,
    the decoded texts (reassembled and verified) and the manifest."""
    etc = base / "etc"
    roots = tuple(p for p in (etc / "asterisk", etc / "freepbx.conf", etc / "amportal.conf"))
    settings_ = SnapshotSettings(roots=roots, exclude=())
    bodies: list[dict[str, Any]] = []

    def emit(record: Record) -> bool:
        bodies.append(dict(record.body))
        return True

    collector = SnapshotCollector(settings_, base / "state")
    try:
        asyncio.run(collector.collect(emit, reason="command"))
    finally:
        asyncio.run(collector.aclose())
    whole = parts.reassemble(bodies)
    sent = Sent({e["path"]: e for e in whole.entries}, dict(whole.summary.get("rules", {})))
    return bodies, whole.texts, sent


def leaks(secrets: list[str], bodies: list[dict[str, Any]], texts: dict[str, str]) -> list[str]:
    """Every form of every secret found in the bodies or the decoded content."""
    wire = json.dumps(bodies)
    decoded = json.dumps(texts, ensure_ascii=False) + "\n".join(texts.values())
    return [f for s in secrets for f in forms(s) if f in wire or f in decoded]


def test_corpus_covers_every_file_type() -> None:
    """The hand-written corpus has a file of each type the issue names, each with plants."""
    files = {p.name: p for p in CORPUS.rglob("*") if p.is_file()}
    for name in FILE_TYPES:
        assert name in files, name
        assert PLANTED.search(files[name].read_text()), f"{name}: nothing planted"


def test_corpus_leaks_nothing(tmp_path: Path) -> None:
    """No planted token, in clear, base64 or hex, is in anything a snapshot would send."""
    shutil.copytree(CORPUS, tmp_path, dirs_exist_ok=True)
    sources = [p.read_text() for p in CORPUS.rglob("*") if p.is_file()]
    planted = sorted({m.group(0) for text in sources for m in PLANTED.finditer(text)})
    assert len(planted) > 130
    bodies, texts, sent = run_snapshot(tmp_path)
    statuses = {p.rsplit("/", 1)[-1]: e["status"] for p, e in sent.entries.items()}
    assert all(statuses[n] == "ok" for n in FILE_TYPES), statuses  # redacted, not dropped
    assert leaks(planted, bodies, texts) == []
    assert not [t for t in texts.values() if PLANTED.search(t)]


def test_corpus_structure_stays_readable(tmp_path: Path) -> None:
    """Contexts, extension patterns, hosts, ports, codecs and names ("keep-…") all stay."""
    shutil.copytree(CORPUS, tmp_path, dirs_exist_ok=True)
    _, texts, _ = run_snapshot(tmp_path)
    by_name = {path.rsplit("/", 1)[-1]: text for path, text in texts.items()}
    for src in CORPUS.rglob("*"):
        if not src.is_file():
            continue
        original = src.read_text()
        sent = by_name[src.name]
        assert sent.count("\n") == original.count("\n"), src.name
        missing = sorted(set(KEEP.findall(original)) - set(KEEP.findall(sent)))
        assert missing == [], f"{src.name}: structure masked: {missing}"
    ext = by_name["extensions.conf"]
    for kept in ("exten => _9NXXXXXX,1,", "[keep-from-internal]", "RINGTIME=20", "include => "):
        assert kept in ext
    assert "allow=ulaw,alaw,g722" in by_name["pjsip.conf"]
    assert "bind=0.0.0.0:5061" in by_name["pjsip.conf"]
    assert "bindport=8088" in by_name["http.conf"]


def test_corpus_fires_every_class_of_rule(tmp_path: Path) -> None:
    """Each class of the issue is exercised: its rule fires on the corpus."""
    shutil.copytree(CORPUS, tmp_path, dirs_exist_ok=True)
    _, _, sent = run_snapshot(tmp_path)
    expected = {
        "secret-key",
        "freepbx-key",
        "secret-variable",
        "secret-argument",
        "positional-field",
        "register-line",
        "auth-line",
        "dial-string",
        "url-credentials",
        "url-parameter",
        "user-password",
        "command-flag",
        "auth-header",
        "voicemail-pin",
        "voicemail-personal",
        "inline-secret",
    }
    assert expected <= set(sent.fired), expected - set(sent.fired)


def test_url_masked_by_two_rules_gives_one_marker(tmp_path: Path) -> None:
    """A URL's password found by two rules: one marker, host and path kept, nothing nested."""
    shutil.copytree(CORPUS, tmp_path, dirs_exist_ok=True)
    _, texts, _ = run_snapshot(tmp_path)
    ext = next(t for p, t in texts.items() if p.endswith("/extensions.conf"))
    line = next(ln for ln in ext.splitlines() if ln.startswith("BACKUP_URL="))
    assert re.fullmatch(
        r"BACKUP_URL=https://backup:<redacted:[a-z-]+:[0-9a-f]{12}>@keep-backup\.example\.net"
        r"/keep-path",
        line,
    ), line


# -- the property test ----------------------------------------------------------------

_WORDS = ["PASS", "Pwd", "secret", "TOKEN", "api_key", "PIN", "Auth", "CREDS", "cookie"]
VARIABLE = st.builds(
    lambda pre, head, word, tail: f"{pre}{head}{word}{tail}",
    st.sampled_from(["", "_", "__"]),
    st.sampled_from(["", "DB_", "trunk", "X", "My"]),
    st.sampled_from(_WORDS),
    st.sampled_from(["", "_1", "2", "_VALUE"]),
)
FREEPBX_KEY = st.sampled_from(["AMPDBPASS", "AMPMGRPASS", "CDRDBPASS", "X_SECRET", "api_token"])
PARAM = st.sampled_from(["apikey", "api_key", "token", "access_token", "password", "auth"])
SECRET = st.text(
    alphabet="ABCDEFGHJKMNPQRSTUVWXYZabcdefghjkmnpqrstuvwxyz23456789", min_size=6, max_size=16
).map(lambda s: f"Zx{s}Q7")

#: Every position a secret can take, by file: {s} is the secret, {v} a variable name,
#: {f} a FreePBX key, {p} a query parameter.
POSITIONS: dict[str, list[str]] = {
    "asterisk/extensions_custom.conf": [
        "[c]\nexten => 1,1,Set({v}={s})\n",
        "[c]\nexten => 1,1,Set(GLOBAL({v})={s})\n",
        "[c]\nexten => 1,1,Set(CURLOPT(userpwd)=u:{s})\n",
        "[c]\nexten => 1,1,MSet(a=1,{v}={s},b=2)\n",
        "[c]\nexten => 1,1,ExecIf($[1]?Set({v}={s}))\n",
        "[c]\nexten => 1,1,Authenticate({s},a)\n",
        "[c]\nexten => 1,1,MeetMe(100,dM,{s})\n",
        "[c]\nexten => 1,1,DISA({s},disa)\n",
        "[c]\nexten => 1,1,SendDTMF({s})\n",
        "[c]\nexten => 1,1,Dial(SIP/bridge,,D(ww{s}))\n",
        "[c]\nexten => 1,1,Dial(IAX2/u:{s}@h.example.com/1)\n",
        "[c]\nexten => 1,1,System(curl -u u:{s} https://h.example.com/)\n",
        "[c]\nexten => 1,1,System(mysql -uroot -p{s} asterisk)\n",
        "[c]\nexten => 1,1,System(tool --password {s} --host h)\n",
        "[c]\nexten => 1,1,SIPAddHeader(Authorization: Bearer {s})\n",
        "[globals]\n{v}={s}\n",
        "[globals]\nLOGIN=user:{s}\n",
        "[globals]\nURL=https://h.example.com/p?{p}={s}&x=1\n",
        "[globals]\nURL=https://u:{s}@h.example.com:8443/p\n",
        "#exec /usr/bin/x --password={s}\n",
        "#exec /usr/bin/x -p{s}\n",
        "; exten => 1,1,Authenticate({s})\n",
    ],
    "asterisk/globals_custom.conf": ["{v} = {s}\n", "LOGIN = user:{s}\n"],
    "asterisk/meetme.conf": ["[rooms]\nconf => 100,{s}\n", "[rooms]\nconf => 100,1234,{s}\n"],
    "asterisk/pjsip.conf": [
        "[e]\ntype=endpoint\nset_var={v}={s}\n",
        "[a]\ntype=auth\npassword={s}\n",
        "[r]\ntype=registration\nclient_uri=sip:u:{s}@h.example.com\n",
    ],
    "asterisk/sip.conf": [
        "[p]\nsetvar={v}={s}\n",
        "[general]\nregister => u:{s}@h.example.com/100\n",
        "[p]\nsecret={s}\n",
    ],
    "asterisk/iax.conf": ["[p]\nsecret={s}\n", "[general]\nregister => u:{s}@h.example.com\n"],
    "asterisk/confbridge.conf": ["[u]\ntype=user\npin={s}\n"],
    "asterisk/voicemail.conf": ["[default]\n1000 => {s},Name\n"],
    "asterisk/manager.conf": ["[m]\nsecret={s}\nsetvar={v}={s}\n"],
    "asterisk/res_odbc.conf": ["[o]\npassword => {s}\n"],
    "asterisk/phoneprov.conf": ["[p]\nsetvar => {v}={s}\n"],
    "asterisk/extensions.ael": [
        'globals {{\n  {v}="{s}";\n}};\n',
        "context c {{\n  1 => {{\n    Set({v}={s});\n  }};\n}};\n",
        "context c {{\n  1 => Authenticate({s});\n}};\n",
        "context c {{\n  1 => {{\n    MeetMe(1,,{s});\n  }};\n}};\n",
    ],
    "asterisk/extensions.lua": [
        '{v} = "{s}"\n',
        'extensions = {{ c = {{ ["1"] = function() app.authenticate("{s}") end; }}; }}\n',
        'extensions = {{ c = {{ ["1"] = function() channel.{v} = "{s}" end; }}; }}\n',
        'cfg = {{ password = "{s}" }}\n',
    ],
    "freepbx.conf": [
        "<?php\n$amp_conf['{f}'] = '{s}';\n",
        "<?php\n$amp_conf['{f}'] =\n    '{s}';\n",
        "<?php\n$amp_conf['{f}'] = <<<EOT\n{s}\nEOT;\n",
        "<?php\ndefine('{v}', \"{s}\");\n",
        "<?php\n$cfg = array('{v}' => '{s}');\n",
    ],
    "amportal.conf": ["{f}={s}\n", "{v}='{s}'\n", 'X_CMD="mysqldump -p{s} x"\n'],
}
SLOTS = [(path, form) for path, forms_ in POSITIONS.items() for form in forms_]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from(range(len(SLOTS))), SECRET, VARIABLE, FREEPBX_KEY, PARAM),
        min_size=12,
        max_size=40,
    )
)
def test_property_no_planted_secret_survives(picks: list[tuple[int, str, str, str, str]]) -> None:
    """Random tokens in every secret position of a generated tree: none is sent, in any form."""
    secrets: list[str] = []
    files: dict[str, list[str]] = {}
    for i, (slot, secret, var, fkey, param) in enumerate(picks):
        path, form = SLOTS[slot]
        token = f"{secret}{i:02d}"
        files.setdefault(path, []).append(form.format(s=token, v=var, f=fkey, p=param))
        secrets.append(token)
    # Every slot at least once over the run: the first picks walk the table.
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        (base / "etc" / "asterisk").mkdir(parents=True)
        for path, parts in files.items():
            text = "".join(parts)
            if path in ("freepbx.conf",):
                text = "<?php\n" + "".join(p.removeprefix("<?php\n") for p in parts)
            (base / "etc" / path).write_text(text)
        bodies, texts, _ = run_snapshot(base)
        assert len(texts) == len(files)
        assert leaks(secrets, bodies, texts) == []


def test_every_position_is_planted_once() -> None:
    """The property test's table: one pass over every slot leaks nothing either."""
    picks = []
    for i, (path, form) in enumerate(SLOTS):
        text = form.format(s=f"ZxSlot{i:03d}Q7", v="__DB_PASS", f="AMPDBPASS", p="token")
        picks.append((path, text))
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        (base / "etc" / "asterisk").mkdir(parents=True)
        grouped: dict[str, str] = {}
        for path, text in picks:
            if path == "freepbx.conf":
                text = text.removeprefix("<?php\n") if path in grouped else text
            grouped[path] = grouped.get(path, "") + text
        for path, text in grouped.items():
            (base / "etc" / path).write_text(text)
        bodies, texts, _ = run_snapshot(base)
        secrets = [f"ZxSlot{i:03d}Q7" for i in range(len(SLOTS))]
        assert leaks(secrets, bodies, texts) == []
