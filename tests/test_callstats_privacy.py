"""Privacy: CDRs full of numbers, names and ids; not one byte of them leaves through the gate."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import structlog
from structlog.testing import capture_logs

from agent.collectors.callstats.collector import CallstatsCollector
from agent.collectors.callstats.settings import CallstatsSettings
from agent.collectors.callstats.store import STATE_FILE
from agent.config import PolicyConfig
from agent.errors import PolicyRefused
from agent.ledger import Ledger
from agent.outbox import Outbox
from agent.policy.classes import Record
from agent.policy.gate import Gate
from agent.store import open_db
from tests.fixtures.cdr.cdrgen import Call, csv_bytes

NOW = int(time.time())
T0 = NOW - 3 * 3600 - NOW % 300


def _canaries(rnd: random.Random, n: int) -> list[Call]:
    calls = []
    for i in range(n):
        direction = rnd.choice(("inbound", "outbound", "internal"))
        calls.append(
            Call(
                start=T0 + rnd.randrange(2 * 3600),
                duration=rnd.randint(1, 600),
                billsec=0,
                disposition=rnd.choice(("NO ANSWER", "BUSY", "FAILED")),
                direction=direction,
                trunk=("provider-a" if i % 2 else "provider-b")
                if direction != "internal"
                else None,
                ext=f"8{rnd.randint(100000, 999999)}",
                number=f"+49151{rnd.randint(10_000_000, 99_999_999)}",
                name=f"Zebulon Quixote-{i:04d}Canary",
                account=f"ACCT-CANARY-{i:05d}",
                uniqueid=f"UNIQ-CANARY-{rnd.randint(10**9, 10**10)}.{i}",
                userfield=f"USERFIELD-CANARY-{i}",
            )
        )
    calls.sort(key=lambda c: c.end)
    return calls


def test_no_cdr_detail_in_any_envelope_ledger_or_log(tmp_path: Path) -> None:
    """Every byte of outbox, ledger and logs is free of numbers, names, extensions and ids."""
    rnd = random.Random(1234)
    calls = _canaries(rnd, 800)
    # A lone call on a trunk named like a person: it must be folded away, never named.
    calls.append(
        Call(
            start=T0 + 10,
            duration=30,
            billsec=25,
            disposition="ANSWERED",
            direction="inbound",
            trunk="Lonelytrunk",
            ext="8123456",
            number="+4915199999999",
        )
    )
    csv = tmp_path / "Master.csv"
    csv.write_bytes(csv_bytes(calls))
    state = tmp_path / "state"
    conn, _ = open_db(state)
    ledger = Ledger(conn)
    outbox = Outbox(conn, ledger, max_bytes=64 * 1024 * 1024)
    gate = Gate(policy=PolicyConfig(), switch_on=lambda: True, last_seq=0)

    def emit(record: Record) -> bool:
        try:
            outbox.put(gate.approve(record))
        except PolicyRefused:
            return False
        return True

    c = CallstatsCollector(CallstatsSettings(csv=csv), state)
    structlog.configure(processors=[])
    with capture_logs() as logs:
        asyncio.run(c.collect(emit, reason="schedule"))
    structlog.reset_defaults()
    status_text = repr(c.status())
    asyncio.run(c.aclose())
    payloads = [bytes(r[0]) for r in conn.execute("SELECT payload FROM outbox")]
    ledger_rows = [r[0].encode() for r in conn.execute("SELECT data FROM ledger")]
    conn.close()
    assert len(payloads) > 20, "the test must look at real envelopes"
    files = b"".join(p.read_bytes() for p in state.iterdir() if p.name.startswith("agent.db"))
    callstats_state = b"".join(
        p.read_bytes() for p in state.iterdir() if p.name.startswith(STATE_FILE)
    )
    haystacks = {
        "envelopes": b"\n".join(payloads),
        "ledger": b"\n".join(ledger_rows),
        "agent.db files": files,
        "callstats state file": callstats_state,
        "logs": repr(logs).encode(),
        "status": status_text.encode(),
    }
    needles: set[str] = set()
    for call in calls:
        needles.update(
            {
                call.number,
                call.name,
                call.account,
                call.uniqueid,
                call.userfield,
                call.ext,
                f"PJSIP/{call.ext}",
                call.number.lstrip("+"),
            }
        )
    needles.update({"Quixote", "CANARY", "Canary", "Zebulon"})
    needles.discard("")
    for where, blob in haystacks.items():
        # The local state file may hold trunk names (configuration, counted before folding);
        # nothing that leaves may name a trunk seen on fewer than min_count calls.
        extra = set() if where == "callstats state file" else {"Lonelytrunk"}
        found = [n for n in needles | extra if n.encode() in blob]
        assert not found, f"{where} holds CDR detail: {found[:5]}"
    for p in payloads:
        assert b'"class":"callstats"' in p
