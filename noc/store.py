"""What one message from the fleet does to the database.

Called by the ingest workers inside a transaction that they commit before
acknowledging the message. Every envelope is first inserted into ``envelopes``
with ``ON CONFLICT DO NOTHING``: a duplicate delivery (the agent's at-least-once,
or the broker redelivering to a worker that died after its commit) changes
nothing else, because every derived table is touched only when that insert
happened. A message that cannot be read raises :class:`Rejected`; the worker
keeps it in ``rejects`` and acknowledges it, so that one bad message never
blocks the stream.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import difflib
import hashlib
import json
import re
import zlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from noc.wire import BodyError, decode_body

DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # no "." or ".." (URLs)
CLASSES = frozenset({"health", "config", "callstats"})
SNAPSHOT_SCHEMAS = ("pbx-config-snapshot/1", "pbx-config-snapshot/2")
CALLSTATS_SCHEMA = "callstats/1"
MAX_PARTS = 100_000  # a bound against nonsense, not an assumption about snapshots
MAX_DIFF_LINES = 5_000
MAX_TRUNKS_DOWN = 200  # as many as a box names (the rest are "other")
RESTART_SLACK = 2  # seconds: a start time read twice may differ by rounding, not by a restart

Conn = psycopg.Connection[Any]


class Rejected(ValueError):
    """The message cannot be used; the text says why (kept in ``rejects``)."""


class Kind(StrEnum):
    """Which of the fleet's topics a message came on."""

    ENVELOPE = "envelope"
    STATUS = "status"
    REPLY = "reply"


class Outcome(StrEnum):
    """What the message did."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    STATUS = "status"
    REPLY = "reply"


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed ``pbx/<device>/...`` topic."""

    device: str
    kind: Kind
    data_class: str | None = None


def parse_topic(topic: str) -> Topic:
    """The device and kind of a fleet topic; Rejected for anything else."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != "pbx" or not DEVICE_ID.match(parts[1]):
        raise Rejected(f"not a fleet topic: {topic[:200]!r}")
    if len(parts) == 4 and parts[2] == "up" and parts[3] in CLASSES:
        return Topic(parts[1], Kind.ENVELOPE, parts[3])
    if len(parts) == 3 and parts[2] == "status":
        return Topic(parts[1], Kind.STATUS)
    if len(parts) == 3 and parts[2] == "reply":
        return Topic(parts[1], Kind.REPLY)
    raise Rejected(f"not a fleet topic: {topic[:200]!r}")


def _json_object(payload: bytes) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise Rejected(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Rejected("not a JSON object")
    return data


def _ts(text: Any, what: str) -> dt.datetime:
    if not isinstance(text, str):
        raise Rejected(f"{what}: expected an ISO 8601 time")
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise Rejected(f"{what}: {text[:40]!r} is not an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _epoch(v: Any) -> int | None:
    n = _int(v)
    return n if n is not None and 0 < n < 2**40 else None  # a bigint, and a plausible date


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def handle(conn: Conn, topic: str, payload: bytes, *, retained: bool = False) -> Outcome:
    """Apply one message; raises Rejected for an unusable one."""
    result = handle_batch(conn, [(topic, payload, retained)])[0]
    if isinstance(result, Rejected):
        raise result
    return result


@dataclass(slots=True)
class _Env:
    """A parsed, valid envelope waiting for its batch's statements."""

    index: int
    device: str
    id: str
    seq: int
    data_class: str
    ts: dt.datetime
    size: int
    body: dict[str, Any]
    params: tuple[Any, ...] | None = None  # callstats: the row, checked before any write


