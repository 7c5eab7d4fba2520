"""What checking a command's signature costs the box, against the handler's own work.

    .venv/bin/python -m bench.bench_signing [--count N]

Three figures on one SQLite database, in one run: verifying a command alone
(command key certificate cached, as after the first command), verifying a new
command key certificate (the root's signature, once per key), and the whole
handler (strict JSON, the checks, the replay table, the ledger entry) for signed
pings. The bare baseline is the handler on the same pings with verification
replaced by a no-op, so the difference is what signing adds per command.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.ledger import Ledger
from agent.store import open_db
from agent.uplink.commands import CommandHandler
from agent.uplink.signing import CommandKey, CommandVerifier
from tests.support import signing
from tests.test_commands import Host

DEVICE = "pbx-bench-1"


class NoCheck(CommandVerifier):
    """The baseline: accepts every command without looking."""

    def check(self, msg: dict[str, Any], now: float) -> CommandKey:
        """Accept."""
        return CommandKey(kid="none", public=b"", not_before=0, expires=now + 1)


def handler(state: Path, verifier: CommandVerifier) -> CommandHandler:
    """A handler as the uplink makes it, on its own database."""
    conn, _ = open_db(state)
    conn.execute("PRAGMA synchronous=OFF")  # the disk is not what is measured
    return CommandHandler(
        conn=conn,
        ledger=Ledger(conn),
        host=Host(),
        max_age=300,
        switch_word=lambda: "on",
        verifier=verifier,
    )


def rate(h: CommandHandler, payloads: list[bytes], now: float) -> float:
    """Commands per second through ``h``; every one must be accepted."""
    t0 = time.perf_counter()
    for p in payloads:
        assert h.handle(p, now=now).ok
    return len(payloads) / (time.perf_counter() - t0)


def main() -> int:
    """Run the bench and print its figures."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=3000)
    args = ap.parse_args()
    now = time.time()
    msgs = [
        signing.sign({"v": 1, "id": f"b{i}", "ts": int(now), "cmd": "ping"}, DEVICE, now=now)
        for i in range(args.count)
    ]
    payloads = [json.dumps(m).encode() for m in msgs]
    verifier = CommandVerifier(signing.root_pub(), DEVICE)
    t0 = time.perf_counter()
    for m in msgs:
        verifier.check(m, now)
    verify_us = (time.perf_counter() - t0) / len(msgs) * 1e6
    t0 = time.perf_counter()
    for _ in range(200):
        CommandVerifier(signing.root_pub(), DEVICE).check(msgs[0], now)
    first_us = (time.perf_counter() - t0) / 200 * 1e6
    with tempfile.TemporaryDirectory() as tmp:
        base = rate(handler(Path(tmp) / "a", NoCheck(None, DEVICE)), payloads, now)
        signed = rate(
            handler(Path(tmp) / "b", CommandVerifier(signing.root_pub(), DEVICE)), payloads, now
        )
    print(f"signed commands                       {args.count:,}")
    print(f"verify one command (key cached)       {verify_us:.0f} µs")
    print(f"first command of a key (+ root sig)   {first_us:.0f} µs (includes reading the root)")
    print(f"handler, baseline (no check)          {base:,.0f} commands/s")
    print(f"handler, signatures checked           {signed:,.0f} commands/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
