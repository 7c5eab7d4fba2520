"""Send one command to a box and wait for its reply.

Why it exists: the NOC's side of the command protocol (wire protocol v1), for
people and for tests: ``{"v":1,"id","ts","cmd","args"}`` on
``pbx/<device>/cmd``, answered by ``{"v":1,"id","ok","result"|"error"}`` on
``pbx/<device>/reply``.

    python -m noc.send --broker mqtts://localhost:8883 --ca ca.crt \\
        --cert noc.crt --key noc.key --device pbx-0001 ping [--args '{"class":"config"}']
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import secrets
import sys
import time
from collections.abc import Sequence
from typing import Any

from agent.errors import AgentError, UplinkError
from noc._connect import NocSettings, add_arguments, connect, settings_from

DEFAULT_TIMEOUT = 10.0


def new_command_id(now: float | None = None) -> str:
    """A unique id that sorts by time: milliseconds in hex, then 48 random bits."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:012x}{secrets.token_hex(6)}"


def make_command(
    cmd: str, args: dict[str, Any] | None = None, *, now: float | None = None
) -> dict[str, Any]:
    """Build a command object, stamped with a fresh id and the current UTC time."""
    when = time.time() if now is None else now
    ts = dt.datetime.fromtimestamp(when, dt.UTC).isoformat(timespec="milliseconds")
    return {
        "v": 1,
        "id": new_command_id(when),
        "ts": ts.replace("+00:00", "Z"),
        "cmd": cmd,
        "args": args or {},
    }


async def send_command(
    settings: NocSettings,
    device: str,
    command: dict[str, Any],
    *,
    wait: float = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """Publish ``command`` to ``pbx/<device>/cmd`` and return the reply with the same id.

    Subscribes to the reply topic before publishing, so a fast reply is not
    missed. Raises UplinkError when no reply arrives within ``wait`` seconds.
    """
    client = await connect(settings, identifier=f"noc-send-{secrets.token_hex(4)}")
    try:
        await client.subscribe(f"pbx/{device}/reply", qos=1)
        await client.publish(f"pbx/{device}/cmd", json.dumps(command).encode(), qos=1)
        try:
            async with asyncio.timeout(wait):
                async for m in client.messages:
                    payload = m.payload if isinstance(m.payload, bytes) else b""
                    try:
                        reply = json.loads(payload)
                    except (UnicodeDecodeError, json.JSONDecodeError):
                        continue  # someone else's garbage on the topic: not our answer
                    if isinstance(reply, dict) and reply.get("id") == command["id"]:
                        return reply
        except TimeoutError:
            pass
        raise UplinkError(
            f"no reply from {device} to {command['cmd']!r} (id {command['id']}) within {wait:g}s: "
            f"is the box connected (pbx/{device}/status)?"
        )
    finally:
        await client.__aexit__(None, None, None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line: print the reply; 0 if ok, 2 if the box answered with an error."""
    p = argparse.ArgumentParser(prog="python -m noc.send", description=__doc__.split("\n")[0])
    add_arguments(p)
    p.add_argument("--device", required=True, help="device id (its certificate's CN)")
    p.add_argument("cmd", help="ping, collect, policy, narrow")
    p.add_argument("--args", default="{}", help="JSON object of arguments")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait")
    a = p.parse_args(argv)
    try:
        args = json.loads(a.args)
    except json.JSONDecodeError as exc:
        print(f"error: --args is not JSON: {exc}", file=sys.stderr)
        return 64
    if not isinstance(args, dict):
        print("error: --args must be a JSON object", file=sys.stderr)
        return 64
    try:
        reply = asyncio.run(
            send_command(settings_from(a), a.device, make_command(a.cmd, args), wait=a.timeout)
        )
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(reply, indent=2))
    return 0 if reply.get("ok") else 2


if __name__ == "__main__":
    sys.exit(main())
