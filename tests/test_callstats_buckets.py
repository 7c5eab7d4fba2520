"""Bucket counters: peak concurrency, folding, closing, revisions, refusals, directions."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.collectors.callstats.aggregate import Aggregator, Bucket, fold, render
from agent.collectors.callstats.collector import CallstatsCollector
from agent.collectors.callstats.directions import Classifier
from agent.collectors.callstats.settings import CallstatsSettings
from tests.fixtures.cdr.cdrgen import Call, csv_bytes, make_calls
from tests.support.callstats import OPEN, Clock, Sink

BUCKET = 300
T0 = 1_790_000_000 - 1_790_000_000 % 86400  # a midnight UTC, on a bucket boundary


def make(tmp_path: Path, clock: Clock, **kw: Any) -> CallstatsCollector:
    s = CallstatsSettings(csv=tmp_path / "Master.csv", settle=60, max_age=30 * 86400, **kw)
    c = CallstatsCollector(s, tmp_path / "state", clock=clock)
    OPEN.append(c)
    return c


def call(start: int, duration: int, **kw: Any) -> Call:
    base: dict[str, Any] = {
        "billsec": max(duration - 5, 0),
        "disposition": "ANSWERED",
        "direction": "inbound",
        "trunk": "provider-a",
        "ext": "1001",
        "number": "5550000",
    }
    base.update(kw)
    return Call(start=start, duration=duration, **base)


def append(tmp_path: Path, calls: list[Call], seq0: int = 1) -> None:
    with (tmp_path / "Master.csv").open("ab") as f:
        f.write(csv_bytes(calls, seq0=seq0))


def test_peak_counts_calls_carried_in_and_ends_are_exclusive() -> None:
    """Peak: calls running from earlier buckets count; a call ending as another starts does not."""
    agg = Aggregator(BUCKET, lambda start: None)

    def add(s: int, e: int) -> None:
        agg.add(s, e, e - s, 0, "ANSWERED", "inbound", None, "00", 0)

    add(T0 + 10, T0 + 700)  # spans three buckets
    add(T0 + 100, T0 + 200)
    add(T0 + 200, T0 + 250)  # starts when the previous one ends
    add(T0 + 320, T0 + 330)
    assert agg.buckets[T0].peak() == 2
    assert agg.buckets[T0 + 300].peak() == 2  # carried call + the one at 320
    assert agg.buckets[T0 + 300].calls == 1
    assert agg.buckets[T0 + 600].peak() == 1 and agg.buckets[T0 + 600].calls == 0


def test_zero_length_calls_count_for_one_second() -> None:
    """Calls of 0 seconds at the same instant are simultaneous (each occupies its start second)."""
    agg = Aggregator(BUCKET, lambda start: None)
    for _ in range(3):
        agg.add(T0 + 5, T0 + 5, 0, 0, "FAILED", "outbound", "provider-a", "00", 0)
    assert agg.buckets[T0].peak() == 3


def test_bucket_state_round_trips() -> None:
    """What is stored is what is loaded: state survives a restart exactly."""
    agg = Aggregator(BUCKET, lambda start: None)
    agg.add(T0 + 5, T0 + 900, 895, 880, "ANSWERED", "inbound", "provider-a", "07", 0)
    for b in agg.buckets.values():
        again = Bucket.from_state(b.start, b.to_state())
        assert again.to_state() == b.to_state() and again.peak() == b.peak()


@given(st.dictionaries(st.sampled_from("abcdefgh"), st.integers(0, 20)), st.integers(1, 6))
def test_fold_leaves_no_small_count(counts: dict[str, int], k: int) -> None:
    """After folding, every count is at least min_count, and the total is kept when it is >= k."""
    out = fold(counts, k)
    assert all(v >= k for v in out.values())
    total = sum(counts.values())
    assert sum(out.values()) == (total if total >= k else 0)


def test_single_call_cannot_be_picked_out() -> None:
    """A bucket of one call has no counters; a lone trunk or answered call is folded away."""
    lone = Bucket(T0)
    lone.duration, lone.billsec = 4242, 4200
    lone.combos[("inbound", "provider-a", "ANSWERED", "10")] = 1
    body = render(lone, bucket_seconds=BUCKET, revision=0, min_count=3)
    assert body["folded"] is True
    assert set(body) == {
        "schema",
        "bucket_start",
        "bucket_seconds",
        "revision",
        "min_count",
        "folded",
    }
    agg = Aggregator(BUCKET, lambda start: None)
    for i in range(9):
        agg.add(T0 + i, T0 + i + 30, 30, 0, "NO ANSWER", "inbound", "provider-a", "00", 0)
    agg.add(T0 + 50, T0 + 4292, 4242, 4200, "ANSWERED", "outbound", "rare-trunk", "00", 0)
    body = render(agg.buckets[T0], bucket_seconds=BUCKET, revision=0, min_count=3)
    assert body["calls"] == 10
    assert body["by_trunk"] == {"other": 10}
    assert body["by_direction"] == {"other": 10}
    assert body["answered"] is None and body["billsec_sum"] is None and body["acd"] is None
    assert 4200 not in body.values()


def test_bucket_closes_after_settle_then_late_rows_make_a_complete_revision(tmp_path: Path) -> None:
    """Sent once closed; a late row yields revision 1 with complete counters, not a delta."""
    clock = Clock(T0 + 100)
    c = make(tmp_path, clock)
    sink = Sink()
    append(tmp_path, [call(T0 + i * 10, 20) for i in range(5)])
    asyncio.run(c.collect(sink, reason="schedule"))
    assert sink.bodies == []  # still open
    clock.now = T0 + BUCKET + 59
    asyncio.run(c.collect(sink, reason="schedule"))
    assert sink.bodies == []  # settling
    clock.now = T0 + BUCKET + 60
    asyncio.run(c.collect(sink, reason="schedule"))
    assert [(b["revision"], b["calls"]) for b in sink.bodies] == [(0, 5)]
    asyncio.run(c.collect(sink, reason="schedule"))
    assert len(sink.bodies) == 1  # never offered twice
    append(tmp_path, [call(T0 + 200, 30)], seq0=100)
    clock.now += 30
    asyncio.run(c.collect(sink, reason="schedule"))
    assert [(b["revision"], b["calls"]) for b in sink.bodies] == [(0, 5), (1, 6)]
    assert c.status()["last_bucket_sent"]["revision"] == 1


def test_revision_survives_restart(tmp_path: Path) -> None:
    """After a restart a late row for a sent bucket still gives the next revision number."""
    clock = Clock(T0 + BUCKET + 61)
    c = make(tmp_path, clock)
    sink = Sink()
    append(tmp_path, [call(T0 + i, 20) for i in range(4)])
    asyncio.run(c.collect(sink, reason="schedule"))
    asyncio.run(c.aclose())
    OPEN.remove(c)
    append(tmp_path, [call(T0 + 50, 20)], seq0=100)
    c2 = make(tmp_path, clock)
    asyncio.run(c2.collect(sink, reason="schedule"))
    assert [(b["revision"], b["calls"]) for b in sink.bodies] == [(0, 4), (1, 5)]


def test_refused_bucket_is_never_offered_again(tmp_path: Path) -> None:
    """Switch off (emit False): the bucket is done for good; late rows do not resurrect it."""
    clock = Clock(T0 + BUCKET + 61)
    c = make(tmp_path, clock)
    sink = Sink()
    sink.approve = False
    append(tmp_path, [call(T0 + i, 20) for i in range(4)])
    asyncio.run(c.collect(sink, reason="schedule"))
    assert len(sink.bodies) == 1
    sink.approve = True
    append(tmp_path, [call(T0 + 60, 20)], seq0=100)
    asyncio.run(c.collect(sink, reason="schedule"))
    asyncio.run(c.aclose())
    OPEN.remove(c)
    append(tmp_path, [call(T0 + 70, 20)], seq0=200)
    c2 = make(tmp_path, clock)
    asyncio.run(c2.collect(sink, reason="schedule"))
    assert len(sink.bodies) == 1
    assert c2.status()["rows_skipped"] == {"bucket_refused": 2}
    assert c2.status()["buckets_refused"] == 1


def test_backlog_does_not_close_buckets_ahead_of_the_data(tmp_path: Path) -> None:
    """Reading a backlog chunk by chunk, a bucket closes only once the data has moved past it."""
    calls = make_calls(400, start=T0, span=4 * 3600, seed=11)
    (tmp_path / "Master.csv").write_bytes(csv_bytes(calls))
    clock = Clock(T0 + 86400)
    # settle longer than the longest call: every row of a bucket is in before it closes.
    s = CallstatsSettings(csv=tmp_path / "Master.csv", settle=1200, max_age=30 * 86400)
    c = CallstatsCollector(s, tmp_path / "state", clock=clock, read_chunk=2000)
    OPEN.append(c)
    sink = Sink()
    asyncio.run(c.collect(sink, reason="schedule"))
    assert all(b["revision"] == 0 for b in sink.bodies)  # nothing closed early, then revised
    assert len({b["bucket_start"] for b in sink.bodies}) == len(sink.bodies)


@pytest.mark.parametrize(
    ("dcontext", "channel", "dstchannel", "want"),
    [
        (
            "from-trunk",
            "PJSIP/provider-a-0000001a",
            "PJSIP/1001-0000001b",
            ("inbound", "provider-a"),
        ),
        ("from-pstn", "SIP/voipms-00000001", "SIP/1001-00000002", ("inbound", "voipms")),
        ("from-trunk", "SIP/192.0.2.7-00000001", "PJSIP/1001-0000001b", ("inbound", "other")),
        (
            "from-internal",
            "PJSIP/1001-0000001a",
            "PJSIP/provider-b-0000001b",
            ("outbound", "provider-b"),
        ),
        ("from-internal", "PJSIP/1001-0000001a", "PJSIP/1002-0000001b", ("internal", None)),
        ("from-internal", "PJSIP/1001-0000001a", "SIP/+15551234567-0000001b", ("internal", None)),
        ("ext-local", "Local/1001@from-internal-00000001;2", "", ("internal", None)),
    ],
)
def test_freepbx_default_directions(
    dcontext: str, channel: str, dstchannel: str, want: tuple[str, str | None]
) -> None:
    """The FreePBX defaults: from-trunk inbound, to a named trunk outbound, else internal."""
    assert Classifier(CallstatsSettings()).classify(dcontext, channel, dstchannel) == want


def test_routes_are_shared_and_make_each_bucket_key_once() -> None:
    """Calls that went the same way share one route; its keys are built once, unknown
    dispositions count as other and neither they nor odd hours are kept."""
    c = Classifier(CallstatsSettings())
    r = c.route("from-trunk", "PJSIP/provider-a-00000001", "PJSIP/1001-00000002")
    assert c.route("from-trunk", "PJSIP/provider-a-0000000f", "PJSIP/1002-00000003") is r
    assert (r.direction, r.trunk) == ("inbound", "provider-a")
    k = r.key("ANSWERED", "10")
    assert k == ("inbound", "provider-a", "ANSWERED", "10") and r.key("ANSWERED", "10") is k
    assert r.keys == {"ANSWERED": {"10": k}}
    assert r.key("Bob Smith +15551234", "10") == ("inbound", "provider-a", "other", "10")
    assert r.key("ANSWERED", "99") == ("inbound", "provider-a", "ANSWERED", "99")
    assert r.keys == {"ANSWERED": {"10": k}}


def test_explicit_trunk_list_limits_names() -> None:
    """With a trunk list configured, no other channel name can appear as a trunk."""
    c = Classifier(CallstatsSettings(trunks=("provider-a",)))
    assert c.classify("from-trunk", "PJSIP/alice-00000001", "") == ("inbound", "other")
    assert c.classify("from-trunk", "PJSIP/provider-a-00000001", "") == ("inbound", "provider-a")


def test_now_is_used_for_closing_when_source_is_quiet(tmp_path: Path) -> None:
    """With no new rows, the clock alone closes a bucket (a quiet PBX still reports)."""
    clock = Clock(T0 + 10)
    c = make(tmp_path, clock)
    sink = Sink()
    append(tmp_path, [call(T0 + i, 5) for i in range(3)])
    asyncio.run(c.collect(sink, reason="schedule"))
    clock.now = T0 + 2 * BUCKET + 60
    asyncio.run(c.collect(sink, reason="schedule"))
    assert [b["calls"] for b in sink.bodies] == [3]
