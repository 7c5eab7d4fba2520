"""Call-statistics benchmarks, run by hand; they print figures, they do not assert.

1. CSV ingest rate of the collector (parse, classify, count, commit), next to a
   bare ``csv.reader`` pass over the same file in the same run.
2. Memory as the file grows: RSS after the first million rows and after all
   ``--big`` rows (default 10 million), appended while the collector follows
   the file.
3. Backlog after a daemon start (issue 17): the real daemon started on a
   ``--backlog``-row file (default 300,000), seconds from spawn until status
   counts every row, beside a bare ``csv.reader`` pass over the same file in
   the same run. Floor: the daemon at least 0.35 of the bare pass's rate.
4. MariaDB: incremental read of 1 million rows from a FreePBX ``cdr`` table on
   the local server (root without password, as on the test machines).

    PYTHONPATH=. python bench/bench_callstats.py [--rows 1000000] [--days 20]
        [--big 10000000] [--skip-memory] [--skip-mariadb]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

import agent.collectors.callstats.collector as collector_module
from agent.collectors.callstats.collector import CallstatsCollector
from agent.collectors.callstats.settings import CallstatsSettings
from agent.policy.classes import Record

TRUNKS = ("provider-a", "provider-b", "sip-carrier")
DISPS = ("ANSWERED",) * 7 + ("NO ANSWER", "BUSY", "FAILED")


def write_rows(path: Path, n: int, *, t_start: int, step: float, seq0: int = 0) -> int:
    """Append ``n`` cdr_csv rows (16 columns) with starts ``step`` seconds apart."""
    times: dict[int, str] = {}

    def ts(t: int) -> str:
        s = times.get(t)
        if s is None:
            if len(times) > 100_000:
                times.clear()
            s = times[t] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
        return s

    out: list[str] = []
    with path.open("a", encoding="utf-8") as f:
        for i in range(seq0, seq0 + n):
            start = t_start + int(i * step)
            dur = (i * 37) % 600
            disp = DISPS[i % len(DISPS)]
            bill = max(dur - 12, 0) if disp == "ANSWERED" else 0
            ext = 1000 + i % 90
            kind = i % 3
            if kind == 0:
                ctx, ch, dch = (
                    "from-trunk",
                    f"PJSIP/{TRUNKS[i % 3]}-{i:08x}",
                    f"PJSIP/{ext}-{i:08x}",
                )
            elif kind == 1:
                ctx, ch, dch = (
                    "from-internal",
                    f"PJSIP/{ext}-{i:08x}",
                    f"PJSIP/{TRUNKS[i % 3]}-{i:08x}",
                )
            else:
                ctx, ch, dch = "from-internal", f"PJSIP/{ext}-{i:08x}", f"PJSIP/{ext + 1}-{i:08x}"
            answer = f'"{ts(start + dur - bill)}"' if bill else ""
            out.append(
                f'"","+1555{i % 10_000_000:07d}","{ext}","{ctx}",'
                f'"""Caller {i % 997}"" <+1555{i:07d}>",'
                f'"{ch}","{dch}","Dial","{dch[:-9]},30,tT","{ts(start)}",{answer},'
                f'"{ts(start + dur)}",{dur},{bill},"{disp}","DOCUMENTATION"\n'
            )
            if len(out) >= 50_000:
                f.write("".join(out))
                out.clear()
        f.write("".join(out))
    return seq0 + n


def bare_csv_pass(path: Path) -> tuple[int, float]:
    """Rows and seconds for reading and splitting the file with csv.reader, nothing else."""
    t = time.perf_counter()
    n = 0
    with path.open("r", encoding="utf-8", newline="") as f:
        for _row in csv.reader(f):
            n += 1
    return n, time.perf_counter() - t


def approve(_record: Record) -> bool:
    """A gate that approves everything (the gate is not what is measured)."""
    return True


def rss_mib() -> float:
    """Resident set size of this process."""
    return psutil.Process().memory_info().rss / 2**20


#: The parse loop as the collector module calls it (replaced while timing it).
_PARSE = "ingest_chunk"