def parse_envelope(device: str, data_class: str, payload: bytes, index: int = 0) -> _Env:
    """Check an envelope (and a callstats body) without touching the database."""
    env = _json_object(payload)
    if env.get("v") != 1 or isinstance(env.get("v"), bool):
        raise Rejected(f"envelope version {str(env.get('v'))[:20]!r}: this NOC reads 1")
    try:
        body = decode_body(env)  # plain, or compressed by the agent (noc/wire.py)
    except BodyError as exc:
        raise Rejected(f"envelope body: {exc}") from None
    env_id, seq = env.get("id"), _int(env.get("seq"))
    if not isinstance(env_id, str) or not 1 <= len(env_id) <= 64:
        raise Rejected("envelope without a usable id")
    if seq is None or seq < 1:
        raise Rejected("envelope seq: expected a whole number >= 1")
    if env.get("class") != data_class:
        raise Rejected(f"envelope class {str(env.get('class'))[:20]!r} on the {data_class} topic")
    if not isinstance(body, dict):
        raise Rejected("envelope body: expected a JSON object")
    ts = _ts(env.get("ts"), "envelope ts")
    e = _Env(index, device, env_id, seq, data_class, ts, len(payload), body)
    if data_class == "callstats":
        e.params = _callstats_row(device, env_id, body)
    elif data_class == "config":
        _check_part(body)
    return e


def handle_batch(conn: Conn, messages: list[tuple[str, bytes, bool]]) -> list[Outcome | Rejected]:
    """Apply a batch of ``(topic, payload, retained)`` in the caller's transaction.

    Returns one outcome per message, in order; a message that cannot be read is
    a :class:`Rejected` in the list (nothing written for it). A problem found only
    against the database (a snapshot part that contradicts its snapshot) raises
    Rejected: the caller then applies the batch one message at a time.
    Round trips per batch, not per message: the envelopes go in with one INSERT,
    the devices are locked with one SELECT, the rest are pipelined.
    """
    out: list[Outcome | Rejected | None] = [None] * len(messages)
    envs: list[_Env] = []
    others: list[tuple[int, Topic, bytes, bool]] = []
    for i, (topic, payload, retained) in enumerate(messages):
        try:
            t = parse_topic(topic)
            if t.kind is Kind.ENVELOPE:
                assert t.data_class is not None
                envs.append(parse_envelope(t.device, t.data_class, payload, i))
            else:
                others.append((i, t, payload, retained))
        except Rejected as exc:
            out[i] = exc
    devices = sorted({e.device for e in envs} | {t.device for _, t, _, _ in others})
    if devices:
        conn.execute(
            "INSERT INTO devices (device_id) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING",
            (devices,),
        )
        # One lock order for every worker: two batches never wait on each other in a cycle.
        last_seq = {
            str(r[0]): r[1]
            for r in conn.execute(
                "SELECT device_id, last_seq FROM devices WHERE device_id = ANY(%s)"
                " ORDER BY device_id FOR UPDATE",
                (devices,),
            )
        }
    for i, t, payload, retained in others:  # statuses and replies: few, in arrival order
        try:
            out[i] = (
                _status(conn, t.device, payload, retained)
                if t.kind is Kind.STATUS
                else _reply(conn, t.device, payload)
            )
        except Rejected as exc:
            out[i] = exc
    if envs:
        stored = _insert_envelopes(conn, envs)
        for e in envs:
            out[e.index] = Outcome.STORED if e.index in stored else Outcome.DUPLICATE
        fresh = [e for e in envs if e.index in stored]
        _sequences(conn, fresh, last_seq)
        _health_rows(conn, [e for e in fresh if e.data_class == "health"])
        rows = [e.params for e in fresh if e.data_class == "callstats" and e.params]
        if rows:
            conn.cursor().executemany(_CALLSTATS_UPSERT, rows)
        for e in fresh:
            if e.data_class == "config":
                _snapshot_part(conn, e.device, e.body)
    assert all(o is not None for o in out)
    return out  # type: ignore[return-value]


