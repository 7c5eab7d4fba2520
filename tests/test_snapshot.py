"""Snapshots: full, delta and unchanged runs, state only after delivery, bad input, CLI, secrets."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.collectors.pbxconfig import parts, snapshot
from agent.collectors.pbxconfig.collector import SnapshotCollector
from agent.collectors.pbxconfig.settings import SnapshotSettings
from agent.collectors.pbxconfig.state import pack_text
from agent.policy.classes import DataClass, Record

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "pbx"
REPO = Path(__file__).resolve().parents[1]


class Tree:
    """A copy of the fixture PBX in a temporary folder, with its collector."""

    def __init__(self, base: Path) -> None:
        self.base = base
        shutil.copytree(FIXTURES, base, dirs_exist_ok=True, symlinks=True)
        self.etc = base / "etc" / "asterisk"
        self.spool = base / "var" / "spool" / "asterisk"
        self.state = base / "state"
        self.settings = SnapshotSettings(
            roots=(self.etc, base / "etc" / "freepbx.conf", base / "etc" / "amportal.conf"),
            exclude=(),
        )
        self.sent: list[dict[str, Any]] = []
        self.accept = True

    def collector(self, **changes: Any) -> SnapshotCollector:
        s = SnapshotSettings(**{**self.settings.__dict__, **changes})
        return SnapshotCollector(s, self.state, forbidden=[self.spool])

    def emit(self, record: Record) -> bool:
        assert record.data_class is DataClass.CONFIG
        json.dumps(record.body)  # must be JSON-serialisable
        if self.accept:
            self.sent.append(dict(record.body))
        return self.accept

    def run(self, c: SnapshotCollector, reason: str = "schedule") -> list[dict[str, Any]]:
        before = len(self.sent)
        asyncio.run(c.collect(self.emit, reason=reason))
        return self.sent[before:]


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path)


def contents(bodies: list[dict[str, Any]]) -> dict[str, str]:
    """Every text sent, snapshot after snapshot, each snapshot reassembled and verified."""
    out: dict[str, str] = {}
    ids = list(dict.fromkeys(b["snapshot"] for b in bodies))
    for sid in ids:
        out.update(parts.reassemble([b for b in bodies if b["snapshot"] == sid]).texts)
    return out


def summary(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary of a snapshot: it travels in the last part."""
    (last,) = [b for b in bodies if "parts" in b]
    result: dict[str, Any] = last["summary"]
    return result


