"""The stored bucket counters: compact format 2, migration from format 1, fast render."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.collectors.callstats.aggregate import STATE_FORMAT, Aggregator, Bucket, render
from agent.collectors.callstats.collector import CallstatsCollector
from agent.collectors.callstats.settings import CallstatsSettings
from agent.collectors.callstats.store import STATE_FILE, BucketStatus, CallstatsStore, Changed
from agent.errors import StateError
from tests.fixtures.cdr.cdrgen import csv_bytes, make_calls, recount, stored_counters
from tests.support.callstats import OPEN, Clock, Sink

BUCKET = 300
T0 = 1_790_000_000 - 1_790_000_000 % 86400  # a midnight UTC, on a bucket boundary

_combo = st.tuples(
    st.sampled_from(["inbound", "outbound", "internal", "other"]),
    st.one_of(st.none(), st.sampled_from(["provider-a", "sip-carrier", "ünï-trunk", 'q"t'])),
    st.sampled_from(["ANSWERED", "NO ANSWER", "BUSY", "other"]),
    st.sampled_from([f"{h:02d}" for h in range(24)]),
)


@st.composite
def buckets(draw: st.DrawFn) -> Bucket:
    """Any bucket the aggregator can build, including offsets and counts past int16."""
    b = Bucket(draw(st.integers(0, 2**32 // BUCKET)) * BUCKET)  # 1970 to 2106
    b.duration = draw(st.integers(0, 2**40))
    b.billsec = draw(st.integers(0, 2**40))
    b.carry = draw(st.integers(0, 10**6))
    b.combos = draw(st.dictionaries(_combo, st.integers(1, 10**6), max_size=30))
    wide = draw(st.booleans())
    b.deltas = draw(
        st.dictionaries(
            st.integers(0, 86399 if wide else 299),
            st.integers(-(10**5) if wide else -40, 10**5 if wide else 40),
            max_size=200,
        )
    )
    return b


@given(buckets())
def test_format_2_round_trips_exactly(b: Bucket) -> None:
    """decode(encode(b)) has the same counters and peak as b (zero deltas may be dropped)."""
    again = Bucket.decode(b.start, b.encode())
    assert again.to_state() == b.to_state()
    assert again.peak() == b.peak()
    assert (again.start, again.duration, again.billsec, again.carry) == (
        b.start,
        b.duration,
        b.billsec,
        b.carry,
    )


@given(buckets())
def test_format_1_text_still_decodes(b: Bucket) -> None:
    """The JSON an older agent stored (to_state) decodes to the same counters."""
    again = Bucket.decode(b.start, json.dumps(b.to_state()))
    assert again.to_state() == b.to_state() and again.peak() == b.peak()


def _fold_ref(counts: dict[str, int], k: int) -> dict[str, int]:
    kept = {c: v for c, v in counts.items() if v >= k and c != "other"}
    other = sum(counts.values()) - sum(kept.values())
    while 0 < other < k and kept:
        smallest = min(kept, key=lambda c: (kept[c], c))
        other += kept.pop(smallest)
    out = dict(sorted(kept.items()))
    if other >= k:
        out["other"] = other
    return out


def _render_ref(b: Bucket, revision: int, k: int) -> dict[str, Any]:
    """The body computed the plain way: per-dimension sums, strftime, a second-by-second peak."""
    s = b.to_state()
    body: dict[str, Any] = {
        "schema": "callstats/1",
        "bucket_start": dt.datetime.fromtimestamp(b.start, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "bucket_seconds": BUCKET,
        "revision": revision,
        "min_count": k,
        "folded": s["calls"] < k,
    }
    if s["calls"] < k:
        return body
    small = 0 < s["answered"] < k
    running = peak = b.carry
    for t in range(min(b.deltas, default=0), max(b.deltas, default=0) + 1):
        running += b.deltas.get(t, 0)
        peak = max(peak, running)
    body.update(
        calls=s["calls"],
        answered=None if small else s["answered"],
        duration_sum=b.duration,
        billsec_sum=None if small else b.billsec,
        asr=None if small else round(s["answered"] / s["calls"], 4),
        acd=None if small or not s["answered"] else round(b.billsec / s["answered"], 1),
        peak_concurrent=peak,
        by_direction=_fold_ref(s["dir"], k),
        by_disposition=_fold_ref(s["disp"], k),
        by_trunk=_fold_ref(s["trunk"], k),
        by_hour=_fold_ref(s["hour"], k),
    )
    return body


@settings(deadline=None)  # the reference scans up to a day second by second
@given(buckets(), st.integers(1, 6), st.integers(0, 5))
def test_render_equals_the_plain_computation(b: Bucket, k: int, revision: int) -> None:
    """The one-pass render gives exactly the body of the plain per-dimension computation."""
    got = render(b, bucket_seconds=BUCKET, revision=revision, min_count=k)
    assert got == _render_ref(b, revision, k)
    assert list(got) == list(_render_ref(b, revision, k))  # same key order too


def _collector(csv: Path, state: Path, clock: Clock) -> CallstatsCollector:
    s = CallstatsSettings(csv=csv, settle=60, max_age=3650 * 86400)
    c = CallstatsCollector(s, state, clock=clock, read_chunk=4096)
    OPEN.append(c)
    return c


def _downgrade_to_format_1(state_file: Path) -> int:
    """Rewrite the state file as an agent before format 2 left it; returns the buckets."""
    db = sqlite3.connect(state_file)
    try:
        rows = db.execute("SELECT start, state FROM buckets").fetchall()
        with db:
            for start, data in rows:
                old = json.dumps(Bucket.decode(start, data).to_state(), separators=(",", ":"))
                db.execute("UPDATE buckets SET state = ? WHERE start = ?", (old, start))
            db.execute("DELETE FROM meta WHERE key = 'state_format'")
    finally:
        db.close()
    return len(rows)


def test_upgrade_from_format_1_neither_skips_nor_double_counts(tmp_path: Path) -> None:
    """A format-1 state file (sent and open buckets) is migrated on open; no row lost or doubled."""
    calls = make_calls(1500, start=T0, span=4 * 3600, seed=21)
    data = csv_bytes(calls)
    cut = data.index(b"\n", len(data) // 2) + 1
    csv = tmp_path / "Master.csv"
    csv.write_bytes(data[:cut])
    clock = Clock(T0 + 2 * 3600)
    state = tmp_path / "state"
    sink = Sink()
    c = _collector(csv, state, clock)
    asyncio.run(c.collect(sink, reason="schedule"))
    asyncio.run(c.aclose())
    OPEN.remove(c)
    sent_before = len(sink.bodies)
    assert sent_before > 0
    with sqlite3.connect(state / STATE_FILE) as db:
        statuses = {s for (s,) in db.execute("SELECT status FROM buckets")}
    db.close()
    assert statuses == {"open", "sent"}  # both kinds are migrated
    migrated = _downgrade_to_format_1(state / STATE_FILE)
    assert migrated > 0

    # The old file reads as it is (agentctl may look before the daemon restarts).
    before = stored_counters(state / STATE_FILE)

    with csv.open("ab") as f:
        f.write(data[cut:])
    c2 = _collector(csv, state, clock)
    ro = CallstatsStore(state / STATE_FILE, readonly=True)
    try:
        assert ro.get_meta("state_format") == STATE_FORMAT
    finally:
        ro.close()
    with sqlite3.connect(state / STATE_FILE) as db:
        kinds = {type(s) for (s,) in db.execute("SELECT state FROM buckets")}
    db.close()
    assert kinds == {bytes}
    assert {k: v for k, v in stored_counters(state / STATE_FILE).items() if k in before} == before
    clock.now = T0 + 6 * 3600
    asyncio.run(c2.collect(sink, reason="schedule"))
    assert stored_counters(state / STATE_FILE) == recount(calls, BUCKET)

    # Offered the same as a collector that never stopped.
    ref = Sink()
    clock.now = T0 + 2 * 3600
    plain = tmp_path / "plain.csv"
    plain.write_bytes(data[:cut])
    r = _collector(plain, tmp_path / "ref", clock)
    asyncio.run(r.collect(ref, reason="schedule"))
    with plain.open("ab") as f:
        f.write(data[cut:])
    clock.now = T0 + 6 * 3600
    asyncio.run(r.collect(ref, reason="schedule"))
    assert len(sink.bodies) == len(ref.bodies)
    assert sink.final() == ref.final()


def test_newer_state_format_is_refused_with_the_file_named(tmp_path: Path) -> None:
    """A state file from a newer agent is not guessed at: StateError names the file."""
    path = tmp_path / STATE_FILE
    CallstatsStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'state_format'")
    db.close()
    with pytest.raises(StateError, match=str(path)):
        CallstatsStore(path)


def test_corrupt_counters_raise_state_error_naming_the_file(tmp_path: Path) -> None:
    """Garbage in the counters column is reported with the file, not as a bare ValueError."""
    path = tmp_path / STATE_FILE
    store = CallstatsStore(path)
    agg = Aggregator(BUCKET, lambda start: None)
    agg.add(T0 + 5, T0 + 50, 45, 40, "ANSWERED", "inbound", "provider-a", "00", 0)
    with store.transaction() as db:
        CallstatsStore.save_buckets(db, [Changed(agg.buckets[T0], BucketStatus.OPEN, -1)])
        db.execute("UPDATE buckets SET state = ? WHERE start = ?", (b"CS\x02h-garbage", T0))
    with pytest.raises(StateError, match=str(path)):
        store.bucket(T0)
    store.close()


def test_failed_commit_loses_nothing_and_never_reuses_a_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit failing after its offers loses no row, and no revision gets a second body."""
    calls = make_calls(600, start=T0, span=2 * 3600, seed=22)
    clock = Clock(T0 + 6 * 3600)
    ref = Sink()
    (tmp_path / "ref.csv").write_bytes(csv_bytes(calls))
    r = _collector(tmp_path / "ref.csv", tmp_path / "ref", clock)
    asyncio.run(r.collect(ref, reason="schedule"))

    csv = tmp_path / "Master.csv"
    csv.write_bytes(csv_bytes(calls))
    state = tmp_path / "state"
    sink = Sink()
    c = _collector(csv, state, clock)
    real = CallstatsStore.save_offered
    failures = [StateError(f"{state / STATE_FILE}: disk full (simulated)")] * 2

    def failing(*args: Any) -> None:
        # A mock: a full disk or an I/O error cannot be produced on demand here.
        if failures:
            raise failures.pop()
        real(*args)

    monkeypatch.setattr(CallstatsStore, "save_offered", staticmethod(failing))
    for _ in range(2):
        with pytest.raises(StateError, match="simulated"):
            asyncio.run(c.collect(sink, reason="schedule"))
    assert sink.bodies  # offers were made before the failing commits
    asyncio.run(c.collect(sink, reason="schedule"))
    assert stored_counters(state / STATE_FILE) == recount(calls, BUCKET)
    assert sink.bodies == ref.bodies
    ro = CallstatsStore(state / STATE_FILE, readonly=True)
    try:
        rows = ro.since(0)
    finally:
        ro.close()
    assert {r.status for r in rows} == {"sent"}
    final = sink.final()
    assert {(r.body or {}).get("bucket_start"): r.body for r in rows} == final
