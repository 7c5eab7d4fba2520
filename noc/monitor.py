"""A small NOC subscriber: one line per message received from the fleet.

Why it exists: ``make demo`` and a vendor engineer both need to see what the
NOC actually receives (which is all that leaves a box): topic, size and, for
envelopes, class, sequence number and id, without dumping bodies.

    python -m noc.monitor --broker mqtts://localhost:8883 \\
        --ca ca.crt --cert noc.crt --key noc.key [--topic 'pbx/#'] [--count N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Sequence
from typing import TextIO

import aiomqtt

from agent.errors import AgentError, TLSMaterialError
from noc._connect import NocSettings, add_arguments, connect, settings_from

RECONNECT_CAP = 10.0


def describe(topic: str, payload: bytes, *, retain: bool = False) -> str:
    """One line for one message: topic, size, and what the wire protocol says it is."""
    parts = topic.split("/")
    line = f"{topic} {len(payload)} B"
    kind = parts[2] if len(parts) >= 3 and parts[0] == "pbx" else ""
    if kind == "status":
        line += f" status={payload.decode(errors='replace')}"
    elif kind in ("up", "reply", "cmd"):
        try:
            msg = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"{line} (not JSON)"
        if not isinstance(msg, dict):
            return f"{line} (not a JSON object)"
        if kind == "up":
            line += f" class={msg.get('class')} seq={msg.get('seq')} id={msg.get('id')}"
        elif kind == "reply":
            outcome = "ok" if msg.get("ok") else f"error={msg.get('error')!r}"
            line += f" id={msg.get('id')} {outcome}"
        else:
            line += f" cmd={msg.get('cmd')} id={msg.get('id')}"
    return f"{line} (retained)" if retain else line


async def monitor(
    settings: NocSettings,
    *,
    topic: str = "pbx/#",
    count: int | None = None,
    out: TextIO = sys.stdout,
    ready: asyncio.Event | None = None,
) -> int:
    """Print each message on ``topic`` until ``count`` were seen (or forever).

    Reconnects with capped, jittered backoff when the broker goes away; a
    refused certificate or unusable material ends it with the reason. Returns
    the number of messages printed. ``ready`` is set once subscribed.
    """
    seen = 0
    attempt = 0
    while count is None or seen < count:
        try:
            client = await connect(settings, identifier=f"noc-monitor-{random.getrandbits(32):08x}")
        except TLSMaterialError:
            raise
        except AgentError as exc:
            attempt += 1
            delay = random.uniform(0, min(RECONNECT_CAP, 0.5 * 2**attempt))  # noqa: S311
            print(f"# {exc}; retrying in {delay:.1f}s", file=out, flush=True)
            await asyncio.sleep(delay)
            continue
        attempt = 0
        try:
            await client.subscribe(topic, qos=1)
            if ready is not None:
                ready.set()
            async for m in client.messages:
                payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                stamp = time.strftime("%H:%M:%S")
                print(
                    f"{stamp} {describe(str(m.topic), payload, retain=m.retain)}",
                    file=out,
                    flush=True,
                )
                seen += 1
                if count is not None and seen >= count:
                    break
        except aiomqtt.MqttError as exc:
            print(f"# connection lost: {exc}", file=out, flush=True)
        finally:
            try:
                await client.__aexit__(None, None, None)
            except aiomqtt.MqttError:
                pass  # already gone: nothing to close cleanly
    return seen


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m noc.monitor", description=__doc__.split("\n")[0])
    add_arguments(p)
    p.add_argument("--topic", default="pbx/#", help="topic filter (default pbx/#)")
    p.add_argument("--count", type=int, help="stop after this many messages")
    args = p.parse_args(argv)
    try:
        asyncio.run(monitor(settings_from(args), topic=args.topic, count=args.count))
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
