"""Snapshot parts: never over 256 KiB as the gate serialises them, and they put back together.

The packer is driven with generated manifests (entries of every size up to
the collector's caps, texts from empty to several MiB, compressible or not,
any Unicode) and every part is serialised exactly as the gate does; the
collector is driven through a real gate, refusing a part half-way.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.collectors.pbxconfig import parts, snapshot
from agent.collectors.pbxconfig.collector import SnapshotCollector
from agent.collectors.pbxconfig.settings import SnapshotSettings
from agent.config import PolicyConfig
from agent.errors import IncompleteSnapshot
from agent.policy.classes import Record
from agent.policy.gate import Gate
from agent.policy.wire import decode_body

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "pbx"


def wire(body: dict[str, Any]) -> int:
    """Bytes of a body as the gate serialises it."""
    return len(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def pack(files: list[tuple[str, str | None]], removed: list[str], mode: str = "full") -> list[Any]:
    """Run the packer over (path, text or None for a skipped entry) and removed paths."""
    p = parts.Packer(snapshot_id="1-abc", mode=mode, base="0-base", taken_at="2026-01-01T00:00:00Z")
    out: list[dict[str, Any]] = []
    entries = []
    for path, text in sorted(files, key=lambda f: f[0].encode()):
        if text is None:
            entry = {"path": path, "status": "skipped", "reason": "too-large", "size": 1}
        else:
            digest = hashlib.sha256(text.encode()).hexdigest()
            entry = {"path": path, "status": "ok", "size": len(text), "digest": f"sha256:{digest}"}
        entries.append(entry)
        p.entry(parts.canonical(entry))
        if text is not None:
            p.content(path, text)
        out.extend(p.take())
    for path in removed:
        p.removed_path(path)
        out.extend(p.take())
    digest = parts.manifest_digest(entries)
    p.finish({"entries": len(entries), "manifest_digest": digest, "problems": []})
    out.extend(p.take())
    return out


TEXT = st.one_of(
    st.text(max_size=300),
    st.text(alphabet="abc=\n;[]", min_size=1000, max_size=200_000),  # compressible
    st.binary(min_size=0, max_size=90_000).map(lambda b: b.hex()),  # hex: hardly compresses
    st.binary(min_size=0, max_size=60_000).map(lambda b: b.decode("latin-1")),  # 2-byte UTF-8
)
PATH = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\0"),
    min_size=1,
    max_size=120,
).map(lambda s: "/etc/asterisk/" + s)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    files=st.dictionaries(PATH, st.one_of(st.none(), TEXT), max_size=40),
    removed=st.lists(PATH, max_size=20, unique=True),
    small=st.booleans(),
)
def test_every_part_fits_and_reassembles(
    files: dict[str, str | None], removed: list[str], small: bool
) -> None:
    """Any manifest, any texts: each part ≤ the limit as serialised; reassembly gives them back."""
    limit = 4096 if small else parts.MAX_BODY
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(parts, "MAX_BODY", limit)
        if small:
            mp.setattr(parts, "MIN_CHUNK_ROOM", 512)
            mp.setattr(parts, "GROUP_MAX_RAW", 1024)
        bodies = pack(list(files.items()), removed, mode="delta")
    assert all(wire(b) <= limit for b in bodies), [wire(b) for b in bodies]
    assert [b["part"] for b in bodies] == list(range(1, len(bodies) + 1))
    random.Random(len(bodies)).shuffle(bodies)
    whole = parts.reassemble(bodies)
    assert whole.texts == {p: t for p, t in files.items() if t is not None}
    assert [e["path"] for e in whole.entries] == sorted(files, key=lambda p: p.encode())
    assert whole.removed == removed


def test_a_big_incompressible_file_travels_in_chunks_under_the_limit() -> None:
    """A 3 MiB file that zlib hardly shrinks: split over parts, none over 256 KiB, not skipped."""
    text = base64.b64encode(os.urandom(3 * 1024 * 1024 * 3 // 4)).decode()
    bodies = pack([("/etc/asterisk/big.conf", text), ("/etc/asterisk/a.conf", "x=1\n")], [])
    assert len(bodies) >= 12
    assert max(wire(b) for b in bodies) <= parts.MAX_BODY
    assert sum(1 for b in bodies if "chunk" in b) >= 12
    assert parts.reassemble(bodies).texts["/etc/asterisk/big.conf"] == text


def test_reassembly_refuses_what_does_not_add_up() -> None:
    """A missing part, a missing last part or altered content is named, not accepted."""
    text = os.urandom(600_000).hex()
    bodies = pack([("/etc/asterisk/big.conf", text), ("/etc/asterisk/b.conf", "y=2\n")], [])
    assert len(bodies) > 3
    with pytest.raises(IncompleteSnapshot, match=r"parts missing: \[2\]"):
        parts.reassemble([b for b in bodies if b["part"] != 2])
    with pytest.raises(IncompleteSnapshot, match="last part"):
        parts.reassemble(bodies[:-1])
    tampered = json.loads(json.dumps(bodies))
    last = tampered[-1]
    last["summary"]["manifest_digest"] = "sha256:" + "0" * 64
    with pytest.raises(IncompleteSnapshot, match="manifest_digest"):
        parts.reassemble(tampered)


# -- the collector through a real gate ------------------------------------------------


def big_tree(base: Path, files: int) -> Path:
    """The sample PBX plus ``files`` generated files that do not compress well."""
    shutil.copytree(FIXTURES, base, dirs_exist_ok=True)
    etc = base / "etc" / "asterisk"
    rng = random.Random(9)
    for i in range(files):
        sub = etc / f"gen{i % 7}"
        sub.mkdir(exist_ok=True)
        secret = "".join(rng.choice("0123456789abcdef") for _ in range(16))
        noise = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(2000))
        (sub / f"f{i:04d}.conf").write_text(f"[e{i}]\nsecret={secret}\nnote={noise}\n")
    (etc / "huge_dialplan.conf").write_text(
        "".join(f"exten => {i},1,NoOp({rng.random()})\n" for i in range(40_000))
    )
    return etc


class GateSink:
    """The real gate in front of a list; refuses every part from ``refuse_at`` on."""

    def __init__(self, refuse_at: int | None = None) -> None:
        self.on = True
        self.gate = Gate(policy=PolicyConfig(), switch_on=lambda: self.on, last_seq=0)
        self.refuse_at = refuse_at
        self.bodies: list[dict[str, Any]] = []
        self.sizes: list[int] = []
        self.offered = 0

    def __call__(self, record: Record) -> bool:
        self.offered += 1
        self.on = self.refuse_at is None or self.offered < self.refuse_at
        try:
            envelope = self.gate.approve(record)
        except Exception:
            return False
        self.sizes.append(len(envelope.payload))
        self.bodies.append(decode_body(json.loads(envelope.payload)))
        return True


def test_envelopes_from_a_real_gate_stay_under_256_kib(tmp_path: Path) -> None:
    """600 hard-to-compress files and a 1 MiB dialplan: every envelope ≤ 262,144 bytes."""
    etc = big_tree(tmp_path, 600)
    sink = GateSink()
    s = SnapshotSettings(roots=(etc,), exclude=(), max_file=4 * 1024 * 1024)
    asyncio.run(SnapshotCollector(s, tmp_path / "state").collect(sink, reason="command"))
    assert len(sink.sizes) >= 5
    assert max(sink.sizes) <= parts.MAX_ENVELOPE
    whole = parts.reassemble(sink.bodies)
    assert str(etc / "huge_dialplan.conf") in whole.texts
    assert any("chunk" in b for b in sink.bodies)


def test_a_part_refused_half_way_leaves_the_last_sent_snapshot_as_it_was(tmp_path: Path) -> None:
    """The switch goes off at part 3: nothing is remembered; the next run sends it all again."""
    etc = big_tree(tmp_path, 300)
    s = SnapshotSettings(roots=(etc,), exclude=())
    state = tmp_path / "state"
    first = GateSink()
    c = SnapshotCollector(s, state)
    asyncio.run(c.collect(first, reason="schedule"))
    base = parts.reassemble(first.bodies)
    (etc / "gen0" / "f0000.conf").write_text("[changed]\nx=1\n")
    (etc / "gen1" / "f0001.conf").unlink()
    for i in range(150):  # a delta of several parts
        (etc / "gen2" / f"new{i}.conf").write_text(os.urandom(3000).hex())
    half = GateSink(refuse_at=3)
    asyncio.run(c.collect(half, reason="schedule"))
    assert len(half.bodies) == 2 and half.offered == 3
    assert c.status()["refused"] == 1 and c.status()["last_snapshot"] == base.snapshot
    db = snapshot.Store(state / snapshot.STATE_DB, readonly=True)
    assert db.meta()["snapshot_id"] == base.snapshot
    db.close()
    with pytest.raises(IncompleteSnapshot):
        parts.reassemble(half.bodies)  # what the NOC got of it is incomplete: discarded
    again = GateSink()
    asyncio.run(c.collect(again, reason="schedule"))
    delta = parts.reassemble(
        again.bodies, base_manifest={e["path"]: e for e in base.entries}
    )  # verifies manifest_digest against base + delta
    assert delta.mode == "delta" and delta.base == base.snapshot
    assert delta.removed == [str(etc / "gen1" / "f0001.conf")]
    assert str(etc / "gen0" / "f0000.conf") in delta.texts
    assert sum(1 for p in delta.texts if "/new" in p) == 150
    assert asyncio.run(_quiet(c)) == []


async def _quiet(c: SnapshotCollector) -> list[dict[str, Any]]:
    sink = GateSink()
    await c.collect(sink, reason="schedule")
    return sink.bodies


# VmHWM, not ru_maxrss: the latter keeps the parent's RSS across fork and exec.
_RSS_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
import structlog, logging
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
from agent.collectors.pbxconfig.collector import SnapshotCollector
from agent.collectors.pbxconfig.settings import SnapshotSettings
from agent.config import PolicyConfig
from agent.policy.gate import Gate
largest = 0
count = 0
if sys.argv[1] == "scan":
    gate = Gate(policy=PolicyConfig(), switch_on=lambda: True, last_seq=0)
    def emit(record):
        global largest, count
        largest = max(largest, len(gate.approve(record).payload))
        count += 1
        return True
    root = Path(sys.argv[2])
    s = SnapshotSettings(roots=(root / "etc",), exclude=())
    asyncio.run(SnapshotCollector(s, root / "state").collect(emit, reason="command"))
status = Path("/proc/self/status").read_text()
peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"peak": peak, "largest": largest, "envelopes": count}))
"""


def _peak(*args: str) -> dict[str, int]:
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    result: dict[str, int] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def test_memory_stays_flat_on_a_big_tree(tmp_path: Path) -> None:
    """20,000 small files: peak RSS within 24 MiB of a bare process with the same imports.

    Before streaming, a tree's files, manifest and bodies were all held at once:
    about 2.7 KiB per file, 52 MiB over the bare process for this tree.
    """
    etc = tmp_path / "etc"
    for i in range(20_000):
        if i % 500 == 0:
            folder = etc / f"d{i // 500:02d}"
            folder.mkdir(parents=True)
        (folder / f"f{i:05d}.conf").write_text(f"[ext{i}]\ntype=endpoint\nsecret=s{i:08x}\n")
    bare = _peak("bare")
    got = _peak("scan", str(tmp_path))
    assert got["envelopes"] >= 2 and got["largest"] <= parts.MAX_ENVELOPE
    growth = (got["peak"] - bare["peak"]) / 2**20
    assert growth < 24, f"peak RSS grew by {growth:.1f} MiB over the bare process"
