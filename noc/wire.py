"""Envelope bodies as the agent sends them: plain JSON, or compressed (README, wire protocol).

The agent's side is ``agent/policy/wire.py``; the NOC imports nothing of the
agent, so the preset dictionaries, constants of the wire protocol, are held
here byte for byte as well (``tests/test_wire.py`` keeps the two equal). A body
is decoded with a bound on its size, so a compressed bomb costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from typing import Any

ENCODING = "zlib+base64"
#: Decompressed bodies larger than this are rejected.
MAX_BODY = 16 * 1024 * 1024

HEALTH_1 = (
    b'"sections":{"denied":[],"not_loaded":[],"error":[]},"queues":{},'
    b'"logged_in":0,"available":0,"callers":0,"longest_wait":0,'
    b'"endpoints":{"total":0,"registered":0,"unregistered":0,"unavailable":0},'
    b'"trunks":{},"state":"up","state":"down","state":"unknown","registrations":{},'
    b'"contacts":{},"reachable":0,"unreachable":0,"rtt_ms":null,"channels":0,'
    b'"calls":{"calls":0,"calls_up":0,"channels":0,"channels_up":0,"processed":0},'
    b'"asterisk":{"running":true,"version":"","uptime":0,"since_reload":0,"started_at":0,'
    b'"processes":1},"reason":"refused","detail":"","retry_in":'
    b'"pbx":{"state":"ok","state":"partial","state":"unreachable","reason":null,'
    b'"asterisk":{"running":false,"processes":0},"processes":{"asterisk":{"running":false,'
    b'"count":0},"freepbx":{"running":true,"count":1}},"cdr":{"last_row_age":null},'
    b'"config":{"last_change_age":null}}}'
    b'"collector_errors":{},"switch":"on","gate":{"approved":{"health":0,"config":0,'
    b'"callstats":0},"refused":{},"narrowed":[],"last_seq":0},'
    b'"agent":{"pid":0,"rss":0,"cpu_percent":0.0,"threads":4,"switch":"on",'
    b'"outbox":{"queued":0,"bytes":0,"max_bytes":268435456,"dropped":0,"unstored":0,'
    b'"store_error":null,"delivered":0,"last_seq":0},'
    b'"net":{"errin":0,"errout":0,"dropin":0,"dropout":0},'
    b'"disks":[{"mount":"/","fstype":"ext4","total":0,"used":0,"percent":0.0},'
    b'{"mount":"/boot","fstype":"vfat","total":0,"used":0,"percent":0.0}],"uptime":0,'
    b'{"cpu":{"percent":0.0,"count":2},"load":[0.0,0.0,0.0],'
    b'"memory":{"total":0,"available":0,"percent":0.0},'
    b'"swap":{"total":0,"used":0,"percent":0.0},'
)

DICTIONARIES: dict[str, bytes] = {"health/1": HEALTH_1}


class BodyError(ValueError):
    """An encoded body that cannot be decoded."""


def decode_body(envelope: dict[str, Any]) -> Any:
    """An envelope's body as a JSON value, whatever its encoding; BodyError if it cannot be."""
    body = envelope.get("body")
    enc = envelope.get("enc")
    if enc is None:
        return body
    if enc != ENCODING or not isinstance(body, str):
        raise BodyError(f"body encoding {str(enc)[:40]!r}: expected {ENCODING!r} and a string")
    name = envelope.get("zdict")
    if name is not None and name not in DICTIONARIES:
        raise BodyError(f"unknown body dictionary {str(name)[:40]!r}")
    try:
        data = base64.b64decode(body, validate=True)
        unpacker = zlib.decompressobj(zdict=DICTIONARIES[name]) if name else zlib.decompressobj()
        text = unpacker.decompress(data, MAX_BODY)
        if unpacker.unconsumed_tail or not unpacker.eof:
            raise BodyError(f"compressed body truncated or over {MAX_BODY} bytes")
        return json.loads(text)
    except (binascii.Error, zlib.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BodyError(f"compressed body cannot be decoded: {exc}") from exc