def _insert_envelopes(conn: Conn, envs: list[_Env]) -> set[int]:
    """Insert the batch's envelopes; the indexes of those that were new."""
    rows = conn.execute(
        "INSERT INTO envelopes (device_id, id, seq, class, ts, size)"
        " SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::text[],"
        " %s::timestamptz[], %s::int[]) ON CONFLICT DO NOTHING RETURNING device_id, id",
        (
            [e.device for e in envs],
            [e.id for e in envs],
            [e.seq for e in envs],
            [e.data_class for e in envs],
            [e.ts for e in envs],
            [e.size for e in envs],
        ),
    ).fetchall()
    new = {(str(d), str(i)) for d, i in rows}
    stored: set[int] = set()
    for e in envs:  # the same envelope twice in one batch: the first is the one stored
        key = (e.device, e.id)
        if key in new:
            stored.add(e.index)
            new.discard(key)
    return stored


def _sequences(conn: Conn, fresh: list[_Env], last_seq: dict[str, Any]) -> None:
    """Advance each device's highest sequence number; open and fill gaps."""
    by_dev: dict[str, list[int]] = {}
    for e in fresh:
        by_dev.setdefault(e.device, []).append(e.seq)
    late = sorted(
        d for d, seqs in by_dev.items() if last_seq.get(d) is not None and min(seqs) <= last_seq[d]
    )
    gaps: dict[str, list[list[Any]]] = {d: [] for d in late}
    if late:
        for d, first, last, opened in conn.execute(
            "SELECT device_id, first_seq, last_seq, opened_at FROM seq_gaps"
            " WHERE device_id = ANY(%s) ORDER BY device_id, first_seq",
            (late,),
        ):
            gaps[str(d)].append([first, last, opened])
    updates = []
    new_gaps: list[tuple[str, int, int]] = []
    rewrite: list[tuple[str, list[list[Any]]]] = []
    for dev, seqs in by_dev.items():
        last = last_seq.get(dev)
        missing = 0
        dev_gaps = gaps.get(dev)
        changed = False
        for seq in sorted(seqs):
            if last is None or seq == last + 1:
                last = seq
            elif seq > last + 1:
                new_gaps.append((dev, last + 1, seq - 1))
                missing += seq - 1 - last
                last = seq
            elif dev_gaps is not None:
                for g in dev_gaps:
                    if g[0] <= seq <= g[1]:
                        missing -= 1
                        changed = True
                        dev_gaps.remove(g)
                        dev_gaps.extend(
                            [a, b, g[2]] for a, b in ((g[0], seq - 1), (seq + 1, g[1])) if a <= b
                        )
                        break
        if changed:
            assert dev_gaps is not None
            rewrite.append((dev, dev_gaps))
        updates.append((last, len(seqs), missing, dev))
    cur = conn.cursor()
    for dev, dev_gaps in rewrite:
        conn.execute("DELETE FROM seq_gaps WHERE device_id = %s", (dev,))
        if dev_gaps:
            cur.executemany(
                "INSERT INTO seq_gaps (device_id, first_seq, last_seq, opened_at)"
                " VALUES (%s, %s, %s, %s)",
                [(dev, a, b, o) for a, b, o in dev_gaps],
            )
    if new_gaps:
        cur.executemany(
            "INSERT INTO seq_gaps (device_id, first_seq, last_seq) VALUES (%s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            new_gaps,
        )
    cur.executemany(
        "UPDATE devices SET last_seq = %s, envelopes = envelopes + %s,"
        " missing = missing + %s, last_seen = now() WHERE device_id = %s",
        updates,
    )


