"""A hostile NOC: generated command payloads of every shape, and a flood through a real broker.

Why it exists: the promise is that no payload the NOC can send takes the
uplink down, leaves a command unanswered or unledgered, or grows the agent's
memory. The generator is plain seeded ``random`` (the bench uses it too, without
hypothesis); the property tests in ``tests/test_commands_hostile.py`` draw the
same shapes from hypothesis. :func:`flood` is the NOC's side: a real MQTT 5
client with the NOC's certificate that keeps a window of commands outstanding
and reads one reply per command.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from agent.uplink.mqtt import LinkSettings, MqttLink
from agent.uplink.tls import client_context
from tests.support.mosquitto import Mosquitto
from tests.support.signing import signed_bytes

# Each kind is one way a payload can be wrong (or right: "ok" and "replay" are the
# controls that show accepted commands still run in the middle of a flood).
KINDS = (
    "ok",
    "replay",
    "huge-int-ts",
    "huge-int-anywhere",
    "lone-surrogate-id",
    "lone-surrogate-key",
    "nul",
    "nan-token",
    "infinity-token",
    "float-overflow",
    "deep-nesting",
    "duplicate-keys",
    "wrong-type",
    "oversized",
    "not-utf8",
    "utf16",
    "not-an-object",
    "not-json",
    "empty",
    "bad-ts",
    "unknown-cmd",
    "random-json",
)
# Oversized payloads stay under the packet size the agent announces to the broker
# (64 KiB), so that they arrive and are refused; larger ones the broker discards.
MAX_OVERSIZED = 60 * 1024
FIELDS = ("v", "id", "ts", "cmd", "args")


def _id(rng: random.Random) -> str:
    return f"h{rng.getrandbits(64):016x}"


def _wrong(rng: random.Random, target: str = "") -> Any:
    """A value of the wrong type (or out of range) for ``target``."""
    values: list[Any] = [True, False, 0, -1, 1.5, "", "x" * 70, [], [1, 2]]
    if target != "args":
        values += [None, {}, {"a": {"b": None}}]  # any object (or none) is fine as args
    if target not in ("id", "collector", "class"):
        values.append("1")  # a fine id; not a collector or class name
    return rng.choice(values)


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.4:
        return rng.choice(
            [None, True, False, rng.randint(-(10**15), 10**15), rng.uniform(-1e9, 1e9), "s"]
        )
    if roll < 0.7:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {f"k{i}": _random_json(rng, depth + 1) for i in range(rng.randint(0, 4))}


def make_payload(
    kind: str, rng: random.Random, now: float, seen: list[str], device: str = "pbx-test-1"
) -> bytes:
    """One payload of ``kind``; ``seen`` collects accepted ids so that replays can reuse them.

    Payloads that are well-formed JSON objects are signed for ``device`` as the NOC
    signs (a valid signature on a wrong command), so that what is refused is the
    fault of their kind, not the lack of a signature; the rest cannot be signed.
    """
    ts = now
    if kind == "ok":
        cmd_id = _id(rng)
        seen.append(cmd_id)
        name = rng.choice(["ping", "policy"])
        return signed_bytes({"v": 1, "id": cmd_id, "ts": ts, "cmd": name}, device, now=now)
    if kind == "replay":
        cmd_id = rng.choice(seen) if seen else "never-seen"
        return signed_bytes({"v": 1, "id": cmd_id, "ts": ts, "cmd": "ping"}, device, now=now)
    base = {"v": 1, "id": _id(rng), "ts": ts, "cmd": "ping", "args": {}}
    if kind == "huge-int-ts":
        digits = rng.choice([40, 309, 400, 4300, 5000, 12000])
        return b'{"v":1,"id":"%s","cmd":"ping","ts":%s}' % (
            _id(rng).encode(),
            b"9" * digits,
        )
    if kind == "huge-int-anywhere":
        field_name = rng.choice(FIELDS)
        body = json.dumps({**base, field_name: "@@"}).encode()
        return body.replace(b'"@@"', b"-" + b"7" * rng.choice([33, 400, 5000]))
    if kind == "lone-surrogate-id":
        return json.dumps({**base, "id": rng.choice(["\ud800", "a\udfff", "\udbff"])}).encode()
    if kind == "lone-surrogate-key":
        return json.dumps({**base, "args": {"\udc00": 1}}).encode()
    if kind == "nul":
        where = rng.choice(["id", "cmd", "args"])
        if where == "args":
            return json.dumps(
                {**base, "cmd": "collect", "args": {"collector": "health\x00"}}
            ).encode()
        return json.dumps({**base, where: "a\x00b"}).encode()
    if kind == "nan-token":
        return json.dumps({**base, rng.choice(FIELDS): float("nan")}).encode()
    if kind == "infinity-token":
        return json.dumps({**base, rng.choice(FIELDS): rng.choice([1, -1]) * float("inf")}).encode()
    if kind == "float-overflow":
        return json.dumps({**base, "ts": "@@"}).encode().replace(b'"@@"', b"1e400")
    if kind == "deep-nesting":
        depth = rng.choice([9, 50, 999, 1_000, 5_000, 8_000])
        open_, close = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
        inner = open_ * depth + b"1" + close * depth
        if rng.random() < 0.5:
            inner = open_ * depth  # unbalanced: never closed
        return json.dumps({**base, "args": "@@"}).encode().replace(b'"@@"', inner)
    if kind == "duplicate-keys":
        key = rng.choice(FIELDS)
        return b'{"v":1,"id":"%s","ts":%f,"cmd":"ping","args":{},"%s":%s}' % (
            _id(rng).encode(),
            ts,
            key.encode(),
            json.dumps(_wrong(rng)).encode(),
        )
    if kind == "wrong-type":
        target = rng.choice([*FIELDS, "args.collector", "args.class"])
        if target.startswith("args."):
            name = "collect" if target == "args.collector" else "narrow"
            return signed_bytes(
                {**base, "cmd": name, "args": {target[5:]: _wrong(rng)}}, device, now=now
            )
        return signed_bytes({**base, target: _wrong(rng, target)}, device, now=now)
    if kind == "oversized":
        size = rng.randint(16 * 1024 + 1, MAX_OVERSIZED)
        body = json.dumps({**base, "args": {"pad": ""}}, separators=(",", ":")).encode()
        return body.replace(b'"pad":""', b'"pad":"' + b"x" * (size - len(body)) + b'"')
    if kind == "not-utf8":
        return rng.choice(
            [
                b'{"v":1,"id":"\xff\xfe","ts":0,"cmd":"ping"}',
                bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))),
                json.dumps({**base, "cmd": "p\u00efng"}, ensure_ascii=False).encode("latin-1"),
            ]
        )
    if kind == "utf16":
        return json.dumps(base).encode(rng.choice(["utf-16", "utf-16-le", "utf-32"]))
    if kind == "not-an-object":
        return json.dumps(rng.choice([[base], "ping", 1, None, True, []])).encode()
    if kind == "not-json":
        return rng.choice([b"{", b"ping", b'{"v":1,}', b"\x00" * 10, b"{'v': 1}", b"[" * 100])
    if kind == "empty":
        return b""
    if kind == "bad-ts":
        bad = rng.choice(
            [
                "9999-12-31T23:59:59-23:59",
                "0001-01-01T00:00:00+23:59",
                "yesterday",
                "",
                "2026-13-45",
                ts - 10**9,
                ts + 10**9,
                -(10**30),
                1e308,
            ]
        )
        return signed_bytes({**base, "ts": bad}, device, now=now)
    if kind == "unknown-cmd":
        name = rng.choice(["uplink", "switch", "support.connect", "PING", "\u202eping", "x" * 500])
        return signed_bytes({**base, "cmd": name, "args": {"state": "on"}}, device, now=now)
    if kind == "random-json":
        msg = {f: _random_json(rng) for f in FIELDS if rng.random() < 0.7}
        return signed_bytes(msg, device, now=now)
    raise ValueError(f"unknown kind {kind!r}")


def hostile_payloads(
    count: int, *, seed: int = 9, now: float | None = None, device: str = "pbx-test-1"
) -> Iterator[tuple[str, bytes]]:
    """``count`` (kind, payload) pairs cycling through every kind, shuffled within each cycle."""
    rng = random.Random(seed)
    seen: list[str] = []
    made = 0
    while made < count:
        kinds = list(KINDS)
        rng.shuffle(kinds)
        if not seen and kinds.index("replay") < kinds.index("ok"):
            kinds.remove("replay")
            kinds.insert(kinds.index("ok") + 1, "replay")  # replay something accepted
        for kind in kinds:
            if made == count:
                return
            yield kind, make_payload(kind, rng, time.time() if now is None else now, seen, device)
            made += 1


@dataclass
class FloodResult:
    """What the NOC saw: a reply per command, in order (QoS 1 keeps one publisher's order)."""

    sent: int = 0
    replies: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


async def _flood(
    broker: Mosquitto,
    device: str,
    payloads: list[bytes],
    window: int,
    budget: float,
    expect_replies: bool,
) -> FloodResult:
    result = FloodResult()
    noc = broker.pki.device("noc")
    got_one = asyncio.Event()
    link = MqttLink(
        LinkSettings(
            host=broker.host,
            port=broker.port,
            client_id=f"noc-flood-{random.getrandbits(32):08x}",
            max_inflight=window,
        ),
        client_context(broker.pki.ca_file, noc.cert, noc.key),
    )
    await link.connect()
    try:
        await link.subscribe(f"pbx/{device}/reply", qos=1)

        async def read() -> None:
            while True:
                m = await link.next_message()
                result.replies.append(json.loads(m.payload))
                got_one.set()

        reader = asyncio.create_task(read())
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(budget):
                for payload in payloads:
                    while expect_replies and result.sent - len(result.replies) >= window:
                        got_one.clear()
                        await got_one.wait()
                    await link.publish_wait(f"pbx/{device}/cmd", payload)
                    result.sent += 1
                while expect_replies and len(result.replies) < result.sent:
                    got_one.clear()
                    await got_one.wait()
        except TimeoutError:
            pass  # the caller compares sent and replies
        finally:
            result.seconds = time.monotonic() - t0
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    finally:
        await link.disconnect()
    return result


def flood(
    broker: Mosquitto,
    device: str,
    payloads: list[bytes],
    *,
    window: int = 32,
    timeout: float = 120.0,
    expect_replies: bool = True,
) -> FloodResult:
    """Publish every payload to ``pbx/<device>/cmd`` as the NOC and collect the replies.

    At most ``window`` commands are outstanding (sent, not yet answered), as a NOC
    that waits for its answers would do; returns when every one is answered or
    ``timeout`` has passed.
    """
    return asyncio.run(_flood(broker, device, payloads, window, timeout, expect_replies))
