"""Signed commands: only what a command key certified by the pinned root signed, for this box,
before it expires, runs; everything else is refused, replied and ledgered, and spends no id.

The handler runs on a real SQLite database (the rig of ``tests/test_commands.py``); keys are
made by the NOC's own code (``noc keys``), so the two sides are proven to agree.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.uplink.commands import CommandHandler
from agent.uplink.signing import CommandVerifier, canonical
from noc import signing as noc_signing
from noc.errors import CommandError, UsageError
from tests.support import signing
from tests.test_commands import DEVICE, MAX_AGE, NOW, FuzzRig, Rig, cmd

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """A handler on tmp_path/state that pins the test root."""
    r = Rig(tmp_path / "state")
    yield r
    r.conn.close()


@pytest.fixture(scope="module")
def prop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzRig]:
    """One handler shared by the property tests' examples."""
    r = FuzzRig(tmp_path_factory.mktemp("sig") / "state")
    yield r
    r.conn.close()


def sign(msg: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """``msg`` signed for DEVICE at NOW (keyword arguments as for signing.sign)."""
    kw.setdefault("now", NOW)
    return signing.sign(msg, kw.pop("device", DEVICE), **kw)


def by_hand(
    msg: dict[str, Any], key: noc_signing.CommandSigner, exp: float, device: str = DEVICE
) -> dict[str, Any]:
    """``msg`` signed with ``key`` directly, none of the NOC's checks: as a thief of the key
    (or of an expired one) would."""
    body = {**msg, "device": device, "exp": int(exp)}
    signature = key.key.sign(canonical(body))
    return {**body, "key": key.cert, "sig": base64.b64encode(signature).decode()}


def handle(rig: Rig, msg: dict[str, Any] | bytes, now: float = NOW) -> Any:
    """Hand a payload to the handler as it arrives; the reply."""
    payload = msg if isinstance(msg, bytes) else json.dumps(msg).encode()
    return rig.handler.handle(payload, now=now)


def refused_and_ledgered(rig: Rig, reply: Any, fragment: str) -> None:
    """An error reply naming ``fragment``, whose ledger entry says the same."""
    assert reply.ok is False, reply
    assert fragment in (reply.error or ""), reply.error
    last = rig.commands()[-1]
    assert last["ok"] is False and last["error"] == reply.error and last["id"] == reply.id


def other_root(tmp: Path) -> noc_signing.CommandSigner:
    """A command key certified by a root this box does not pin (a forger's own chain)."""
    key, _, _ = noc_signing.init_root(tmp / "forger")
    out = tmp / "forger-ck.json"
    root = noc_signing.load_root(key)
    noc_signing.issue_command_key(root, out, days=7, kid="test-ck", now=NOW - 86400)
    return noc_signing.CommandSigner.load(out)


# -- each refusal ----------------------------------------------------------------------------


def test_a_signed_command_runs(rig: Rig) -> None:
    """The NOC's signature, for this box, in time: accepted, and status names the key."""
    reply = handle(rig, sign(cmd("s1", "ping")))
    assert reply.ok, reply
    st_ = rig.handler.verifier.status()
    assert st_["accepting"] and st_["command_key"]["kid"] == "test-ck"
    assert st_["root_fingerprint"].startswith("SHA256:")


def test_unsigned_is_refused_and_spends_no_id(rig: Rig) -> None:
    """A command without a signature is refused; the same id, signed, then runs."""
    refused_and_ledgered(rig, handle(rig, cmd("u1", "ping")), "not signed")
    assert handle(rig, sign(cmd("u1", "ping"))).ok


def test_signed_by_a_key_the_root_did_not_certify(rig: Rig, tmp_path: Path) -> None:
    """A forger's own root and command key: refused as not chaining to the pinned root."""
    forged = sign(cmd("f1", "narrow", args={"class": "health"}), key=other_root(tmp_path))
    refused_and_ledgered(rig, handle(rig, forged), "not signed by the pinned vendor root")
    assert rig.host.gate.narrowed == set()


def test_a_real_key_certificate_with_a_forged_signature(rig: Rig, tmp_path: Path) -> None:
    """The genuine command key's certificate beside a forger's signature: does not verify."""
    genuine = sign(cmd("f2", "ping"))
    forged = sign(cmd("f2", "ping"), key=other_root(tmp_path))
    refused_and_ledgered(rig, handle(rig, {**forged, "key": genuine["key"]}), "does not verify")


def test_a_key_certificate_altered_to_extend_its_life(rig: Rig) -> None:
    """Moving the command key's expiry breaks the root's signature over it."""
    msg = sign(cmd("k1", "ping"))
    msg["key"] = {**msg["key"], "exp": msg["key"]["exp"] + 365 * 86400}
    refused_and_ledgered(rig, handle(rig, msg), "not signed by the pinned vendor root")


def test_for_another_device(rig: Rig) -> None:
    """A genuine command for another box is refused here (a broker cannot redirect it)."""
    refused_and_ledgered(
        rig, handle(rig, sign(cmd("d1", "ping"), device="pbx-test-2")), "not for this box"
    )


def test_expired_command(rig: Rig) -> None:
    """A command past its exp is refused, even when its ts is within command_max_age."""
    msg = by_hand(cmd("e1", "ping", ts=NOW - 10), signing.key_for(NOW), exp=NOW - 1)
    refused_and_ledgered(rig, handle(rig, msg), "command expired")


def test_expired_command_key(rig: Rig) -> None:
    """A command signed by a command key past its expiry is refused."""
    old = signing.signer_at(NOW - 3 * 86400, days=1, kid="old-ck")
    msg = by_hand(cmd("x1", "ping"), old, exp=NOW + 60)  # the NOC's signer would not
    refused_and_ledgered(rig, handle(rig, msg), "command key 'old-ck' expired at")


def test_replay_of_a_signed_command(rig: Rig) -> None:
    """The very same signed bytes twice: the second is a replay."""
    payload = json.dumps(sign(cmd("r1", "collect", args={"collector": "health"}))).encode()
    assert handle(rig, payload).ok
    refused_and_ledgered(rig, handle(rig, payload), "replay")
    assert rig.host.collected == ["health"]


def test_no_root_key_refuses_everything(tmp_path: Path) -> None:
    """With no root key pinned every command is refused, and status says why; installing the
    key makes the next command run without a restart."""
    r = Rig(tmp_path / "s")
    try:
        pinned = tmp_path / "vendor-root.pub"
        r.handler = CommandHandler(
            conn=r.conn,
            ledger=r.ledger,
            host=r.host,
            max_age=MAX_AGE,
            switch_word=lambda: "on",
            verifier=CommandVerifier(pinned, DEVICE),
        )
        refused_and_ledgered(r, handle(r, sign(cmd("n1", "ping"))), "commands are refused")
        status = r.handler.verifier.status()
        assert status["accepting"] is False and str(pinned) in status["problem"]
        pinned.write_bytes(signing.root_pub().read_bytes())
        assert handle(r, sign(cmd("n2", "ping"))).ok
    finally:
        r.conn.close()


def test_a_rotated_command_key_is_accepted_and_the_old_refused_after_its_expiry(
    rig: Rig,
) -> None:
    """The root certifies a new command key: both work while the old one lasts, then only the
    new one. Nothing changed on the box."""
    old = signing.signer_at(NOW - 86400, days=2, kid="ck-old")
    new = signing.signer_at(NOW - 60, days=30, kid="ck-new")
    assert handle(rig, sign(cmd("o1", "ping"), key=old)).ok
    assert handle(rig, sign(cmd("n1", "ping"), key=new)).ok
    later = old.expires + 10
    stale = by_hand(cmd("o2", "ping", ts=later), old, exp=later + 60)
    refused_and_ledgered(rig, handle(rig, stale, later), "command key 'ck-old' expired at")
    assert handle(rig, sign(cmd("n2", "ping", ts=later), key=new, now=later), later).ok
    assert rig.handler.verifier.status()["command_key"]["kid"] == "ck-new"


# -- properties ------------------------------------------------------------------------------


_MSGS = st.fixed_dictionaries(
    {
        "id": st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=24),
        "cmd": st.sampled_from(["ping", "policy", "narrow", "collect"]),
        "args": st.sampled_from([{}, {"class": "config"}, {"collector": "health"}]),
    }
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=_MSGS, bit=st.integers(min_value=0), salt=st.integers(0, 10**9))
def test_one_bit_altered_anywhere_is_refused(
    prop: FuzzRig, msg: dict[str, Any], bit: int, salt: int
) -> None:
    """Flip any one bit of a signed command: never accepted (refused, replied, ledgered)."""
    body = {"v": 1, "id": f"{msg['id']}-{salt}", "ts": NOW, "cmd": msg["cmd"], "args": msg["args"]}
    payload = bytearray(json.dumps(sign(body)).encode())
    i = bit % (len(payload) * 8)
    payload[i // 8] ^= 1 << (i % 8)
    before = prop.count()
    reply = prop.handler.handle(bytes(payload), now=NOW)
    assert prop.count() == before + 1
    if reply.ok:
        # A flip that leaves the same JSON value (e.g. a letter's case in an escape such as
        # \u00e9 → \u00E9) is the same command: allowed only if it means exactly that.
        assert json.loads(bytes(payload)) == json.loads(json.dumps(sign(body)).encode())
    else:
        assert reply.error


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    msg=_MSGS,
    fault=st.sampled_from(["device", "expired", "key-expired", "forged-field", "replay"]),
    salt=st.integers(0, 10**9),
)
def test_faulty_signed_commands_are_refused(
    prop: FuzzRig, msg: dict[str, Any], fault: str, salt: int
) -> None:
    """Cross-device, expired, by an expired key, a field changed after signing, or replayed:
    refused with a reply and one ledger entry, and nothing narrowed."""
    cid = f"{msg['id']}-{fault}-{salt}"
    body = {"v": 1, "id": cid, "ts": NOW, "cmd": msg["cmd"], "args": msg["args"]}
    now = NOW
    if fault == "device":
        signed = sign(body, device=f"other-{msg['id']}")
    elif fault == "expired":
        signed = sign(body, now=NOW - signing.LIFETIME - 5)
    elif fault == "key-expired":
        signed = by_hand(body, signing.signer_at(NOW - 3 * 86400, days=1, kid="old-ck"), NOW + 60)
    elif fault == "forged-field":
        signed = {**sign(body), "cmd": "narrow", "args": {"class": "health"}}
    else:
        first = sign({**body, "cmd": "ping", "args": {}})
        assert prop.handler.handle(json.dumps(first).encode(), now=now).ok
        signed = first
    before = prop.count()
    narrowed = set(prop.host.gate.narrowed)
    reply = prop.handler.handle(json.dumps(signed).encode(), now=now)
    assert reply.ok is False and reply.error
    assert prop.count() == before + 1
    assert prop.host.gate.narrowed == narrowed