def _health_rows(conn: Conn, envs: list[_Env]) -> None:
    if not envs:
        return
    rows = []
    newest: dict[str, tuple[dt.datetime, dict[str, Any]]] = {}
    fields = [health_fields(e.body) for e in envs]
    for e, f in zip(envs, fields, strict=True):
        rows.append(
            (
                e.device, e.ts, e.id, f["cpu_pct"], f["load1"], f["mem_pct"], f["swap_pct"],
                f["disk_pct"], f["uptime"], f["outbox_queued"], f["outbox_dropped"],
                f["asterisk_up"], Jsonb(e.body),
            )
        )  # fmt: skip
        if e.device not in newest or newest[e.device][0] <= e.ts:
            newest[e.device] = (e.ts, f)
    cur = conn.cursor()
    cur.executemany(
        "INSERT INTO health (device_id, ts, envelope_id, cpu_pct, load1, mem_pct, swap_pct,"
        " disk_pct, uptime, outbox_queued, outbox_dropped, asterisk_up, body)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
        rows,
    )
    cur.executemany(
        "UPDATE devices SET health_at = %s, cpu_pct = %s, load1 = %s, mem_pct = %s,"
        " disk_pct = %s, outbox_queued = %s, outbox_dropped = %s, asterisk_up = %s,"
        " agent_version = COALESCE(%s, agent_version)"
        " WHERE device_id = %s AND (health_at IS NULL OR health_at <= %s)",
        [
            (
                ts, f["cpu_pct"], f["load1"], f["mem_pct"], f["disk_pct"], f["outbox_queued"],
                f["outbox_dropped"], f["asterisk_up"], f["agent_version"], dev, ts,
            )
            for dev, (ts, f) in newest.items()
        ],
    )  # fmt: skip
    # Every record in the box's order (its sequence), not only the newest: "down for two
    # records running" and "the start time changed" are facts about consecutive records, and
    # a late older record (a backlog after an outage) must not rewrite the newest state.
    cur.executemany(
        "UPDATE devices SET"
        " trunks_down_streak = CASE WHEN cardinality(%(down)s::text[]) = 0 THEN 0"
        "   ELSE trunks_down_streak + 1 END,"
        " trunks_down = %(down)s::text[],"
        " asterisk_restarted_at = CASE WHEN asterisk_started_at IS NOT NULL"
        "   AND %(started)s::bigint IS NOT NULL"
        "   AND abs(%(started)s::bigint - asterisk_started_at) > %(slack)s"
        "   THEN to_timestamp(%(started)s::bigint) ELSE asterisk_restarted_at END,"
        " asterisk_started_at = COALESCE(%(started)s::bigint, asterisk_started_at),"
        " pbx_seq = %(seq)s"
        " WHERE device_id = %(dev)s AND (pbx_seq IS NULL OR pbx_seq < %(seq)s)",
        [
            {
                "dev": e.device, "seq": e.seq, "down": f["trunks_down"],
                "started": f["asterisk_started_at"], "slack": RESTART_SLACK,
            }
            for e, f in sorted(zip(envs, fields, strict=True), key=lambda ef: ef[0].seq)
        ],
    )  # fmt: skip


# -- status and replies ------------------------------------------------------------------


def ensure_device(conn: Conn, device: str) -> None:
    """Make the device's row if this is the first we hear of it."""
    conn.execute(
        "INSERT INTO devices (device_id) VALUES (%s) ON CONFLICT (device_id) DO NOTHING", (device,)
    )


def _status(conn: Conn, device: str, payload: bytes, retained: bool) -> Outcome:
    word = payload.decode("utf-8", "replace").strip()
    if word not in ("online", "offline", "severed"):
        raise Rejected(f"status {word[:40]!r}: expected online, offline or severed")
    ensure_device(conn, device)
    row = conn.execute(
        "SELECT status FROM devices WHERE device_id = %s FOR UPDATE", (device,)
    ).fetchone()
    changed = row is None or row[0] != word
    # A retained status is the broker's memory, not news from the box: no "last seen".
    conn.execute(
        "UPDATE devices SET status = %s,"
        " status_at = CASE WHEN %s THEN now() ELSE status_at END,"
        " last_seen = CASE WHEN %s THEN now() ELSE last_seen END"
        " WHERE device_id = %s",
        (word, changed, word == "online" and not retained, device),
    )
    if changed:
        conn.execute(
            "INSERT INTO status_events (device_id, status) VALUES (%s, %s)", (device, word)
        )
    return Outcome.STATUS


