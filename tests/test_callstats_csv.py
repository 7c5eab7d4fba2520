"""The cdr_csv source: exact format, appends, rotation, truncation, restarts, bad rows."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.collectors.callstats.aggregate import Aggregator, Loader
from agent.collectors.callstats.cdr import DateParser
from agent.collectors.callstats.collector import CallstatsCollector
from agent.collectors.callstats.csv_source import ingest_chunk
from agent.collectors.callstats.directions import Classifier
from agent.collectors.callstats.settings import CallstatsSettings
from agent.collectors.callstats.store import STATE_FILE, CallstatsStore
from agent.errors import CollectorError, StateError
from tests.fixtures.cdr.cdrgen import (
    Call,
    csv_bytes,
    fields,
    line,
    make_calls,
    recount,
    stored_counters,
)
from tests.support.callstats import OPEN, Sink

BUCKET = 300
NOW = int(time.time())
T0 = NOW - 6 * 3600 - NOW % BUCKET  # six hours ago, on a bucket boundary


def collector(csv: Path, state: Path, **kw: Any) -> CallstatsCollector:
    chunk = kw.pop("read_chunk", 1 << 20)
    clock = kw.pop("clock", time.time)
    c = CallstatsCollector(CallstatsSettings(csv=csv, **kw), state, clock=clock, read_chunk=chunk)
    OPEN.append(c)
    return c


def run(c: CallstatsCollector, sink: Sink) -> None:
    asyncio.run(c.collect(sink, reason="schedule"))


def check(state: Path, calls: list[Call]) -> None:
    got = stored_counters(state / STATE_FILE)
    want = recount(calls, BUCKET)
    assert got == want


def test_line_matches_cdr_csv_quoting() -> None:
    """The fixture writer quotes like build_csv_record: strings quoted, "" inside, ints bare."""
    c = Call(
        start=T0,
        duration=65,
        billsec=60,
        disposition="ANSWERED",
        direction="inbound",
        trunk="provider-a",
        ext="1001",
        number="5551234",
        name='Bob "B" Smith, Jr',
    )
    text = line(fields(c, 1)).decode()
    assert text.endswith('"DOCUMENTATION","",""\n')
    assert '"""Bob ""B"" Smith, Jr"" <5551234>"' in text
    assert ',65,60,"ANSWERED",' in text
    no_answer = Call(
        start=T0,
        duration=5,
        billsec=0,
        disposition="NO ANSWER",
        direction="internal",
        trunk=None,
        ext="1001",
        number="x",
    )
    assert '",,"' in line(fields(no_answer, 1)).decode()  # unset answer time: empty, unquoted


@pytest.mark.parametrize("columns", [16, 17, 18])
def test_counts_equal_recount(tmp_path: Path, columns: int) -> None:
    """With or without uniqueid/userfield, the counters equal a plain recount of the rows."""
    calls = make_calls(600, start=T0, span=3 * 3600, seed=columns)
    csv = tmp_path / "Master.csv"
    csv.write_bytes(csv_bytes(calls, columns=columns))
    sink = Sink()
    c = collector(csv, tmp_path / "state")
    run(c, sink)
    check(tmp_path / "state", calls)
    assert c.status()["rows_read"] == 600
    assert c.status()["rows_skipped"] == {}
    assert (
        sum(b.get("calls", 0) for b in sink.bodies if not b["folded"])
        + sum(
            stored_counters(tmp_path / "state" / STATE_FILE)[_start(b)]["calls"]
            for b in sink.bodies
            if b["folded"]
        )
        == 600
    )


def _start(body: dict[str, Any]) -> int:
    import calendar

    return calendar.timegm(time.strptime(body["bucket_start"], "%Y-%m-%dT%H:%M:%SZ"))


