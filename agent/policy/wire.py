"""How an envelope's body travels: plain JSON, or compressed when that is smaller.

Why it exists: a day at the defaults is 1,440 health records, and their keys
are the same every time; sent as plain JSON they alone came to about 1 MB a
day on the wire (issue 17). The gate (the only maker of envelopes) asks
:func:`body_field` for the body's part of the envelope:

- ``"body": {...}``: the JSON object, as before, when compressing saves nothing;
- ``"enc": "zlib+base64", "body": "..."``: the body's UTF-8 JSON text as a zlib
  stream (RFC 1950), base64-encoded;
- and with ``"zdict": "health/1"``: that stream was made with a preset
  dictionary (RFC 1950 ``FDICT``): :data:`DICTIONARIES` holds its bytes, the
  wire protocol's own constant, which a receiver must hold byte for byte (the
  NOC's copy is ``noc/wire.py``; ``tests/test_wire.py`` keeps them equal). The
  dictionary holds the health body's keys, so a record costs its values only.

The secret check runs on the JSON text before it is compressed, and the ledger
accounts for the bytes that really leave (the payload as sent). A new
dictionary gets a new name; an old one is never changed.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from typing import Any

from agent.errors import BodyError as BodyError  # raised by decode_body
from agent.policy.classes import DataClass

ENCODING = "zlib+base64"
#: Decompressed bodies larger than this are refused by :func:`decode_body`.
MAX_BODY = 16 * 1024 * 1024
#: Level 6: within a few bytes of 9 on these bodies, at a fraction of the CPU on big parts.
LEVEL = 6

#: The health body's keys and common values (``agent/collectors/health``), most frequent
#: last (zlib reaches the end of its dictionary most cheaply). Never change it: add
#: ``health/2``.
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

#: Preset dictionaries by name (the envelope's ``zdict``).
DICTIONARIES: dict[str, bytes] = {"health/1": HEALTH_1}
#: The dictionary each class is compressed with (none: a plain zlib stream).
CLASS_DICTIONARY: dict[DataClass, str] = {DataClass.HEALTH: "health/1"}


def body_field(data_class: DataClass, body_text: str) -> str:
    """The envelope's body fields (JSON members, no braces) for ``body_text``.

    Compressed when that makes the envelope shorter, else the JSON text as is.
    """
    raw = body_text.encode()
    name = CLASS_DICTIONARY.get(data_class)
    if name is None:
        packer = zlib.compressobj(LEVEL)
        head = f'"enc":"{ENCODING}","body":"'
    else:
        packer = zlib.compressobj(
            LEVEL, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, DICTIONARIES[name]
        )
        head = f'"enc":"{ENCODING}","zdict":"{name}","body":"'
    packed = base64.b64encode(packer.compress(raw) + packer.flush()).decode("ascii")
    if len(head) + len(packed) + 1 >= len(raw) + len('"body":'):
        return f'"body":{body_text}'
    return f'{head}{packed}"'


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