def _reply(conn: Conn, device: str, payload: bytes) -> Outcome:
    msg = _json_object(payload)
    cmd_id = msg.get("id")
    if not isinstance(cmd_id, str) or not cmd_id or len(cmd_id) > 64:
        raise Rejected("reply without a usable id")
    ok = msg.get("ok") if isinstance(msg.get("ok"), bool) else None
    ensure_device(conn, device)
    inserted = conn.execute(
        "INSERT INTO replies (device_id, id, ok, payload) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT DO NOTHING RETURNING 1",
        (device, cmd_id, ok, Jsonb(msg)),
    ).fetchone()
    if inserted is None:
        return Outcome.DUPLICATE
    error = msg.get("error")
    conn.execute(
        "UPDATE commands SET reply_at = now(), ok = %s, result = %s, error = %s"
        " WHERE id = %s AND device_id = %s AND reply_at IS NULL",
        (
            ok,
            Jsonb(msg.get("result")),
            None if error is None else str(error)[:2000],
            cmd_id,
            device,
        ),
    )
    conn.execute("UPDATE devices SET last_seen = now() WHERE device_id = %s", (device,))
    return Outcome.REPLY


# -- envelopes ---------------------------------------------------------------------------


def health_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The figures the fleet table and charts use, from a health body (missing: None)."""
    cpu, mem, swap = _dict(body.get("cpu")), _dict(body.get("memory")), _dict(body.get("swap"))
    load: list[Any] = body["load"] if isinstance(body.get("load"), list) else []
    disks: list[Any] = body["disks"] if isinstance(body.get("disks"), list) else []
    agent = _dict(body.get("agent"))
    outbox = _dict(agent.get("outbox"))
    pbx = _dict(body.get("pbx"))
    ast = pbx.get("asterisk") if isinstance(pbx.get("asterisk"), dict) else None
    disk_pcts = [
        p for d in disks if isinstance(d, dict) and (p := _num(d.get("percent"))) is not None
    ]
    version = agent.get("version")
    trunks = _dict(pbx.get("trunks"))
    down = sorted(
        str(name)[:64]
        for name, t in trunks.items()
        if isinstance(t, dict) and t.get("state") == "down"
    )[:MAX_TRUNKS_DOWN]
    return {
        "cpu_pct": _num(cpu.get("percent")),
        "load1": _num(load[0]) if load else None,
        "mem_pct": _num(mem.get("percent")),
        "swap_pct": _num(swap.get("percent")),
        "disk_pct": max(disk_pcts) if disk_pcts else None,
        "uptime": _int(body.get("uptime")),
        "outbox_queued": _int(outbox.get("queued")),
        "outbox_dropped": _int(outbox.get("dropped")),
        # True, False, or unknown (None: AMI not configured and no process check).
        "asterisk_up": ast.get("running")
        if ast is not None and isinstance(ast.get("running"), bool)
        else None,
        "agent_version": str(version)[:40] if isinstance(version, str) else None,
        "trunks_down": down,
        "asterisk_started_at": _epoch(ast.get("started_at")) if ast is not None else None,
    }


def _counts(v: Any) -> Jsonb:
    if not isinstance(v, dict):
        return Jsonb({})
    return Jsonb({str(k)[:64]: n for k, n in v.items() if _int(n) is not None})


def _callstats_row(device: str, env_id: str, body: dict[str, Any]) -> tuple[Any, ...]:
    if body.get("schema") != CALLSTATS_SCHEMA:
        raise Rejected(f"callstats schema {str(body.get('schema'))[:40]!r}: expected callstats/1")
    start = _ts(body.get("bucket_start"), "bucket_start")
    seconds, revision = _int(body.get("bucket_seconds")), _int(body.get("revision"))
    if not seconds or seconds <= 0 or revision is None or revision < 0:
        raise Rejected("callstats: bucket_seconds and revision must be whole numbers")
    return (
        device, start, seconds, revision, env_id, bool(body.get("folded")),
        _int(body.get("calls")), _int(body.get("answered")), _int(body.get("duration_sum")),
        _int(body.get("billsec_sum")), _num(body.get("asr")), _num(body.get("acd")),
        _int(body.get("peak_concurrent")), _counts(body.get("by_direction")),
        _counts(body.get("by_disposition")), _counts(body.get("by_trunk")),
        _counts(body.get("by_hour")),
    )  # fmt: skip


# A later revision is the complete bucket again: it replaces, never adds. An older
# revision arriving late (another worker, a redelivery) changes nothing.
_CALLSTATS_UPSERT = (
    "INSERT INTO callstats AS c (device_id, bucket_start, bucket_seconds, revision,"
    " envelope_id, folded, calls, answered, duration_sum, billsec_sum, asr, acd,"
    " peak_concurrent, by_direction, by_disposition, by_trunk, by_hour)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (device_id, bucket_start) DO UPDATE SET"
    " bucket_seconds = EXCLUDED.bucket_seconds, revision = EXCLUDED.revision,"
    " envelope_id = EXCLUDED.envelope_id, folded = EXCLUDED.folded, calls = EXCLUDED.calls,"
    " answered = EXCLUDED.answered, duration_sum = EXCLUDED.duration_sum,"
    " billsec_sum = EXCLUDED.billsec_sum, asr = EXCLUDED.asr, acd = EXCLUDED.acd,"
    " peak_concurrent = EXCLUDED.peak_concurrent, by_direction = EXCLUDED.by_direction,"
    " by_disposition = EXCLUDED.by_disposition, by_trunk = EXCLUDED.by_trunk,"
    " by_hour = EXCLUDED.by_hour, received_at = now()"
    " WHERE c.revision < EXCLUDED.revision"
)


# -- configuration snapshots -------------------------------------------------------------


def _check_part(body: dict[str, Any]) -> tuple[str, int, int | None]:
    """Snapshot id, part number and the count of parts where this part says it.

    Schema 1 gives ``parts`` in every part; schema 2 only in the last one (its count is
    known only once the manifest has streamed to its end).
    """
    schema = body.get("schema")
    if schema not in SNAPSHOT_SCHEMAS:
        raise Rejected(
            f"config schema {str(schema)[:40]!r}: expected one of {', '.join(SNAPSHOT_SCHEMAS)}"
        )
    snap, part, parts = body.get("snapshot"), _int(body.get("part")), _int(body.get("parts"))
    if not isinstance(snap, str) or not 1 <= len(snap) <= 128:
        raise Rejected("config: snapshot id missing")
    if part is None or not 1 <= part <= MAX_PARTS:
        raise Rejected("config: part must be a whole number from 1")
    if schema == SNAPSHOT_SCHEMAS[0] and (parts is None or not part <= parts <= MAX_PARTS):
        raise Rejected("config: part and parts must satisfy 1 <= part <= parts")
    if schema == SNAPSHOT_SCHEMAS[1] and parts is not None and parts != part:
        raise Rejected(f"config: only the last part carries parts ({parts} on part {part})")
    return snap, part, parts


def _snapshot_part(conn: Conn, device: str, body: dict[str, Any]) -> None:
    snap, part, parts = _check_part(body)
    conn.execute(
        "INSERT INTO snapshots (device_id, snapshot_id, parts) VALUES (%s, %s, %s)"
        " ON CONFLICT DO NOTHING",
        (device, snap, parts),
    )
    # The row lock orders the workers holding this snapshot's parts: the one that stores
    # the last missing part sees every other part committed, whichever worker stored it.
    row = conn.execute(
        "SELECT parts, complete_at FROM snapshots WHERE device_id = %s AND snapshot_id = %s"
        " FOR UPDATE",
        (device, snap),
    ).fetchone()
    assert row is not None
    known, complete = row
    if parts is not None:
        if known is not None and known != parts:
            raise Rejected(f"config: snapshot {snap} part {part} says {parts} parts, not {known}")
        if known is None:
            conn.execute(
                "UPDATE snapshots SET parts = %s WHERE device_id = %s AND snapshot_id = %s",
                (parts, device, snap),
            )
            known = parts
    if known is not None and part > known:
        raise Rejected(f"config: snapshot {snap} has {known} parts, not {part}")
    if complete is not None:
        return  # already assembled: a part sent again under a new envelope id
    conn.execute(
        "INSERT INTO snapshot_parts (device_id, snapshot_id, part, parts, body)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
        (device, snap, part, parts, Jsonb(body)),
    )
    have = conn.execute(
        "SELECT count(*) FROM snapshot_parts WHERE device_id = %s AND snapshot_id = %s",
        (device, snap),
    ).fetchone()
    if known is not None and have is not None and have[0] == known:
        _assemble(conn, device, snap)


def _decode(content: Any) -> dict[str, str]:
    if not isinstance(content, dict):
        return {}
    if content.get("encoding") != "zlib+base64":
        raise Rejected(f"config content encoding {str(content.get('encoding'))[:30]!r}")
    try:
        raw = zlib.decompress(base64.b64decode(str(content.get("data", "")), validate=True))
        texts = json.loads(raw.decode("utf-8"))
    except (binascii.Error, zlib.error, UnicodeDecodeError, ValueError) as exc:
        raise Rejected(f"config content cannot be decoded: {exc}") from None
    if not isinstance(texts, dict):
        raise Rejected("config content: expected path -> text")
    return {str(k): str(v) for k, v in texts.items()}


def _chunks(bodies: list[dict[str, Any]]) -> tuple[dict[str, str], list[str]]:
    """Schema 2: large files sent in pieces; joined by offset, checked contiguous and final."""
    pieces: dict[str, list[tuple[int, bool, bytes]]] = {}
    for b in bodies:
        chunk = b.get("chunk")
        if not isinstance(chunk, dict):
            continue
        try:
            data = zlib.decompress(base64.b64decode(str(chunk.get("data", "")), validate=True))
        except (binascii.Error, zlib.error) as exc:
            raise Rejected(f"config chunk cannot be decoded: {exc}") from None
        offset = _int(chunk.get("offset"))
        path = chunk.get("path")
        if not isinstance(path, str) or offset is None:
            raise Rejected("config chunk without a path or offset")
        pieces.setdefault(path, []).append((offset, bool(chunk.get("final")), data))
    texts: dict[str, str] = {}
    problems: list[str] = []
    for path, got in pieces.items():
        got.sort()
        joined = bytearray()
        for offset, _, data in got:
            if offset != len(joined):
                problems.append(f"{path}: chunk at {offset}, expected {len(joined)}")
                break
            joined += data
        else:
            if not got[-1][1]:
                problems.append(f"{path}: the final chunk is missing")
            else:
                texts[path] = joined.decode("utf-8", "replace")
    return texts, problems


def manifest_digest(entries: list[dict[str, Any]]) -> str:
    """``sha256:`` of each entry's canonical JSON and a newline, in path (UTF-8 byte) order."""
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: str(e["path"]).encode("utf-8")):
        text = json.dumps(e, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        h.update(text.encode("utf-8") + b"\n")
    return f"sha256:{h.hexdigest()}"


def _diff(path: str, old: str, new: str) -> str:
    lines = list(
        difflib.unified_diff(
            old.splitlines(keepends=True),
            new.splitlines(keepends=True),
            fromfile=f"a{path}",
            tofile=f"b{path}",
        )
    )
    if len(lines) > MAX_DIFF_LINES:
        lines = [*lines[:MAX_DIFF_LINES], f"... {len(lines) - MAX_DIFF_LINES} more lines\n"]
    return "".join(lines)


def _assemble(conn: Conn, device: str, snap: str) -> None:
    """Every part is here: record the files it changed as redacted diffs."""
    bodies = [
        r[0]
        for r in conn.execute(
            "SELECT body FROM snapshot_parts WHERE device_id = %s AND snapshot_id = %s"
            " ORDER BY part",
            (device, snap),
        )
    ]
    first = bodies[0]
    # Schema 1 carries the summary and removals in part 1; schema 2 the summary in the
    # last part and removals in any part, in path order.
    v2 = first.get("schema") == SNAPSHOT_SCHEMAS[1]
    mode = str(first.get("mode", ""))
    manifest: list[dict[str, Any]] = []
    texts: dict[str, str] = {}
    removed: list[str] = []
    for b in bodies:
        entries = b.get("manifest")
        if isinstance(entries, list):
            manifest.extend(e for e in entries if isinstance(e, dict) and "path" in e)
        texts.update(_decode(b.get("content")))
        if v2:
            removed.extend(str(p) for p in b.get("removed", []) if isinstance(p, str))
    chunked, problems = _chunks(bodies)
    texts.update(chunked)
    if not v2:
        removed = [str(p) for p in first.get("removed", []) if isinstance(p, str)]
    summary_src = bodies[-1] if v2 else first
    summary = summary_src.get("summary") if isinstance(summary_src.get("summary"), dict) else {}
    by_path = {str(e["path"]): e for e in manifest}
    for path in list(texts):  # a text that does not match its entry's digest is not kept
        want = by_path.get(path, {}).get("digest")
        got = "sha256:" + hashlib.sha256(texts[path].encode("utf-8")).hexdigest()
        if want != got:
            problems.append(f"{path}: content does not match its manifest digest")
            del texts[path]
    if v2 and mode == "full" and summary.get("manifest_digest") != manifest_digest(manifest):
        problems.append("the manifest does not match manifest_digest")
    if problems:
        summary = {**summary, "noc_problems": problems[:50]}
    current = {
        str(r[0]): (r[1], r[2])
        for r in conn.execute(
            "SELECT path, digest, content FROM config_files WHERE device_id = %s", (device,)
        )
    }
    if mode == "full":
        listed = {str(e["path"]) for e in manifest}
        removed = sorted(p for p in current if p not in listed)
    changed = 0
    for e in manifest:
        path = str(e["path"])
        old = current.get(path)
        if path in texts:
            new = texts[path]
            if old is not None and old[1] == new:
                continue
            change = "changed" if old is not None and old[1] is not None else "added"
            diff = _diff(path, old[1] if old and old[1] else "", new)
            content: str | None = new
            digest = str(e.get("digest") or "")
        else:
            detail = f"{e.get('status', '?')}: {e.get('reason', e.get('target', ''))}".strip(": ")
            if old is not None and old[1] is None and old[0] == detail:
                continue
            change, diff, content, digest = "entry", f"{path}: {detail}\n", None, detail
        conn.execute(
            "INSERT INTO config_files (device_id, path, digest, content, snapshot_id)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (device_id, path) DO UPDATE SET"
            " digest = EXCLUDED.digest, content = EXCLUDED.content,"
            " snapshot_id = EXCLUDED.snapshot_id",
            (device, path, digest, content, snap),
        )
        conn.execute(
            "INSERT INTO config_diffs (device_id, snapshot_id, path, change, diff)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (device, snap, path, change, diff),
        )
        changed += 1
    for path in removed:
        old = current.get(path)
        conn.execute("DELETE FROM config_files WHERE device_id = %s AND path = %s", (device, path))
        conn.execute(
            "INSERT INTO config_diffs (device_id, snapshot_id, path, change, diff)"
            " VALUES (%s, %s, %s, 'removed', %s) ON CONFLICT DO NOTHING",
            (device, snap, path, _diff(path, old[1] or "", "") if old else f"{path}: removed\n"),
        )
    taken = first.get("taken_at")
    conn.execute(
        "UPDATE snapshots SET complete_at = now(), mode = %s, base = %s, taken_at = %s,"
        " summary = %s, files_changed = %s, files_removed = %s"
        " WHERE device_id = %s AND snapshot_id = %s",
        (
            mode or None,
            first.get("base") if isinstance(first.get("base"), str) else None,
            _ts(taken, "taken_at") if isinstance(taken, str) else None,
            Jsonb(summary),
            changed,
            len(removed),
            device,
            snap,
        ),
    )
    conn.execute(
        "DELETE FROM snapshot_parts WHERE device_id = %s AND snapshot_id = %s", (device, snap)
    )