# -- the NOC's side --------------------------------------------------------------------------


def test_noc_keys_cli(tmp_path: Path) -> None:
    """init-root writes a 0600 private and a public key and refuses to replace them;
    issue-command-key writes a 0600 key file that signs commands this box accepts."""
    run = [sys.executable, "-m", "noc", "keys"]
    out = subprocess.run(
        [*run, "init-root", "--out", str(tmp_path / "root")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    key, pub = tmp_path / "root" / "vendor-root.key", tmp_path / "root" / "vendor-root.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "SHA256:" in out.stdout
    again = subprocess.run(
        [*run, "init-root", "--out", str(tmp_path / "root")], capture_output=True, text=True
    )
    assert again.returncode == 64 and "already exists" in again.stderr
    ck = tmp_path / "ck.json"
    out = subprocess.run(
        [*run, "issue-command-key", "--root", str(key), "--out", str(ck), "--days", "2"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(ck.stat().st_mode) == 0o600
    signer = noc_signing.CommandSigner.load(ck)
    verifier = CommandVerifier(pub, DEVICE)
    msg = signer.sign({"v": 1, "id": "cli", "ts": int(time.time()), "cmd": "ping"}, DEVICE,
                      lifetime=60)  # fmt: skip
    assert verifier.check(msg, time.time()).kid == signer.cert["kid"]
    shown = subprocess.run([*run, "show", str(ck)], capture_output=True, text=True)
    assert shown.returncode == 0 and signer.cert["kid"] in shown.stdout


def test_encrypted_root_needs_its_passphrase(tmp_path: Path) -> None:
    """A root written with a passphrase cannot be used without it."""
    key, _, _ = noc_signing.init_root(tmp_path / "r", passphrase=b"correct horse")
    with pytest.raises(UsageError, match="not a usable root key"):
        noc_signing.load_root(key)
    assert noc_signing.load_root(key, b"correct horse") is not None
    assert b"ENCRYPTED" in key.read_bytes()


def test_noc_refuses_to_sign_with_an_expired_key(tmp_path: Path) -> None:
    """The NOC says so instead of sending commands every box would refuse."""
    old = signing.signer_at(NOW - 3 * 86400, days=1, kid="old-ck")
    with pytest.raises(CommandError, match="expired"):
        old.sign({"v": 1, "id": "x", "ts": NOW, "cmd": "ping"}, DEVICE, lifetime=60, now=NOW)
    with pytest.raises(CommandError, match="issue-command-key"):
        noc_signing.CommandSigner.load(tmp_path / "missing.json")
    assert os.path.exists(signing.command_key_file())


def test_a_signature_in_another_base64_spelling_is_refused(prop: FuzzRig) -> None:
    """The last base64 character of a 64-byte signature carries 4 unused bits: setting one
    gives another text for the same bytes. Found by the one-bit property test: such a
    command was accepted though its bytes differ from what was signed."""
    for where in ("command", "key"):
        msg = sign({"v": 1, "id": f"b64-{where}", "ts": NOW, "cmd": "ping", "args": {}})
        holder = msg if where == "command" else msg["key"]
        text = holder["sig"]
        assert text.endswith("==")
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        last = alphabet.index(text[-3])
        holder["sig"] = text[:-3] + alphabet[last ^ 1] + "=="
        assert base64.b64decode(holder["sig"]) == base64.b64decode(text)
        before = prop.count()
        reply = prop.handler.handle(json.dumps(msg).encode(), now=NOW)
        assert not reply.ok and "canonical base64" in (reply.error or "")
        assert prop.count() == before + 1