def test_appends_while_running_and_partial_last_line(tmp_path: Path) -> None:
    """Rows appended between polls are counted once; a half-written line waits for its end."""
    calls = make_calls(300, start=T0, span=3 * 3600, seed=2)
    data = csv_bytes(calls)
    csv = tmp_path / "Master.csv"
    c = collector(csv, tmp_path / "state", read_chunk=4096)
    sink = Sink()
    cut_points = sorted({0, len(data) // 5, len(data) // 2 + 7, len(data) - 3, len(data)})
    csv.write_bytes(b"")
    for a, b in itertools.pairwise(cut_points):
        with csv.open("ab") as f:
            f.write(data[a:b])
        run(c, sink)
    check(tmp_path / "state", calls)
    assert c.status()["rows_skipped"] == {}


def test_rotation_by_rename_while_running(tmp_path: Path) -> None:
    """logrotate's rename: the old file is read to its end, then the new one from its start."""
    calls = make_calls(400, start=T0, span=3 * 3600, seed=3)
    first, late_old, new = calls[:150], calls[150:200], calls[200:]
    csv = tmp_path / "Master.csv"
    csv.write_bytes(csv_bytes(first))
    c = collector(csv, tmp_path / "state", read_chunk=2048)
    sink = Sink()
    run(c, sink)
    with csv.open("ab") as f:  # written after our last read, before rotation
        f.write(csv_bytes(late_old, seq0=1000))
    csv.rename(tmp_path / "Master.csv.1")
    csv.write_bytes(csv_bytes(new, seq0=5000))
    run(c, sink)
    check(tmp_path / "state", calls)
    assert c.status()["rotations"] == 1


def test_rotation_while_stopped_finds_old_file_by_inode(tmp_path: Path) -> None:
    """Restarted after a rotation, the collector finishes Master.csv.1 before the new file."""
    calls = make_calls(400, start=T0, span=3 * 3600, seed=4)
    csv = tmp_path / "Master.csv"
    csv.write_bytes(csv_bytes(calls[:100]))
    c = collector(csv, tmp_path / "state")
    run(c, Sink())
    asyncio.run(c.aclose())
    OPEN.remove(c)
    with csv.open("ab") as f:
        f.write(csv_bytes(calls[100:180], seq0=1000))
    csv.rename(tmp_path / "Master.csv.1")
    csv.write_bytes(csv_bytes(calls[180:], seq0=5000))
    c2 = collector(csv, tmp_path / "state")
    run(c2, Sink())
    check(tmp_path / "state", calls)


def test_copytruncate_is_detected(tmp_path: Path) -> None:
    """copytruncate: the file shrinks (or is refilled past the old offset) and is reread from 0."""
    calls = make_calls(300, start=T0, span=3 * 3600, seed=5)
    a, b, d = calls[:100], calls[100:130], calls[130:]
    csv = tmp_path / "Master.csv"
    csv.write_bytes(csv_bytes(a))
    c = collector(csv, tmp_path / "state")
    run(c, Sink())
    with csv.open("r+b") as f:  # truncated, then a few rows: smaller than the old offset
        f.truncate(0)
        f.write(csv_bytes(b, seq0=3000))
    run(c, Sink())
    with csv.open("r+b") as f:  # truncated, then refilled past the old offset
        f.truncate(0)
        f.write(csv_bytes(d, seq0=7000))
    run(c, Sink())
    check(tmp_path / "state", calls)
    assert c.status()["truncations"] == 2


def test_restart_mid_file(tmp_path: Path) -> None:
    """A new collector on the same state continues at the checkpoint: no double, no gap."""
    calls = make_calls(500, start=T0, span=3 * 3600, seed=6)
    csv = tmp_path / "Master.csv"
    data = csv_bytes(calls)
    csv.write_bytes(data[: len(data) // 2 + 11])  # ends in the middle of a line
    c = collector(csv, tmp_path / "state", read_chunk=1500)
    run(c, Sink())
    asyncio.run(c.aclose())
    OPEN.remove(c)
    with csv.open("ab") as f:
        f.write(data[len(data) // 2 + 11 :])
    c2 = collector(csv, tmp_path / "state", read_chunk=1500)
    run(c2, Sink())
    check(tmp_path / "state", calls)


_KILL_SCRIPT = """
import asyncio, sys, time
from pathlib import Path
from agent.collectors.callstats.collector import CallstatsCollector
from agent.collectors.callstats.settings import CallstatsSettings
c = CallstatsCollector(CallstatsSettings(csv=Path(sys.argv[1])), Path(sys.argv[2]),
                       read_chunk=600)
async def main():
    while True:
        await c.collect(lambda r: True, reason="schedule")
asyncio.run(main())
"""


def test_kill_9_mid_file(tmp_path: Path) -> None:
    """A collector killed with SIGKILL mid-file resumes without double counting or gaps."""
    calls = make_calls(3000, start=T0, span=5 * 3600, seed=7)
    csv = tmp_path / "Master.csv"
    csv.write_bytes(csv_bytes(calls))
    state = tmp_path / "state"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(csv), str(state)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        offset = 0
        while time.monotonic() < deadline and offset < 20_000:
            if (state / STATE_FILE).exists():
                try:
                    store = CallstatsStore(state / STATE_FILE, readonly=True)
                    cp = store.get_meta("checkpoint") or {}
                    store.close()
                    offset = int(cp.get("offset", 0))
                except StateError:  # the child may be creating the file right now
                    pass
            time.sleep(0.01)
        assert 0 < offset < len(csv.read_bytes()), "the child did not stop mid-file"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    c = collector(csv, state)
    run(c, Sink())
    check(state, calls)


def test_bad_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    """Wrong column count, bad date or number, non-UTF-8, negative duration: counted, not fatal."""
    calls = make_calls(50, start=T0, span=3600, seed=8)
    good = csv_bytes(calls)
    bad_date = line(fields(calls[0], 1)).replace(b'"' + _year(calls[0]), b'"20x6', 1)
    negative = line(fields(calls[0], 1)).replace(
        b",%d,%d," % (calls[0].duration, calls[0].billsec), b",-5,0,"
    )
    bad_number = line(fields(calls[0], 1)).replace(
        b",%d,%d," % (calls[0].duration, calls[0].billsec), b",x,0,"
    )
    junk = [
        b'"only","three","columns"\n',
        bad_date,
        negative,
        bad_number,
        b'"\xff\xfe","a"\n',
        b"\n",
    ]
    csv = tmp_path / "Master.csv"
    csv.write_bytes(good[: len(good) // 2] + b"".join(junk) + good[len(good) // 2 :])
    c = collector(csv, tmp_path / "state")
    run(c, Sink())
    check(tmp_path / "state", calls)
    st = c.status()
    assert st["rows_skipped"] == {
        "wrong_column_count": 2,
        "bad_date": 1,
        "negative_duration": 1,
        "bad_number": 1,
        "non_utf8": 1,
    }
    assert st["rows_read"] == 56


def _year(c: Call) -> bytes:
    return time.strftime("%Y", time.localtime(c.start)).encode()


def test_missing_source_is_reported_and_retried(tmp_path: Path) -> None:
    """No Master.csv: collect raises CollectorError, status says so; once it appears, it is read."""
    csv = tmp_path / "cdr-csv" / "Master.csv"
    c = collector(csv, tmp_path / "state")
    with pytest.raises(CollectorError, match="CDR file not found"):
        run(c, Sink())
    assert "not found" in (c.status()["source_error"] or "")
    calls = make_calls(40, start=T0, span=3600, seed=9)
    csv.parent.mkdir()
    csv.write_bytes(csv_bytes(calls))
    run(c, Sink())
    assert c.status()["source_error"] is None
    check(tmp_path / "state", calls)


def test_unreadable_source_is_reported(tmp_path: Path) -> None:
    """A CDR file the agent may not read is an actionable CollectorError, not a crash."""
    if os.geteuid() == 0:
        pytest.skip("root reads any file; permission errors cannot be produced as root")
    csv = tmp_path / "Master.csv"
    csv.write_bytes(b"")
    csv.chmod(0)
    c = collector(csv, tmp_path / "state")
    with pytest.raises(CollectorError, match="permission denied"):
        run(c, Sink())


@dataclass
class _Both:
    """The same calls counted by ingest_chunk (fast) and by Aggregator.add row by row (slow)."""

    fast: Aggregator
    slow: Aggregator
    rows: int
    skipped: dict[str, int]
    not_counted: int  # calls add() refused

    def assert_same(self) -> None:
        assert self.fast.buckets.keys() == self.slow.buckets.keys()
        for start, b in self.fast.buckets.items():
            s = self.slow.buckets[start]
            assert b.to_state() == s.to_state()
            assert b.carry == s.carry
            assert b.peak() == s.peak()


def _count_both(calls: list[Call], size: int = BUCKET, loader: Loader | None = None) -> _Both:
    loader = loader or (lambda start: None)
    settings = CallstatsSettings(csv=Path("Master.csv"))
    fast = Aggregator(size, loader)
    skipped: dict[str, int] = {}
    rows, _ = ingest_chunk(
        csv_bytes(calls),
        fast,
        Classifier(settings),
        DateParser(utc=False),
        cutoff=0,
        skipped=skipped,
    )
    slow = Aggregator(size, loader)
    classify = Classifier(settings)
    not_counted = 0
    for seq, c in enumerate(calls, 1):
        f = fields(c, seq)
        direction, trunk = classify.classify(str(f[3]), str(f[5]), str(f[6]))
        hour = time.strftime("%H", time.localtime(c.start))
        if not slow.add(
            c.start, c.end, c.duration, c.billsec, c.disposition, direction, trunk, hour, 0
        ):
            not_counted += 1
    return _Both(fast, slow, rows, skipped, not_counted)


def test_hot_loop_equals_aggregator_add_row_by_row() -> None:
    """ingest_chunk's inlined counting leaves exactly the bucket state Aggregator.add leaves."""
    calls = make_calls(800, start=T0, span=2 * 3600, seed=11)
    # Zero-length calls, calls ending on a bucket boundary and calls spanning many buckets.
    calls += [
        Call(T0 + 7, 0, 0, "FAILED", "outbound", "provider-a", "1001", "5551"),
        Call(T0 + 20, BUCKET - 20, 250, "ANSWERED", "inbound", "provider-b", "1002", "5552"),
        Call(T0 + 40, 5 * BUCKET, 1400, "ANSWERED", "internal", None, "1003", "5553"),
    ]
    both = _count_both(calls)
    assert both.rows == len(calls) and both.skipped == {}
    both.assert_same()


@pytest.mark.parametrize("size", [60, 300, 43200, 86400])
def test_hot_loop_equals_aggregator_add_at_bucket_edges(size: int) -> None:
    """Calls ending on, just before and just after one and two bucket ends count as add() does."""
    rnd = random.Random(size)
    t0 = T0 - T0 % 86400
    calls: list[Call] = []
    for _ in range(600):
        b0 = t0 + size * rnd.randrange(4)
        start = b0 + rnd.choice((0, 1, size // 2, size - 1, rnd.randrange(size)))
        edge = b0 + size * rnd.choice((1, 2)) + rnd.choice((-1, 0, 1))
        end = rnd.choice((edge, start, start + 1, start + 86400, start + 86401, edge + 5))
        duration = max(end - start, 0)
        calls.append(
            Call(start, duration, duration // 2, "ANSWERED", "inbound", "provider-a", "1001", "5")
        )
    rnd.shuffle(calls)  # late rows too: buckets ahead are often in memory already
    both = _count_both(calls, size)
    assert both.rows == len(calls)
    both.assert_same()


def test_hot_loop_equals_aggregator_add_with_refused_buckets() -> None:
    """A refused bucket counts nothing, yet its long calls still carry into later buckets."""
    rnd = random.Random(5)
    refused = {T0 + BUCKET, T0 + 3 * BUCKET}
    durations = (0, 30, 290, 310, 700)
    calls = [
        Call(
            T0 + rnd.randrange(5 * BUCKET),
            rnd.choice(durations),
            0,
            "ANSWERED",
            "inbound",
            "provider-a",
            "1001",
            "5",
        )
        for _ in range(400)
    ]
    both = _count_both(calls, loader=lambda start: False if start in refused else None)
    assert both.rows == len(calls) and both.not_counted > 0
    assert both.skipped == {"bucket_refused": both.not_counted}
    assert not both.fast.buckets.keys() & refused
    assert any(b.carry for b in both.fast.buckets.values())
    both.assert_same()


def test_date_parser_agrees_with_mktime_and_refuses_malformed_times() -> None:
    """Every second of a day (DST included where the zone has it) and the leap second parse
    as mktime does; anything not exactly ``%Y-%m-%d %T`` is a ValueError."""
    parse = DateParser(utc=False)
    rnd = random.Random(3)
    for t in [T0 + rnd.randrange(400 * 86400) - 200 * 86400 for _ in range(5000)]:
        s = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
        assert parse(s) == int(time.mktime(time.strptime(s, "%Y-%m-%d %H:%M:%S")))
    assert parse("2026-05-01 10:05:60") == parse("2026-05-01 10:06:00")
    utc = DateParser(utc=True)
    assert utc("1970-01-01 00:00:00") == 0 and utc("2026-05-01 10:05:07") == 1777629907
    for bad in (
        "2026-05-01 10:60:00",
        "2026-05-01 10:05:61",
        "2026-02-30 10:00:00",
        "2026-13-01 10:00:00",
        "2026-05-01 24:00:00",
        "2026-05-01 1:05:07",
        "2026-05-01T10:05:07",
        "2026-05-01 10:05:07 ",
        "2026-05-01 10:05",
        "\u0662\u0660\u0662\u0666-05-01 10:05:07",  # Arabic-Indic digits: int() takes them
        "+026-05-01 10:05:07",
        "",
    ):
        with pytest.raises(ValueError, match=r"^not a %Y-%m-%d %H"):
            parse(bad)