class ParseClock:
    """Counts the CPU time spent in the parse loop (``ingest_chunk``) by the thread running it.

    The rest of the collector's CPU time (commits, state encoding, rendering and
    offering buckets) is then ``process time - parse time``.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._real: Callable[..., tuple[int, int]] = getattr(collector_module, _PARSE)

    def __enter__(self) -> ParseClock:
        real = self._real

        def timed(*args: Any, **kwargs: Any) -> tuple[int, int]:
            t = time.thread_time()
            try:
                return real(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - t

        setattr(collector_module, _PARSE, timed)
        return self

    def __exit__(self, *_exc: object) -> None:
        setattr(collector_module, _PARSE, self._real)


def bench_ingest(rows: int, work: Path, days: int) -> None:
    """Collector ingest rate vs a bare csv.reader pass over the same file."""
    csv_path = work / "Master.csv"
    now = int(time.time())
    span = days * 86400
    write_rows(csv_path, rows, t_start=now - span, step=span / rows)
    size = csv_path.stat().st_size
    n_bare, t_bare = bare_csv_pass(csv_path)
    s = CallstatsSettings(csv=csv_path, max_age=3650 * 86400)
    c = CallstatsCollector(s, work / "state-ingest")
    t = time.perf_counter()
    cpu = time.process_time()
    with ParseClock() as parse:
        asyncio.run(c.collect(approve, reason="schedule"))
    t_agent = time.perf_counter() - t
    cpu_agent = time.process_time() - cpu
    st = c.status()
    asyncio.run(c.aclose())
    buckets = (span + 299) // 300
    print(f"file: {rows:,} rows over {days} days (~{buckets:,} buckets), {size / 2**20:.0f} MiB")
    print(f"bare csv.reader pass : {n_bare / t_bare:>12,.0f} rows/s ({t_bare:.2f} s)")
    print(
        f"collector ingest     : {st['rows_read'] / t_agent:>12,.0f} rows/s ({t_agent:.2f} s wall,"
        f" {cpu_agent:.2f} s CPU; commits and bucket offers included)"
    )
    print(
        f"  of which parse loop: {parse.seconds:.2f} s CPU"
        f" ({parse.seconds / rows * 1e6:.2f} µs/row);"
        f" everything else: {cpu_agent - parse.seconds:.2f} s CPU"
        f" ({(cpu_agent - parse.seconds) / buckets * 1e6:.0f} µs/bucket)"
    )
    print(f"ratio collector/bare : {t_bare / t_agent:.2f}")
    print(f"skipped: {st['rows_skipped']}")


def bench_memory(big: int, work: Path) -> None:
    """RSS after 1M rows, then after the file has grown to ``big`` rows."""
    csv_path = work / "Grow.csv"
    now = int(time.time())
    span = 60 * 86400
    step = span / big
    t0 = now - span
    s = CallstatsSettings(csv=csv_path, max_age=3650 * 86400)
    c = CallstatsCollector(s, work / "state-grow")
    seq = write_rows(csv_path, 1_000_000, t_start=t0, step=step)
    asyncio.run(c.collect(approve, reason="schedule"))
    base = rss_mib()
    print(f"RSS after 1,000,000 rows : {base:.1f} MiB")
    peak = base
    while seq < big:
        n = min(1_000_000, big - seq)
        seq = write_rows(csv_path, n, t_start=t0, step=step, seq0=seq)
        asyncio.run(c.collect(approve, reason="schedule"))
        peak = max(peak, rss_mib())
    st = c.status()
    asyncio.run(c.aclose())
    end = rss_mib()
    print(
        f"RSS after {seq:,} rows: {end:.1f} MiB (peak {peak:.1f}); growth {end - base:+.1f} MiB, "
        f"file {csv_path.stat().st_size / 2**30:.2f} GiB, rows read {st['rows_read']:,}"
    )
    csv_path.unlink()


FREEPBX_CDR = """CREATE TABLE cdr (
  calldate datetime NOT NULL DEFAULT '1000-01-01 00:00:00',
  clid varchar(80) NOT NULL DEFAULT '', src varchar(80) NOT NULL DEFAULT '',
  dst varchar(80) NOT NULL DEFAULT '', dcontext varchar(80) NOT NULL DEFAULT '',
  channel varchar(80) NOT NULL DEFAULT '', dstchannel varchar(80) NOT NULL DEFAULT '',
  lastapp varchar(80) NOT NULL DEFAULT '', lastdata varchar(80) NOT NULL DEFAULT '',
  duration int(11) NOT NULL DEFAULT 0, billsec int(11) NOT NULL DEFAULT 0,
  disposition varchar(45) NOT NULL DEFAULT '', amaflags int(11) NOT NULL DEFAULT 0,
  accountcode varchar(20) NOT NULL DEFAULT '', uniqueid varchar(32) NOT NULL DEFAULT '',
  userfield varchar(255) NOT NULL DEFAULT '', did varchar(50) NOT NULL DEFAULT '',
  recordingfile varchar(255) NOT NULL DEFAULT '', cnum varchar(80) NOT NULL DEFAULT '',
  cnam varchar(80) NOT NULL DEFAULT '', outbound_cnum varchar(80) NOT NULL DEFAULT '',
  outbound_cnam varchar(80) NOT NULL DEFAULT '', dst_cnam varchar(80) NOT NULL DEFAULT '',
  linkedid varchar(32) NOT NULL DEFAULT '', peeraccount varchar(80) NOT NULL DEFAULT '',
  sequence int(11) NOT NULL DEFAULT 0,
  KEY calldate (calldate), KEY dst (dst), KEY accountcode (accountcode),
  KEY uniqueid (uniqueid), KEY did (did), KEY recordingfile (recordingfile(191))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci"""


def bench_mariadb(rows: int, work: Path) -> None:
    """Insert ``rows`` into a fresh FreePBX cdr table, then time the incremental read."""
    import pymysql

    try:
        root = pymysql.connect(
            host="127.0.0.1", user="root", password="", autocommit=True, local_infile=True
        )
    except pymysql.MySQLError as exc:
        print(f"mariadb: skipped ({exc})")
        return
    name = f"cdrbench_{secrets.token_hex(3)}"
    try:
        with root.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}`")
            cur.execute(f"USE `{name}`")
            cur.execute(FREEPBX_CDR)
            now = int(time.time())
            span = 30 * 86400
            t = time.perf_counter()
            batch: list[tuple[Any, ...]] = []
            for i in range(rows):
                start = now - span + int(i * span / rows)
                dur = (i * 37) % 600
                ext = 1000 + i % 90
                batch.append(
                    (
                        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)),
                        "from-trunk" if i % 2 else "from-internal",
                        f"PJSIP/{TRUNKS[i % 3]}-{i:08x}",
                        f"PJSIP/{ext}-{i:08x}",
                        dur,
                        max(dur - 10, 0),
                        DISPS[i % len(DISPS)],
                        f"{start}.{i}",
                        i % 5,
                    )
                )
                if len(batch) == 20_000:
                    cur.executemany(
                        "INSERT INTO cdr (calldate, dcontext, channel, dstchannel, "
                        "duration, billsec, disposition, uniqueid, sequence) "
                        "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                        batch,
                    )
                    batch.clear()
            if batch:
                cur.executemany(
                    "INSERT INTO cdr (calldate, dcontext, channel, dstchannel, "
                    "duration, billsec, disposition, uniqueid, sequence) "
                    "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                    batch,
                )
            print(f"mariadb: inserted {rows:,} rows in {time.perf_counter() - t:.1f} s")
        s = CallstatsSettings(
            mariadb=f"mysql://root:@127.0.0.1:3306/{name}", csv=None, max_age=3650 * 86400
        )
        c = CallstatsCollector(s, work / "state-db")
        t = time.perf_counter()
        asyncio.run(c.collect(approve, reason="schedule"))
        first = time.perf_counter() - t
        n = c.status()["rows_read"]
        t = time.perf_counter()
        asyncio.run(c.collect(approve, reason="schedule"))
        again = time.perf_counter() - t
        asyncio.run(c.aclose())
        print(
            f"mariadb: first read {n:,} rows in {first:.1f} s ({n / first:,.0f} rows/s); "
            f"next poll (look-back window only) {again:.2f} s"
        )
    finally:
        with root.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        root.close()


def _rows_read(status: Any) -> int | None:
    """The ``rows_read`` counter wherever the status nests it."""
    if isinstance(status, dict):
        if "rows_read" in status:
            return int(status["rows_read"])
        for value in status.values():
            found = _rows_read(value)
            if found is not None:
                return found
    return None


def bench_backlog(rows: int, work: Path, days: int, rounds: int) -> None:
    """Daemon start → every row of a backlog counted, beside a bare csv.reader pass."""
    from agent import control
    from agent.errors import ControlError
    from tests.support.daemon import AgentProcess, base_config

    csv_path = work / "Backlog.csv"
    now = int(time.time())
    span = days * 86400
    write_rows(csv_path, rows, t_start=now - span, step=span / rows)
    bare: list[float] = []
    daemon: list[float] = []
    for r in range(rounds):
        n_bare, t_bare = bare_csv_pass(csv_path)
        bare.append(t_bare)
        root = work / f"daemon-{r}"
        cfg = base_config(root)
        cfg["collectors"]["health"] = {"enabled": False}
        cfg["collectors"]["callstats"] = {
            "interval": "1h",  # the start-up read is what is measured, not a poll
            "max_age": "3650d",
            "source": {"csv": str(csv_path)},
        }
        agent = AgentProcess(root, cfg)
        try:
            t0 = time.monotonic()
            agent.start(wait_ready=False)
            while True:
                try:
                    got = _rows_read(control.request(agent.socket_path, "status"))
                except (ControlError, OSError):
                    got = None  # not up yet: the socket is not there
                if got is not None and got >= rows:
                    break
                if time.monotonic() - t0 > 600:
                    raise SystemExit(f"the daemon counted {got} of {rows} rows in 600 s")
                time.sleep(0.01)
            daemon.append(time.monotonic() - t0)
        finally:
            agent.close()
        print(
            f"  round {r + 1}: bare {n_bare / t_bare:,.0f} rows/s, daemon start to all "
            f"counted {daemon[-1]:.2f} s ({rows / daemon[-1]:,.0f} rows/s)",
            flush=True,
        )
    tb, td = statistics.median(bare), statistics.median(daemon)
    ratio = tb / td
    print(f"backlog of {rows:,} rows, daemon start to every row counted (median of {rounds}):")
    print(f"  bare csv.reader pass : {rows / tb:>12,.0f} rows/s ({tb:.2f} s)")
    print(f"  daemon               : {rows / td:>12,.0f} rows/s ({td:.2f} s, start included)")
    print(f"  ratio daemon/bare    : {ratio:.2f} [{'ok' if ratio >= 0.35 else 'MISSED'}: >= 0.35]")


def main() -> int:
    """Run the selected benchmarks in a temporary directory."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--big", type=int, default=10_000_000)
    p.add_argument("--db-rows", type=int, default=1_000_000)
    p.add_argument("--days", type=int, default=20, help="time span of the ingest file")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-mariadb", action="store_true")
    p.add_argument("--backlog", type=int, default=300_000, help="rows; 0 skips the daemon run")
    p.add_argument("--backlog-rounds", type=int, default=3)
    args = p.parse_args()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPU(s)")
    with tempfile.TemporaryDirectory(prefix="bench-callstats-") as tmp:
        work = Path(tmp)
        bench_ingest(args.rows, work, args.days)
        if args.backlog:
            bench_backlog(args.backlog, work, args.days, args.backlog_rounds)
        if not args.skip_memory:
            bench_memory(args.big, work)
        if not args.skip_mariadb:
            bench_mariadb(args.db_rows, work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