def entries_of(bodies: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The manifest entries a snapshot's parts carry, by path."""
    return {e["path"]: e for b in bodies for e in b.get("manifest", [])}


def test_first_run_is_full_with_manifest_and_content(tree: Tree) -> None:
    """The first snapshot is full: every file in the manifest, content redacted."""
    bodies = tree.run(tree.collector())
    assert len(bodies) == 1 and bodies[0]["mode"] == "full"
    manifest = {e["path"]: e for e in bodies[0]["manifest"]}
    auth = str(tree.etc / "pjsip.auth.conf")
    assert manifest[auth]["status"] == "ok"
    assert manifest[auth]["digest"].startswith("sha256:")
    assert manifest[auth]["mode"] == "0644" or len(manifest[auth]["mode"]) == 4
    text = contents(bodies)[auth]
    assert "password=<redacted:secret-key:" in text and "Fx9!kTq2vLw8Rz" not in text
    assert summary(bodies)["rules"]["secret-key"] >= 5
    assert all(isinstance(v, int) for v in summary(bodies)["rules"].values())


def test_unchanged_tree_sends_nothing(tree: Tree) -> None:
    """A second scheduled run over the same files offers no record at all."""
    c = tree.collector()
    tree.run(c)
    assert tree.run(c) == []
    assert c.status()["last_mode"] == "unchanged"
    assert c.status()["files_read"] == 0  # nothing re-read: stamps matched the cache


def test_change_sends_only_that_file(tree: Tree) -> None:
    """Editing one file sends a delta with that file's entry and content only."""
    c = tree.collector()
    first = tree.run(c)
    path = tree.etc / "manager_custom.conf"
    path.write_text("; manager_custom.conf\n[ops]\nsecret = N3wOpsPw\n")
    bodies = tree.run(c)
    assert len(bodies) == 1 and bodies[0]["mode"] == "delta"
    assert bodies[0]["base"] == first[0]["snapshot"]
    assert [e["path"] for e in bodies[0]["manifest"]] == [str(path)]
    sent = contents(bodies)
    assert list(sent) == [str(path)] and "N3wOpsPw" not in sent[str(path)]


def test_secret_change_changes_the_fingerprint_only(tree: Tree) -> None:
    """A new password shows as a new marker; the NOC sees that, not the value."""
    c = tree.collector()
    tree.run(c)
    path = tree.etc / "manager_additional.conf"
    old = contents(tree.sent)[str(path)]
    path.write_text(path.read_text().replace("F0p2M4nagerKey", "Ch4ngedKey"))
    new = contents(tree.run(c))[str(path)]
    assert old != new and "Ch4ngedKey" not in new
    assert old.replace(old.split("secret = ")[1].split("\n")[0], "") == new.replace(
        new.split("secret = ")[1].split("\n")[0], ""
    )


def test_removed_file_is_listed(tree: Tree) -> None:
    """A deleted file appears in the delta's removed list."""
    c = tree.collector()
    tree.run(c)
    (tree.etc / "globals_custom.conf").unlink()
    bodies = tree.run(c)
    assert bodies[0]["removed"] == [str(tree.etc / "globals_custom.conf")]


def test_refused_snapshot_is_not_remembered(tree: Tree) -> None:
    """When the gate refuses, the next run sends the change again."""
    c = tree.collector()
    tree.run(c)
    (tree.etc / "extensions_custom.conf").write_text("; changed\n")
    tree.accept = False
    assert tree.run(c) == []
    assert c.status()["refused"] == 1
    tree.accept = True
    again = tree.run(c)
    assert [e["path"] for e in again[0]["manifest"]] == [str(tree.etc / "extensions_custom.conf")]


def test_command_sends_a_full_snapshot(tree: Tree) -> None:
    """The NOC's collect command gets a full snapshot even when nothing changed."""
    c = tree.collector()
    tree.run(c)
    bodies = tree.run(c, reason="command")
    assert bodies and bodies[0]["mode"] == "full"
    assert len(entries_of(bodies)) == summary(bodies)["entries"]


def test_weekly_full_snapshot(tree: Tree) -> None:
    """Once full_every has passed, a scheduled run is full again."""
    c = tree.collector()
    tree.run(c)
    db = snapshot.Store(tree.state / snapshot.STATE_DB)
    with db._tx() as conn:  # age the last full snapshot by eight days
        conn.execute("UPDATE meta SET v = ? WHERE k = 'full_at'", (str(1.0),))
    db.close()
    assert tree.run(c)[0]["mode"] == "full"


def test_state_survives_a_new_collector(tree: Tree) -> None:
    """A restarted agent (new collector object) knows what was sent."""
    tree.run(tree.collector())
    assert tree.run(tree.collector()) == []


def test_big_snapshot_is_split_into_parts(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot over the part limit is split; the parts reassemble into the whole."""
    monkeypatch.setattr(parts, "MAX_BODY", 3000)
    monkeypatch.setattr(parts, "GROUP_MAX_RAW", 1200)  # bigger files travel in chunks
    monkeypatch.setattr(parts, "MIN_CHUNK_ROOM", 256)
    bodies = tree.run(tree.collector())
    assert len(bodies) > 3
    assert {b["snapshot"] for b in bodies} == {bodies[0]["snapshot"]}
    assert [b["part"] for b in bodies] == list(range(1, len(bodies) + 1))
    assert [b.get("parts") for b in bodies] == [None] * (len(bodies) - 1) + [len(bodies)]
    sizes = [len(json.dumps(b, separators=(",", ":"), ensure_ascii=False).encode()) for b in bodies]
    assert max(sizes) <= 3000
    assert any("chunk" in b for b in bodies) and any("content" in b for b in bodies)
    whole = parts.reassemble(reversed(bodies))  # in any order
    ok = {p for p, e in entries_of(bodies).items() if e["status"] == "ok"}
    assert set(whole.texts) == ok
    assert whole.summary["entries"] == len(entries_of(bodies)) == whole.summary["changed"]
    assert whole.texts == contents(tree.run(tree.collector(), reason="command"))


def test_key_file_is_private_and_stable(tree: Tree) -> None:
    """The fingerprint key is 32 bytes, mode 0600, made once and never sent."""
    c = tree.collector()
    bodies = tree.run(c)
    key_path = tree.state / snapshot.KEY_FILE
    key = key_path.read_bytes()
    assert len(key) == 32 and stat.S_IMODE(key_path.stat().st_mode) == 0o600
    tree.run(tree.collector(), reason="command")
    assert key_path.read_bytes() == key
    wire = json.dumps(tree.sent)
    assert key.hex() not in wire and base64.b64encode(key).decode() not in wire
    assert bodies


def test_bad_input_is_reported_never_fatal(tree: Tree) -> None:
    """Too large, undecodable, binary, FIFO, broken include and loop: reported, run goes on."""
    (tree.etc / "huge.conf").write_text("x=1\n" * 400_000)
    (tree.etc / "latin1.conf").write_bytes(b"[a]\nname=Caf\xe9\nsecret=S\xe9cret1\n")
    (tree.etc / "blob.conf").write_bytes(b"\x00\x01binary")
    os.mkfifo(tree.etc / "pipe.conf")
    (tree.etc / "broken.conf").write_text("#include nosuch.conf\n")
    (tree.etc / "loop_a.conf").write_text("#include loop_b.conf\n")
    (tree.etc / "loop_b.conf").write_text("#include loop_a.conf\n")
    c = tree.collector(max_file=1024 * 1024)
    bodies = tree.run(c)
    manifest = entries_of(bodies)
    assert manifest[str(tree.etc / "huge.conf")]["reason"] == "too-large"
    assert manifest[str(tree.etc / "blob.conf")]["reason"] == "binary"
    assert manifest[str(tree.etc / "pipe.conf")]["reason"] == "not-regular"
    latin = manifest[str(tree.etc / "latin1.conf")]
    assert latin["status"] == "ok" and "undecodable" in latin["problems"][0]
    text = contents(bodies)[str(tree.etc / "latin1.conf")]
    assert "Caf\ufffd" in text and "cret1" not in text
    problems = " | ".join(p["problem"] for p in summary(bodies)["problems"])
    assert "nosuch.conf: no such file" in problems
    assert "include loop" in problems
    status = c.status()
    assert status["skipped"]["too-large"] == 1 and status["problems"] >= 3
    assert status["last_error"]


def test_total_cap_skips_the_rest(tree: Tree) -> None:
    """Past max_total, further files are skipped with reason total-cap."""
    c = tree.collector(max_total=2000)
    bodies = tree.run(c)
    reasons = [e.get("reason") for e in bodies[0]["manifest"]]
    assert "total-cap" in reasons
    assert c.status()["skipped"]["total-cap"] >= 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_reported(tree: Tree) -> None:
    """A file the agent may not read is reported as unreadable."""
    p = tree.etc / "secretive.conf"
    p.write_text("[a]\n")
    p.chmod(0)
    bodies = tree.run(tree.collector())
    manifest = {e["path"]: e for e in bodies[0]["manifest"]}
    assert manifest[str(p)]["reason"] == "unreadable"


def _write_config(tree: Tree) -> Path:
    cfg = tree.base / "agent.yaml"
    roots = [str(r) for r in tree.settings.roots]
    never = [str(tree.spool)]
    cfg.write_text(
        "device_id: pbx-test-1\n"
        f"paths: {{state_dir: {tree.state}, runtime_dir: /tmp/pbxagent-rt}}\n"
        f"collectors:\n  config: {{roots: {json.dumps(roots)}, exclude: [], "
        f"never_read: {json.dumps(never)}}}\n"
    )
    return cfg


def _agentctl(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "-c", str(cfg), "snapshot", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_cli_dry_run_prints_what_would_be_sent_and_changes_nothing(tree: Tree) -> None:
    """'agentctl snapshot --dry-run' shows bodies and decoded content; state is untouched."""
    cfg = _write_config(tree)
    c = tree.collector()
    tree.run(c)
    db = tree.state / snapshot.STATE_DB
    before = {p.name: p.read_bytes() for p in tree.state.iterdir() if p.is_file()}
    (tree.etc / "extensions_custom.conf").write_text("; changed\n[x]\nsecret = Cl1Pw\n")
    r = _agentctl(cfg, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "delta snapshot" in r.stdout
    assert "decoded content of " + str(tree.etc / "extensions_custom.conf") in r.stdout
    assert "Cl1Pw" not in r.stdout
    body = json.loads(r.stdout.split("bytes)\n", 1)[1].split("\n", 1)[0])
    assert body["mode"] == "delta"
    after = {p.name: p.read_bytes() for p in tree.state.iterdir() if p.is_file()}
    assert after.keys() == before.keys() and after[db.name] == before[db.name]
    # the daemon's next run still sees the change: the CLI did not mark it sent
    assert tree.run(c)[0]["mode"] == "delta"


def test_cli_diff_shows_changes_since_last_sent(tree: Tree) -> None:
    """'agentctl snapshot --diff' lists changed files with a diff of the redacted text."""
    cfg = _write_config(tree)
    tree.run(tree.collector())
    p = tree.etc / "http.conf"
    p.write_text(p.read_text().replace("bindport=8088", "bindport=8089"))
    r = _agentctl(cfg, "--diff")
    assert r.returncode == 0, r.stderr
    assert f"changed  {p}" in r.stdout
    assert "-bindport=8088" in r.stdout and "+bindport=8089" in r.stdout


def test_cli_without_state_uses_a_throwaway_key(tree: Tree) -> None:
    """Before the daemon ever ran, --dry-run works and says markers are provisional."""
    cfg = _write_config(tree)
    r = _agentctl(cfg, "--dry-run", "--no-content")
    assert r.returncode == 0, r.stderr
    assert "full snapshot" in r.stdout and "throwaway key" in r.stderr
    assert not (tree.state / snapshot.KEY_FILE).exists()


# -- property test: no generated secret leaves, in any form -------------------------

SECRET = st.text(
    alphabet="ABCDEFGHJKMNPQRSTUVWXYZabcdefghjkmnpqrstuvwxyz23456789!#%&*+-_.",
    min_size=8,
    max_size=24,
).map(lambda s: f"Zx{s}Q7")
# (the fixed ends keep a shrunk secret from being a word of the envelope, e.g. "taken_at")
FORMS = [
    "[peer]\nsecret = {s}\n",
    "[peer]\nmd5secret={s}\n",
    "[auth]\ntype=auth\npassword={s}\n",
    "[w]\noutbound_auth/password = {s}\n",
    "[general]\nregister => user1:{s}@sip.example.com/100\n",
    "[authentication]\nauth = bob:{s}@realm.example\n",
    "[ctx]\nexten => 1,1,Dial(IAX2/bob:{s}@host.example/1)\n",
    "[db]\ndsn = mysql://u:{s}@db.local/x\n",
    "[admin]\n;secret={s}\n",
    "[g]\nTRUNK_PASS = {s}\n",
    "[g]\npassword {s}\n",
    "[g]\nsecret = a;-- c --;{s}\n",
]
VM_FORM = "[default]\n1000 => {s},Name {s},{s}@mail.example\n"
PHP_FORM = "<?php\n$amp_conf['AMPDBPASS'] = '{s}';\n"
SHELL_FORM = "AMPMGRPASS={s}\n"


def _escape(s: str) -> str:
    return s.replace(";", "\\;")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(secrets_=st.lists(SECRET, min_size=len(FORMS) + 3, max_size=len(FORMS) + 3, unique=True))
def test_property_no_secret_in_any_envelope(secrets_: list[str]) -> None:
    """Random secrets in every supported form: no bytes, base64 or hex of them are sent."""
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        etc = base / "etc" / "asterisk"
        etc.mkdir(parents=True)
        for i, form in enumerate(FORMS):
            (etc / f"f{i}.conf").write_text(form.format(s=_escape(secrets_[i])))
        n = len(FORMS)
        (etc / "voicemail.conf").write_text(VM_FORM.format(s=secrets_[n]))
        (base / "etc" / "freepbx.conf").write_text(PHP_FORM.format(s=secrets_[n + 1]))
        (base / "etc" / "amportal.conf").write_text(SHELL_FORM.format(s=secrets_[n + 2]))
        s = SnapshotSettings(
            roots=(etc, base / "etc" / "freepbx.conf", base / "etc" / "amportal.conf"),
            exclude=(),
        )
        got: list[dict[str, Any]] = []
        c = SnapshotCollector(s, base / "state")

        def emit(r: Record) -> bool:
            got.append(dict(r.body))
            return True

        asyncio.run(c.collect(emit, reason="command"))
        assert got
        wire = json.dumps(got)
        decoded = json.dumps(contents(got))
        for secret in secrets_:
            raw = secret.encode()
            for form in (secret, base64.b64encode(raw).decode(), raw.hex()):
                assert form not in wire, f"{form!r} in an envelope"
                assert form not in decoded, f"{form!r} in decoded content"


def test_logs_never_hold_a_secret(tree: Tree) -> None:
    """Nothing the collector logs, on success or refusal, holds a planted secret."""
    from structlog.testing import capture_logs

    c = tree.collector()
    with capture_logs() as logs:
        tree.run(c)
        (tree.etc / "manager_custom.conf").write_text("[x]\nsecret = L0gLeak\n")
        tree.accept = False
        tree.run(c)
    text = json.dumps(logs, default=str) + json.dumps(c.status(), default=str)
    assert logs  # the runs were logged
    for planted in ("L0gLeak", "Fx9!kTq2vLw8Rz", "aMgRp4ss2a7c1e", "8152"):
        assert planted not in text


def _ok_paths(bodies: list[dict[str, Any]]) -> set[str]:
    return {e["path"] for b in bodies for e in b.get("manifest", []) if e["status"] == "ok"}


def test_first_rescan_after_a_restart_reads_no_file(tree: Tree) -> None:
    """A new collector over an unchanged tree takes every result from the state file."""
    tree.run(tree.collector())
    c = tree.collector()
    assert tree.run(c) == []
    assert c.status()["files_read"] == 0 and c.status()["files_scanned"] > 10


def test_change_right_after_a_restart_is_sent(tree: Tree) -> None:
    """The cache read back after a restart still notices an edited file (stamp differs)."""
    tree.run(tree.collector())
    path = tree.etc / "globals_custom.conf"
    path.write_text(path.read_text() + "NEWVAR = 1\n")
    bodies = tree.run(tree.collector())
    assert [e["path"] for e in bodies[0]["manifest"]] == [str(path)]
    assert "NEWVAR = 1" in contents(bodies)[str(path)]


def test_forced_full_after_a_restart_takes_content_from_the_cache(tree: Tree) -> None:
    """A full snapshot right after a restart reads no file and sends the same texts."""
    first = contents(tree.run(tree.collector()))
    c = tree.collector()
    again = tree.run(c, reason="command")
    assert c.status()["files_read"] == 0
    assert contents(again) == first


def _age_cache_rows(tree: Tree, sql: str = "", args: tuple[Any, ...] = ()) -> None:
    """Make the state look written by the version before REDACTION_VERSION 2 (which kept
    no fingerprint of its last scan)."""
    db = snapshot.Store(tree.state / snapshot.STATE_DB)
    with db._tx() as conn:
        conn.execute("UPDATE cache SET key_id = substr(key_id, 1, 16)")
        conn.execute("DELETE FROM meta WHERE k IN ('fingerprint', 'scan_summary')")
        if sql:
            conn.execute(sql, args)
    db.close()


def test_upgrade_redacts_again_and_resends_nothing_unchanged(tree: Tree) -> None:
    """State from an older redaction version: every file is read again, nothing is resent."""
    first = tree.run(tree.collector())
    _age_cache_rows(tree)
    c = tree.collector()
    assert tree.run(c) == []
    assert c.status()["files_read"] == len(_ok_paths(first))
    assert tree.run(c) == [] and c.status()["files_read"] == 0  # and cached anew


def test_upgrade_replaces_what_an_older_version_got_wrong(tree: Tree) -> None:
    """A result cached (and sent) by an older version is redone; the corrected file is sent."""
    tree.run(tree.collector())
    path = str(tree.etc / "pjsip.auth.conf")
    bad = "password=Fx9!kTq2vLw8Rz\n"  # what a faulty older version might have cached and sent
    db = snapshot.Store(tree.state / snapshot.STATE_DB)
    row = json.loads(db._rows("SELECT entry FROM cache WHERE path = ?", (path,))[0][0])
    db.close()
    bad_entry = {**row, "digest": "sha256:0"}
    _age_cache_rows(
        tree,
        "UPDATE cache SET entry = ?, content = ? WHERE path = ?",
        (json.dumps(bad_entry), pack_text(bad), path),
    )
    db = snapshot.Store(tree.state / snapshot.STATE_DB)
    with db._tx() as conn:
        conn.execute("UPDATE sent SET entry = ? WHERE path = ?", (json.dumps(bad_entry), path))
    db.close()
    bodies = tree.run(tree.collector())
    assert [e["path"] for e in bodies[0]["manifest"]] == [path]
    assert "Fx9!kTq2vLw8Rz" not in contents(bodies)[path]


def test_damaged_cache_is_reported_with_the_way_out(tree: Tree) -> None:
    """A cache row that is not JSON stops the run with an error naming the file and the fix."""
    from agent.errors import CollectorError

    tree.run(tree.collector())
    db = snapshot.Store(tree.state / snapshot.STATE_DB)
    with db._tx() as conn:
        conn.execute("UPDATE cache SET fired = '{not json' WHERE rowid = 1")
    db.close()
    # A scheduled rescan of the unchanged tree reads no cache row; a full snapshot reads all.
    with pytest.raises(CollectorError, match=r"config-snapshot\.sqlite.*damaged.*remove the file"):
        tree.run(tree.collector(), reason="command")


def test_include_by_real_path_under_a_linked_root_resolves(tree: Tree) -> None:
    """With the root reached through a link, an #include of a file's real path is found."""
    link = tree.base / "etc-link"
    link.symlink_to(tree.etc)
    real_target = tree.etc.resolve() / "globals_custom.conf"
    (tree.etc / "uses_real.conf").write_text(f"[x]\n#include {real_target}\n")
    c = tree.collector(roots=(link,))
    bodies = tree.run(c)
    entry = {e["path"]: e for e in bodies[0]["manifest"]}[str(link / "uses_real.conf")]
    assert [i["status"] for i in entry["includes"]] == ["ok"]
    assert not [p for p in bodies[0]["summary"]["problems"] if "uses_real" in p["path"]]


def test_unchanged_rescan_writes_nothing_to_the_state(tree: Tree) -> None:
    """A rescan that finds nothing new neither reads files nor writes the state file."""
    c = tree.collector()
    tree.run(c)
    db = tree.state / snapshot.STATE_DB

    def stamps() -> list[tuple[int, int]]:
        out = []
        for p in (db, db.with_name(db.name + "-wal")):
            st = p.stat() if p.exists() else None
            out.append((st.st_size, st.st_mtime_ns) if st else (0, 0))
        return out

    before = stamps()
    assert tree.run(c) == [] and tree.run(c) == []
    assert stamps() == before
    assert c.status()["files_read"] == 0


def test_state_written_before_canonical_entries_is_migrated_not_resent(tree: Tree) -> None:
    """Entries stored by the previous version (json.dumps' default spelling): rewritten once,
    and an unchanged tree still sends nothing."""
    tree.run(tree.collector())
    db = snapshot.Store(tree.state / snapshot.STATE_DB)
    with db._tx() as conn:
        for table in ("cache", "sent"):
            rows = conn.execute(f"SELECT path, entry FROM {table}").fetchall()
            conn.executemany(
                f"UPDATE {table} SET entry = ? WHERE path = ?",
                [(json.dumps(json.loads(e)), p) for p, e in rows],
            )
        conn.execute("DELETE FROM meta WHERE k = 'entry_format'")
    db.close()
    assert tree.run(tree.collector()) == []
    db = snapshot.Store(tree.state / snapshot.STATE_DB, readonly=True)
    entries = [e for (e,) in db._rows("SELECT entry FROM sent")]
    db.close()
    assert entries and all(e == parts.canonical(json.loads(e)) for e in entries)


def test_quick_rescan_notices_links_and_skips_not_only_files(tree: Tree) -> None:
    """The walk's fingerprint covers links and skipped paths: adding either is a delta."""
    c = tree.collector()
    tree.run(c)
    assert tree.run(c) == []  # the quick path: nothing new
    (tree.etc / "alias.conf").symlink_to(tree.etc / "http.conf")
    os.mkfifo(tree.etc / "events.fifo")
    bodies = tree.run(c)
    assert bodies and bodies[0]["mode"] == "delta"
    got = entries_of(bodies)
    assert got[str(tree.etc / "alias.conf")]["status"] == "link"
    assert got[str(tree.etc / "events.fifo")]["reason"] == "not-regular"
    assert c.status()["files_read"] == 0  # no file's content changed
    assert tree.run(c) == []
